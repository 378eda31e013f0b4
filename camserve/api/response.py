"""The response: the model, the image, the predictions and the explanations, as typed values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["DetectionItem", "ExplainResponse", "Explanation", "ModelInfo", "Prediction", "Segment"]


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
    """``multiclass``, ``multilabel``, ``binary``, ``regression``, ``detection`` or ``segmentation``: how to read
    the predictions (a detector's ``detections``, a segmenter's ``segments`` and ``mask``)."""


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


@dataclass(frozen=True)
class DetectionItem:
    """One detection: its index in ``detections`` (highest score first), its box (x0, y0, x1, y1) in the uploaded
    image's pixels, its class and score; a Mask R-CNN's ``mask`` (a base64 PNG at the overlay's size, 255 inside)
    and a Keypoint R-CNN's ``keypoints`` ([x, y, visibility] in the image's pixels)."""

    index: int
    box: list[float]
    label_index: int
    label: str
    score: float
    mask: str | None = None
    keypoints: list[list[float]] | None = None

    def to_dict(self) -> dict[str, object]:
        item = {"index": self.index, "box": self.box, "class": self.label_index, "label": self.label}
        item["score"] = self.score
        if self.mask is not None:
            item["mask"] = self.mask
        if self.keypoints is not None:
            item["keypoints"] = self.keypoints
        return item


@dataclass(frozen=True)
class Segment:
    """One class present in a segmenter's mask, with its share of the pixels."""

    index: int
    label: str
    share: float

    def to_dict(self) -> dict[str, object]:
        return {"class": self.index, "label": self.label, "share": self.share}


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
    sanity: dict[str, object] | None = None
    """The rank correlation with the map of a copy of the model randomised after the layer, and the randomised
    modules (``camserve.cam.sanity``); only when asked."""
    value: float | None = None
    """A regression output's value, in place of a probability."""
    detection: int | None = None
    """A detector's explained detection, its index in ``detections``; ``index`` is its class."""
    box: list[float] | None = None
    """The explained detection's box, in the uploaded image's pixels."""
    score: float | None = None
    """The explained detection's score."""
    share: float | None = None
    """The explained segment's share of the pixels."""
    similarity: float | None = None
    """An embedding model's cosine similarity to the explained reference."""
    peak: dict[str, list] | None = None
    """A volume's map's highest voxel ``[i, j, k]`` and its world coordinates ``[x, y, z]`` in mm."""


@dataclass(frozen=True)
class ExplainResponse:
    model: ModelInfo
    width: int
    height: int
    predictions: list[Prediction] | None
    """A classifier's; None for a detector or segmenter."""
    explanations: list[Explanation] = field(default_factory=list)
    detections: list[DetectionItem] | None = None
    segments: list[Segment] | None = None
    mask: str | None = None
    """A segmenter's class per pixel: a base64 PNG at the overlay's size, 8-bit with a palette where each pixel's
    value is its class index (16-bit grayscale for more than 256 classes)."""
    similarities: list[dict[str, object]] | None = None
    """An embedding model's cosine similarity to each reference: ``{"index", "label", "similarity"}``."""
    embedding: list[float] | None = None
    """An embedding model's embedding of the image, when the request asks for it."""
    depth: int | None = None
    """A volume's third side: ``image`` is then its (width, height, depth) = its (i, j, k) voxels."""

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {"model": asdict(self.model), "image": {"width": self.width, "height": self.height}}
        if self.depth is not None:
            body["image"]["depth"] = self.depth
        if self.predictions is not None:
            body["predictions"] = [_without_none(p) for p in self.predictions]
        if self.detections is not None:
            body["detections"] = [d.to_dict() for d in self.detections]
        if self.segments is not None:
            body["segments"] = [s.to_dict() for s in self.segments]
            body["mask"] = self.mask
        if self.similarities is not None:
            body["similarities"] = self.similarities
        if self.embedding is not None:
            body["embedding"] = self.embedding
        body["explanations"] = [_without_none(e) for e in self.explanations]
        return body
