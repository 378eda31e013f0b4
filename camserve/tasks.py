"""What a model's output means: multiclass, multilabel, binary or regression; detection or segmentation. A task
turns outputs into predictions, says which targets a request may name and which it explains by default, gives the
engine its head (the scalar each explanation differentiates, the per-class scores that rank classes) and gives
faithfulness its score.

This is the one module that knows the tasks: nothing else branches on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from camserve.api.response import Prediction
from camserve.cam import SOFTMAX, Classes, Head, Target, TopPredicted, logit

__all__ = ["TASKS", "Task", "predicted_classes", "segment_objective", "segment_shares", "task_named"]


def _sigmoid_scores(outputs: Tensor) -> Tensor:
    return outputs.float().sigmoid()


def _binary_scores(outputs: Tensor) -> Tensor:
    """One logit z to the two classes' probabilities: (1 − σ(z), σ(z)), the negative class first."""
    positive = outputs.float()[:, :1].sigmoid()
    return torch.cat([1 - positive, positive], dim=1)


def _binary_objective(outputs: Tensor, classes: Tensor) -> Tensor:
    """z for the positive class (1) and −z for the negative one (0): pytorch-grad-cam's
    ``BinaryClassifierOutputTarget``."""
    z = outputs[:, 0]
    return torch.where(classes == 1, z, -z)


def _raw_scores(outputs: Tensor) -> Tensor:
    return outputs.float()


BACKGROUND = 0
"""A segmenter's background class: index 0, torchvision's convention (its VOC weights' ``__background__``)."""


def predicted_classes(outputs: Tensor) -> Tensor:
    """(N, C, H, W) outputs to (N, H, W) the class of each pixel: ``max(dim=1).indices``, the first of equal
    maxima as ``argmax`` gives it, 4x faster than ``argmax(dim=1)`` on the CPU (6 ms against 26 ms at 21x520x520)."""
    return outputs.max(dim=1).indices


def segment_objective(outputs: Tensor, classes: Tensor) -> Tensor:
    """Σ over the pixels predicted as c of the class's logit y_c: pytorch-grad-cam's ``SemanticSegmentationTarget``
    with the mask of the segment, for (P, C, H, W) outputs and (P,) classes."""
    height, width = outputs.shape[-2:]
    chosen = outputs.gather(1, classes.view(-1, 1, 1, 1).expand(-1, 1, height, width)).squeeze(1)
    return (chosen * (predicted_classes(outputs) == classes.view(-1, 1, 1))).sum(dim=(1, 2))


def segment_shares(outputs: Tensor) -> Tensor:
    """(N, C, H, W) outputs to (N, C) shares of the pixels predicted as each class."""
    count, classes = outputs.shape[:2]
    predicted = predicted_classes(outputs).flatten(1)
    offsets = torch.arange(count, device=outputs.device)[:, None] * classes
    counts = torch.bincount((predicted + offsets).flatten(), minlength=count * classes).view(count, classes)
    return counts.float() / predicted.shape[1]


def _foreground_shares(outputs: Tensor) -> Tensor:
    """The shares, with the background's set to −1 so that it is never a segment explained by default."""
    shares = segment_shares(outputs)
    shares[:, BACKGROUND] = -1.0
    return shares


SEGMENTATION_HEAD = Head(objective=segment_objective, scores=segment_shares, rank=_foreground_shares)


