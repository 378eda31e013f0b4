"""What an explanation explains: typed targets, and the scalar of the model's output that it differentiates.

A request names its targets as :class:`Classes` (these, in order) or :class:`TopPredicted` (the image's r highest
outputs). The engine turns each (image, target) pair into a scalar of the model's output through an
:data:`Objective`, a function of the output rows and the pairs' classes, as pytorch-grad-cam's and torchcam's
targets are callables of the output. :func:`logit` is the raw class logit y_c that Grad-CAM differentiates; a task
with another scalar (a sigmoid class, a single logit or its negation, a regression output) gives its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Classes", "Head", "Objective", "SOFTMAX", "Target", "TopPredicted", "logit", "objective_seeds"]


@dataclass(frozen=True)
class Classes:
    """Explain these output indices, in this order, each with its own map."""

    indices: tuple[int, ...]

    def __init__(self, indices: Sequence[int]) -> None:
        object.__setattr__(self, "indices", tuple(int(index) for index in indices))
        if not self.indices:
            raise ValueError("Classes needs at least one index to explain")

    @property
    def count(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class TopPredicted:
    """Explain the image's ``count`` highest-scoring classes, the highest first; with ``at_least``, only those whose
    score reaches it (a multi-label model's positive classes), and the top one when none does."""

    count: int = 1
    at_least: float | None = None
    above: float | None = None
    """Only those whose score is greater than this (a segmenter's segments that have pixels), with no top one when
    none is."""
    or_top: bool = True
    """With ``at_least``: when no class reaches it, explain the top one (True) or none (False)."""

    def kept(self, scores: Sequence[float]) -> list[int]:
        """Which of the explained classes' ``scores``, in order, this target keeps."""
        if self.above is not None:
            return [i for i, score in enumerate(scores) if score > self.above]
        if self.at_least is None:
            return list(range(len(scores)))
        kept = [i for i, score in enumerate(scores) if score >= self.at_least]
        return kept or ([0] if self.or_top else [])

    @property
    def filters(self) -> bool:
        return self.at_least is not None or self.above is not None

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"TopPredicted needs a count of at least 1, got {self.count}")


Target = Classes | TopPredicted

Objective = Callable[[Tensor, Tensor], Tensor]
"""``objective(outputs, classes)``: for P pairs, the (P, C) output rows of each pair's image and the (P,) classes,
the (P,) scalars that the explanations differentiate."""


def logit(outputs: Tensor, classes: Tensor) -> Tensor:
    """The raw class logit y_c (pytorch-grad-cam's ``ClassifierOutputTarget``)."""
    return outputs.gather(1, classes[:, None]).squeeze(1)


@dataclass(frozen=True)
class Head:
    """How a model's output becomes what the engine explains: ``objective``, the scalar each explanation
    differentiates (and perturbation methods score with, as pytorch-grad-cam's targets do); ``scores``, (N, outputs)
    to (N, K) per-class scores that rank the classes, filter ``TopPredicted.at_least`` and weigh SESS's windows. A
    class index runs over the K scores, which need not be the outputs (a binary model's one logit gives two)."""

    objective: Objective
    scores: Callable[[Tensor], Tensor]
    rank: Callable[[Tensor], Tensor] | None = None
    """(N, outputs) to the (N, K) scores that rank classes for ``TopPredicted``, when not ``scores`` (a
    segmenter's pixel shares without its background class)."""

    def ranking(self, outputs: Tensor) -> Tensor:
        return (self.rank or self.scores)(outputs)


SOFTMAX = Head(objective=logit, scores=lambda outputs: outputs.float().softmax(dim=1))
"""A single-label classifier's head: the raw logit y_c, ranked by softmax probability (pytorch-grad-cam's
``ClassifierOutputTarget``)."""


def objective_seeds(objective: Objective, outputs: Tensor, classes: Tensor) -> Tensor:
    """∂objective/∂outputs for each pair, (P, C): the gradient each pair's backward pass starts from.

    For :func:`logit` that is one-hot, built directly; any other objective is differentiated on the detached
    output rows alone, which costs nothing beside the network's backward pass."""
    if objective is logit:
        return F.one_hot(classes, outputs.shape[1]).to(outputs.dtype)
    with torch.enable_grad():
        rows = outputs.detach().float().requires_grad_(True)
        (seeds,) = torch.autograd.grad(objective(rows, classes).sum(), rows)
    return seeds.to(outputs.dtype)
