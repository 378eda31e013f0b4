"""The response: the model, the image, the predictions and the explanations, as typed values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["ExplainResponse", "Explanation", "ModelInfo", "Prediction"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    weights: str
    """``imagenet``, ``random`` (predictions mean nothing) or ``file:<sha256 first 12>``."""
    arch: str
    """The architecture (torchvision's, ``timm:<name>``, ``hf:<class>``), or the class name of the user's own
    network."""
    classes: int
    """How many classes (or a regression model's outputs) a request may name."""
    task: str = "multiclass"
    """``multiclass``, ``multilabel``, ``binary`` or ``regression``: how to read the predictions."""


def _without_none(item: object) -> dict[str, object]:
    return {key: value for key, value in asdict(item).items() if value is not None}


@dataclass(frozen=True)
class Prediction:
    """One class's prediction: a probability (softmax, sigmoid, or a binary model's σ(z) and 1 − σ(z)), with
    ``positive`` for a multi-label model; a regression model's output has its ``value`` instead."""

    index: int
    label: str
    probability: float | None = None
    positive: bool | None = None
    value: float | None = None


@dataclass(frozen=True, kw_only=True)
class Explanation:
    index: int
    label: str
    probability: float | None = None
    """The model's probability for the explained class; None (left out) for a regression output."""
    method: str
    layer: str
    format: str
    width: int
    """The overlay's and heatmap's size: the image's, or smaller under ``max_side``."""
    height: int
    overlay: str
    """The overlay image, base64."""
    heatmap: str | None = None
    """The map as a base64 16-bit grayscale PNG; only when asked."""
    faithfulness: dict[str, object] | None = None
    """Deletion, insertion, drop, increase and steps (``camserve.faithfulness``); only when asked."""
    value: float | None = None
    """A regression output's value, in place of a probability."""


@dataclass(frozen=True)
class ExplainResponse:
    model: ModelInfo
    width: int
    height: int
    predictions: list[Prediction]
    explanations: list[Explanation] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "model": asdict(self.model),
            "image": {"width": self.width, "height": self.height},
            "predictions": [_without_none(p) for p in self.predictions],
            "explanations": [_without_none(e) for e in self.explanations],
        }
