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
    """The torchvision architecture, or the class name of the user's own network."""
    classes: int
    """How many classes the model tells apart."""


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class Explanation:
    index: int
    label: str
    probability: float
    """The model's probability for the explained class."""
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


@dataclass(frozen=True)
class ExplainResponse:
    model: ModelInfo
    width: int
    height: int
    predictions: list[Prediction]
    explanations: list[Explanation] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        explanations = []
        for explanation in self.explanations:
            item = asdict(explanation)
            for optional in ("heatmap", "faithfulness"):
                if item[optional] is None:
                    del item[optional]
            explanations.append(item)
        return {
            "model": asdict(self.model),
            "image": {"width": self.width, "height": self.height},
            "predictions": [asdict(p) for p in self.predictions],
            "explanations": explanations,
        }
