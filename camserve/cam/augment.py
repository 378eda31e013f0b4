"""``aug_smooth``: the maps of flipped and brightened copies of the image, undone and averaged (pytorch-grad-cam's
test-time augmentation with ttach)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from camserve.cam.post import normalize_map

__all__ = ["AUGMENTATIONS", "IDENTITY", "augment", "undo_augmentation"]

AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))
"""``aug_smooth``'s copies, as pytorch-grad-cam makes them with ttach: a horizontal flip or not, times the
normalised input multiplied by 0.9, 1 or 1.1. Each map is undone (flipped back), min–max normalised at the input's
size, and the maps are averaged; the classes and logits are the original image's."""

IDENTITY = AUGMENTATIONS.index((False, 1.0))
"""The copy that is the image itself."""


def augment(image: Tensor, flip: bool, factor: float) -> Tensor:
    """One of :data:`AUGMENTATIONS` of a normalised (C, H, W) image."""
    return (image.flip(-1) if flip else image) * factor


def undo_augmentation(maps: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
    """``aug_smooth``'s map from the maps of the :data:`AUGMENTATIONS` copies, in their order."""
    undone = [
        normalize_map(cam.flip(-1) if flip else cam, size) for cam, (flip, _) in zip(maps, AUGMENTATIONS, strict=True)
    ]
    return torch.stack(undone).mean(0)
