"""A small 3D network for the synthetic volumes (camtools/synthetic.py: a ball, or none, in noise and clutter), as a
--model-file: three 3D convolutions, the second strided, each with a ReLU, then global max pooling (a detector of a
small object) and a linear head. Its last stage is ``features`` (a 12x12x12 grid at 24 voxels a side)."""

import torch
from torch import nn


class VolumeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv3d(16, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).amax(dim=(2, 3, 4)))
