"""The served network: building ResNet-50, finding and loading its weights, its labels and its input tensor."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

__all__ = [
    "INPUT_SIZE",
    "WeightsUnavailableError",
    "build_resnet50",
    "file_weights_label",
    "imagenet_labels",
    "images_to_batch",
    "imagenet_state_dict",
    "load_state_dict_file",
    "random_state_dict",
    "select_device",
]

INPUT_SIZE = 224
IMAGENET_WEIGHTS = ResNet50_Weights.IMAGENET1K_V2
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(RuntimeError):
    """The requested weights could not be obtained."""


def build_resnet50(state_dict: dict[str, torch.Tensor] | None = None, channels_last: bool = False) -> nn.Module:
    """torchvision's ResNet-50 in eval mode with frozen parameters, loaded from ``state_dict`` when given."""
    model = resnet50(weights=None)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)


def imagenet_state_dict(progress: bool = True) -> dict[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V2 weights, through torchvision's own download and cache (with a progress bar)."""
    try:
        return IMAGENET_WEIGHTS.get_state_dict(progress=progress, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad hash is a RuntimeError
        raise WeightsUnavailableError(
            f"could not download the ImageNet weights ({IMAGENET_WEIGHTS.url}): {error}.\n"
            "Offline, choose one of the other two: --weights PATH (a resnet50 state_dict file, e.g. one copied "
            "from torch.hub's cache on a machine that has it) or --weights random (seeded, for tests only: "
            "its predictions mean nothing)."
        ) from error


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded, randomly initialised ResNet-50: the same seed gives the same weights on every machine."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return resnet50(weights=None).state_dict()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A ResNet-50 state_dict saved with ``torch.save``, loaded safely (``weights_only=True``) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"no weights file at {path}")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise WeightsUnavailableError(f"{path} holds a {type(state_dict).__name__}, not a state_dict")
    return state_dict


def file_weights_label(path: str | Path) -> str:
    """``file:<first 12 hex digits of the file's sha256>``, the name responses give file weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"file:{digest.hexdigest()[:12]}"


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's weight metadata (no download); 281 is ``tabby``."""
    return list(IMAGENET_WEIGHTS.meta["categories"])


def read_labels(path: str | Path) -> list[str]:
    """Labels from an ``index_to_name.json`` file ({"0": "tench", ...})."""
    mapping = json.loads(Path(path).read_text())
    return [mapping[str(index)] for index in range(len(mapping))]


def images_to_batch(
    images: Sequence[np.ndarray], device: torch.device | str = "cpu", channels_last: bool = False
) -> torch.Tensor:
    """(H, W, 3) uint8 RGB arrays of the model's input size to a normalised (N, 3, H, W) float batch on ``device``."""
    batch = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(_STD, device=batch.device).view(1, 3, 1, 1)
    batch = batch.sub_(mean).div_(std)
    return batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Serving precisions: fp32 as is, or the network under ``torch.autocast`` with that dtype."""


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name, refusing what the device cannot do well."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    return PRECISIONS[precision]


def select_device(gpu_id: int | str | None) -> torch.device:
    """``cuda:<gpu_id>`` when TorchServe assigned a GPU and CUDA exists, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")
