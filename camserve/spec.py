"""The model spec: the one description of the served model that the build writes and everything else reads.

Written into the archive as ``model_spec.json`` by ``scripts/build_mar.py``; the handler, the offline CLI, the
benchmark and the tests read it. No other module knows the architecture, the classes, the input or the layers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["MANIFEST_FILE", "SPEC_FILE", "ModelSpec", "archive_manifest", "handler_settings", "model_config"]

SPEC_FILE = "model_spec.json"
"""The spec's name inside the archive."""
MANIFEST_FILE = "MAR-INF/MANIFEST.json"
"""TorchServe's manifest inside the archive: the model's name, its weights file and its model-config.yaml."""


def archive_manifest(model_dir: str | Path) -> dict[str, object]:
    """The unpacked archive's manifest (``MAR-INF/MANIFEST.json``), as TorchServe reads it."""
    return json.loads((Path(model_dir) / MANIFEST_FILE).read_text())


def model_config(model_dir: str | Path, manifest: Mapping[str, object]) -> dict[str, object]:
    """The archive's model-config.yaml (empty without one): TorchServe's batching and workers, and the handler's
    settings under ``handler:``."""
    import yaml

    config = manifest["model"].get("configFile")
    if not config or not (Path(model_dir) / config).is_file():
        return {}
    return yaml.safe_load((Path(model_dir) / config).read_text()) or {}


def handler_settings(model_dir: str | Path, manifest: Mapping[str, object]) -> dict[str, object]:
    """The ``handler:`` section of the archive's model-config.yaml (empty without one), as TorchServe gives it to
    the handler."""
    return model_config(model_dir, manifest).get("handler", {}) or {}


@dataclass(frozen=True)
class ModelSpec:
    """Everything about the served model that is data, not code."""

    name: str
    """The archive's name and the endpoint, ``/predictions/<name>``."""
    arch: str
    """A torchvision classification builder (``resnet50``, ``vit_b_16``), ``timm:<name>`` for a timm model,
    ``hf:<class>`` for a Hugging Face one, or, with ``model_file``, its class name."""
    labels: tuple[str, ...]
    """One name per class a request may explain: a binary model's two (negative first), a regression model's
    outputs, a zero-shot model's default prompts (none for an embedding model); their number is the number of
    classes."""
    input_size: int
    """The side of the square image the network takes, in pixels."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    """Per-channel normalisation of the [0, 1] input: (x − mean) / std, one value per channel."""
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
    """Keyword arguments of the builder (``num_classes``, a ViT's ``image_size``)."""
    task: str = "multiclass"
    """``multiclass``, ``multilabel``, ``binary`` or ``regression`` (``camserve.tasks``)."""
    threshold: float = 0.5
    """A multi-label model's default probability threshold for a positive class."""
    output: str | None = None
    """Which part of the network's output holds the logits, when it is not a tensor: a key or attribute name
    (``logits``) or a tuple index (``0``); None: the output is the logits."""
    hf_config: str | None = None
    """The folder inside the archive that holds a Hugging Face model's ``config.json`` (and a CLIP model's
    tokenizer)."""
    volume: tuple[int, int, int] | None = None
    """A 3D network's input (D, H, W): a NIfTI volume's axes i, j, k resized to it; None for an image model."""
    intensity: str = "minmax"
    """How a volume's values become [0, 1] before ``mean``/``std``: ``minmax`` or ``window:LOW,HIGH``."""
    channels: int = 3
    """The channels the network takes: 3 (RGB) or 1 (grayscale: an RGB upload becomes its luminance)."""
    embedding: Mapping[str, object] | None = None
    """A zero-shot or embedding model's image embedding (``camserve.embeddings``): ``encoder`` (``hf``,
    ``open_clip`` or ``vector``), ``size`` (its length), ``scores`` (``logits``: a CLIP model's image–text logits;
    ``cosine``: cosine similarities), and for a model with a text tower ``context`` (its
    tokens per prompt) and ``open_clip`` (open_clip's model name)."""

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
        if values.get("volume") is not None:
            values["volume"] = tuple(values["volume"])
        if values.get("embedding") is not None:
            values["embedding"] = dict(values["embedding"])
        return cls(**values)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        return cls.from_dict(json.loads(Path(path).read_text()))
