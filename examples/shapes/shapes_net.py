"""A small CNN for the synthetic shapes task (camtools/synthetic.py): which colour is the shape on the clutter?

A model file in TorchServe's --model-file convention: one nn.Module subclass, built with no arguments. A 64-pixel
input gives a 16x16 map at ``features`` (its last ReLU, ``features.7``), global average pooling, then the head.
"""

import torch
from torch import nn

OUTPUTS = 3
"""One logit per colour; the tests write copies of this file with 1 output for a binary or a regression head."""


class ShapesNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))
