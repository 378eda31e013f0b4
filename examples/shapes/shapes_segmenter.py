"""A small segmenter for the synthetic shapes task (camtools/synthetic.py): which pixels are which coloured shape?

A model file in TorchServe's --model-file convention (one nn.Module subclass, built with no arguments) that follows
torchvision's segmentation convention: it returns ``{"out": N×C×H×W}`` logits at the input's size, classes 0 the
background, 1 red, 2 green and 3 blue. A three-stage CNN (a 16x16 map at ``backbone.7`` for a 64-pixel input), a
1x1 classifier, bilinear upsampling.
"""

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 4
"""The background and three colours."""


class ShapesSegmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(64, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.classifier(self.backbone(x))
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}
