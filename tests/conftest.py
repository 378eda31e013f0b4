"""Shared fixtures: seeded ResNet-50s, sample photos and an image-file factory. Nothing is downloaded."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handler.model import build_resnet50, random_state_dict  # noqa: E402


@pytest.fixture(scope="session")
def resnet50() -> torch.nn.Module:
    """ResNet-50 with seeded random weights, eval mode, frozen parameters."""
    return build_resnet50(random_state_dict(seed=0))


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    """A tabby cat, 451x300 RGB, shipped inside scikit-image's wheel."""
    import skimage.data

    return skimage.data.chelsea()


def sample_photos() -> list[np.ndarray]:
    """Eight distinct RGB photos of different sizes from scikit-image's wheel."""
    import skimage.data as data

    gray_to_rgb = lambda image: np.repeat(image[:, :, None], 3, axis=2)  # noqa: E731
    return [
        data.chelsea(),
        data.astronaut(),
        data.coffee(),
        data.rocket(),
        data.colorwheel(),
        data.immunohistochemistry(),
        gray_to_rgb(data.camera()),
        gray_to_rgb(data.coins()),
    ]


def encode(array: np.ndarray, fmt: str = "PNG", **save_args) -> bytes:
    """An array (or PIL image) saved to bytes with Pillow."""
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()
