"""Classifiers: one score per class and image. Multiclass (softmax), multi-label (a sigmoid per class), binary (one
logit for two classes) and regression (the outputs themselves)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from camserve.api import Prediction
from camserve.cam import SOFTMAX, Classes, Head, Target, TopPredicted, logit
from camserve.tasks.base import Task

__all__ = ["Binary", "Multiclass", "Multilabel", "Regression", "CLASSIFIERS", "RAW", "SIGMOID"]


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


@dataclass(frozen=True)
class Multiclass(Task):
    """A single-label classifier: the raw logit y_c, classes ranked by softmax."""


@dataclass(frozen=True)
class Multilabel(Task):
    """A multi-label classifier: the logit y_c, p = σ(y_c); a request explains its positive classes."""

    options: ClassVar[frozenset[str]] = Task.options | {"threshold"}

    def check_outputs(self, outputs: int, arch: str) -> str | None:
        return None if outputs >= 2 else f"a multi-label model has at least 2 classes; {arch} has {outputs} output"

    def default_target(self, explain: int | None, threshold: float, classes: int) -> Target:
        """The positive classes, at most ``explain`` (5), or the top one when none is."""
        return TopPredicted(min(explain or self.default_explain, classes), at_least=threshold)

    def predictions(self, scores: Tensor, topk: int, labels: Sequence[str], threshold: float) -> list[Prediction]:
        values, indices = scores.float().cpu().topk(min(topk, len(scores)))
        return [
            Prediction(i, labels[i], probability=round(p, 6), positive=p >= threshold)
            for i, p in zip(indices.tolist(), values.tolist(), strict=True)
        ]


@dataclass(frozen=True)
class Binary(Task):
    """A binary classifier: one logit z for two classes, p = σ(z); explaining the negative class differentiates −z."""

    def classes(self, outputs: int) -> int:
        return 2

    def outputs(self, classes: int) -> int:
        return 1

    def check_outputs(self, outputs: int, arch: str) -> str | None:
        if outputs == 1:
            return None
        return (
            f"a binary model has exactly 1 output (one logit z, p = σ(z)); {arch} has {outputs}: build it with "
            "--task multiclass, or give it a one-logit head"
        )

    def default_labels(self, classes: int) -> list[str]:
        return ["negative", "positive"]

    def predictions(self, scores: Tensor, topk: int, labels: Sequence[str], threshold: float) -> list[Prediction]:
        """Both classes, the more probable first."""
        return super().predictions(scores, len(scores), labels, threshold)


@dataclass(frozen=True)
class Regression(Task):
    """A regression model: each output's value; an explanation differentiates the output itself."""

    probabilities: bool = False
    figure: ClassVar[str] = "value"
    unit: ClassVar[str] = "output"
    what: ClassVar[str] = "outputs"
    one: ClassVar[str] = "an output"

    def default_target(self, explain: int | None, threshold: float, classes: int) -> Target:
        """Output 0; with ``explain`` N, outputs 0 to N − 1."""
        return Classes([0]) if explain is None else Classes(range(min(explain, classes)))

    def predictions(self, scores: Tensor, topk: int, labels: Sequence[str], threshold: float) -> list[Prediction]:
        """Every output's value, in order."""
        return [Prediction(i, labels[i], value=round(v, 6)) for i, v in enumerate(scores.float().cpu().tolist())]


SIGMOID = Head(objective=logit, scores=_sigmoid_scores)
"""The logit y_c, p = σ(y_c): a multi-label classifier's head."""
RAW = Head(objective=logit, scores=_raw_scores)
"""The output itself, read as it is: a regression's value, a cosine similarity."""

CLASSIFIERS: tuple[Task, ...] = (
    Multiclass("multiclass", SOFTMAX, exclusive=True),  # the logit y_c, classes ranked by softmax
    Multilabel("multilabel", SIGMOID, default_explain=5),
    Binary("binary", Head(objective=_binary_objective, scores=_binary_scores)),  # z or −z; p = σ(z)
    Regression("regression", RAW),  # the output itself
)
