"""A small detector for the synthetic shapes task (camtools/synthetic.py): where is each coloured shape?

A model file in TorchServe's --model-file convention (one nn.Module subclass, built with no arguments) that follows
torchvision's detection convention: it takes a list of images in [0, 1] and returns a list of
``{boxes, labels, scores}``. It is torchvision's FCOS (a head of two convolutions) on a three-stage CNN whose
16x16 map (stride 4, at ``backbone.7``) is the one feature level; classes are 1 red, 2 green and 3 blue (0 is the
background).
"""

from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead

CLASSES = 4
"""The background and three colours."""


class ShapesDetector(FCOS):
    def __init__(self) -> None:
        backbone = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 32, 3, padding=1),
            nn.ReLU(),
        )
        backbone.out_channels = 32
        super().__init__(
            backbone,
            num_classes=CLASSES,
            min_size=64,
            max_size=64,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.25, 0.25, 0.25],
            anchor_generator=AnchorGenerator(sizes=((8,),), aspect_ratios=((1.0,),)),
            head=FCOSHead(32, num_anchors=1, num_classes=CLASSES, num_convs=2),
            score_thresh=0.05,
            detections_per_img=10,
        )
