"""Grad-CAM on one layer, for every image alike: the engine behind one call, for the benchmark and the tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from camserve.cam import CamEngine, CamOutput, CamRequest, Classes, TopPredicted, find_layer

__all__ = ["GradCAM"]


class GradCAM:
    """Grad-CAM on one layer (None: the model's default layer), for every image alike:
    ``GradCAM(model, "layer4")(images, targets=[[281]])``; a target of None explains the top-1 class."""

    def __init__(
        self, model: nn.Module, layer: str | None = None, autocast_dtype: torch.dtype | None = None, input_size=224
    ) -> None:
        if layer is not None:
            find_layer(model, layer)
        self.layer = layer
        self.engine = CamEngine(model, autocast_dtype=autocast_dtype, input_size=input_size)

    def __call__(self, images: Tensor, targets: Sequence[Sequence[int] | None] | None = None) -> CamOutput:
        targets = [None] * len(images) if targets is None else targets
        requests = [
            CamRequest(targets=TopPredicted(1) if classes is None else Classes(classes), layer=self.layer)
            for classes in targets
        ]
        return self.engine(images, requests)
