"""The model spec: the one description of the served model that the build writes and everything else reads.

Written into the archive as ``model_spec.json`` by ``scripts/build_mar.py``; the handler, the offline CLI, the
benchmark and the tests read it. No other module knows the architecture, the classes, the input or the layers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["SPEC_FILE", "ModelSpec"]

SPEC_FILE = "model_spec.json"
"""The spec's name inside the archive."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything about the served model that is data, not code."""

    name: str
    """The archive's name and the endpoint, ``/predictions/<name>``."""
    arch: str
    """A torchvision classification builder (``resnet50``, ``vit_b_16``) or, with ``model_file``, its class name."""
    labels: tuple[str, ...]
    """One name per class; their number is the number of classes."""
    input_size: int
    """The side of the square image the network takes, in pixels."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    """Per-channel normalisation of the [0, 1] RGB input: (x − mean) / std."""
    default_layer: str
    """The layer requests explain when they name none: a dotted path, as ``model.get_submodule`` takes it."""
    layers: Mapping[str, str]
    """The layers a request may name, each with the layout that turns its output into a grid
    (``camserve.cam.LAYOUTS``: ``nchw``, ``nhwc``, ``cls_tokens``, ``tokens``)."""
    weights: str
    """``imagenet``, ``random`` (predictions mean nothing) or ``file:<sha256 first 12>``."""
    version: str = "1.0"
    model_file: str | None = None
    """The Python file inside the archive that defines the network, for a model of the user's own."""
    arch_kwargs: Mapping[str, object] = field(default_factory=dict)
    """Keyword arguments of the torchvision builder (``num_classes``, a ViT's ``image_size``)."""

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ModelSpec:
        values = dict(data)
        for key in ("labels", "mean", "std"):
            values[key] = tuple(values[key])
        values["layers"] = dict(values["layers"])
        return cls(**values)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        return cls.from_dict(json.loads(Path(path).read_text()))
