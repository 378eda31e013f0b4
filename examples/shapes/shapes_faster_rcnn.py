"""A small two-stage detector for the synthetic shapes task (camtools/synthetic.py): torchvision's Faster R-CNN.

A model file in TorchServe's --model-file convention (one nn.Module subclass, built with no arguments) that follows
torchvision's detection convention: it takes a list of images in [0, 1] and returns a list of
``{boxes, labels, scores}``. A three-stage CNN whose last two stages (stride 4 and 8 at the transform's size) feed a
feature pyramid (``backbone``, torchvision's ``BackboneWithFPN``), a region proposal network, and RoI heads with a
small box head. Its transform brings a 64-pixel scene to 96 pixels, as a Faster R-CNN's resizes every image, so the
maps come from a grid over the resized image, not over the scene. Classes are 1 red, 2 green and 3 blue (0 is the
background).
"""

from collections import OrderedDict

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

CLASSES = 4
"""The background and three colours."""


class ShapesFasterRCNN(FasterRCNN):
    def __init__(self) -> None:
        body = nn.Sequential(
            OrderedDict(
                stem=nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
                stage1=nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
                stage2=nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            )
        )
        backbone = BackboneWithFPN(body, {"stage1": "0", "stage2": "1"}, [32, 64], out_channels=32)
        super().__init__(
            backbone,
            min_size=96,
            max_size=96,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.25, 0.25, 0.25],
            rpn_anchor_generator=AnchorGenerator(sizes=((16,), (32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),) * 3),
            box_roi_pool=MultiScaleRoIAlign(["0", "1"], output_size=4, sampling_ratio=1),
            box_head=TwoMLPHead(32 * 4 * 4, 128),
            box_predictor=FastRCNNPredictor(128, CLASSES),
            rpn_pre_nms_top_n_train=200,
            rpn_post_nms_top_n_train=100,
            rpn_pre_nms_top_n_test=100,
            rpn_post_nms_top_n_test=50,
            rpn_batch_size_per_image=64,
            box_batch_size_per_image=32,
            box_detections_per_img=10,
        )