@dataclass(frozen=True)
class Task:
    """One task: how its outputs read, and what an explanation of it explains."""

    name: str
    head: Head
    """The engine's head: the explained scalar and the per-class scores."""
    probabilities: bool = True
    """Its scores are probabilities (not regression values)."""
    exclusive: bool = False
    """Its classes exclude each other under a softmax (what Finer-CAM's contrast with look-alikes needs)."""
    default_explain: int = 1
    """How many classes a request without ``target`` or ``explain`` explains."""
    kind: str = "classification"
    """``classification`` (one score per class and image), ``detection`` (boxes, each explained) or
    ``segmentation`` (a class per pixel, each segment explained)."""

    @property
    def classifies(self) -> bool:
        return self.kind == "classification"

    def classes(self, outputs: int) -> int:
        """How many classes a request may name, for a model with ``outputs`` outputs."""
        return 2 if self.name == "binary" else outputs

    def outputs(self, classes: int) -> int:
        """How many outputs a model of ``classes`` classes has (the inverse of :meth:`classes`)."""
        return 1 if self.name == "binary" else classes

    def check_outputs(self, outputs: int, arch: str) -> str | None:
        """Why a model with ``outputs`` outputs cannot be served as this task, with the fix; None when it can."""
        if self.name == "binary" and outputs != 1:
            return (
                f"a binary model has exactly 1 output (one logit z, p = σ(z)); {arch} has {outputs}: build it with "
                "--task multiclass, or give it a one-logit head"
            )
        if self.name == "multilabel" and outputs < 2:
            return f"a multi-label model has at least 2 classes; {arch} has {outputs} output"
        return None

    def default_labels(self, classes: int) -> list[str]:
        """Names for classes that no labels file names: a binary model's ``negative`` and ``positive``,
        ``output_i`` for a regression model's outputs, else ``class_i``."""
        if self.name == "binary":
            return ["negative", "positive"]
        return [f"{'class' if self.probabilities else 'output'}_{i}" for i in range(classes)]

    @property
    def what(self) -> str:
        """What its class indices count, in words: ``classes``, or a regression model's ``outputs``."""
        return "classes" if self.probabilities else "outputs"

    @property
    def one(self) -> str:
        """One of :attr:`what`, in words: ``a class``, or a regression model's ``an output``."""
        return "a class" if self.probabilities else "an output"

    def default_target(self, explain: int | None, threshold: float, classes: int) -> Target:
        """What a request without ``target`` explains, for a model of ``classes`` classes."""
        count = min(explain or self.default_explain, classes)
        if self.name == "multilabel":
            return TopPredicted(count, at_least=threshold)  # the positive classes, or the top one when none is
        if self.name == "regression":
            return Classes([0]) if explain is None else Classes(range(count))
        if self.kind != "classification":  # the largest segments that are not background (or top detections)
            return TopPredicted(count, at_least=1e-9, or_top=False)
        return TopPredicted(count)

    def scores(self, outputs: Tensor) -> Tensor:
        """(N, classes) per-class scores: probabilities, or a regression's values."""
        return self.head.scores(outputs)

    def predictions(self, scores: Tensor, topk: int, labels: Sequence[str], threshold: float) -> list[Prediction]:
        """One image's predictions from its (classes,) scores: the top ``topk`` by probability (a binary model's
        both classes), or every output's value of a regression model."""
        row = scores.float().cpu()
        if not self.probabilities:
            return [Prediction(i, labels[i], value=round(v, 6)) for i, v in enumerate(row.tolist())]
        count = len(row) if self.name == "binary" else min(topk, len(row))
        values, indices = row.topk(count)
        positive = (lambda p: p >= threshold) if self.name == "multilabel" else (lambda p: None)
        return [
            Prediction(i, labels[i], probability=round(p, 6), positive=positive(p))
            for i, p in zip(indices.tolist(), values.tolist(), strict=True)
        ]

    def explained(self, score: float) -> dict[str, float]:
        """The explained class's own figure in an explanation: its probability, a regression output's value, a
        segment's share of the pixels or a detection's score."""
        name = {"segmentation": "share", "detection": "score"}.get(self.kind)
        return {name or ("probability" if self.probabilities else "value"): round(score, 6)}


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("multiclass", SOFTMAX, exclusive=True),  # the logit y_c, classes ranked by softmax
        Task("multilabel", Head(objective=logit, scores=_sigmoid_scores), default_explain=5),  # y_c; p = σ(y_c)
        Task("binary", Head(objective=_binary_objective, scores=_binary_scores)),  # z or −z; p = σ(z)
        Task("regression", Head(objective=logit, scores=_raw_scores), probabilities=False),  # the output itself
        # The sum of the segment's logits (pytorch-grad-cam's SemanticSegmentationTarget); segments by size.
        Task("segmentation", SEGMENTATION_HEAD, exclusive=True, kind="segmentation"),
        # IoU + score of the matching box (FasterRCNNBoxScoreTarget, camserve.cam.detection), not an engine head.
        Task("detection", SOFTMAX, default_explain=3, kind="detection"),
    )
}
"""Every task, by the name the spec and ``--task`` use."""


def task_named(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}") from None
