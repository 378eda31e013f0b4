"""What every task is asked: how its outputs read, which targets and options a request may give, which methods it
takes and what they cost, and how its batch is explained and its response shaped. The defaults here are a
classifier's; each task module overrides what differs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from torch import Tensor

from camserve.api import ExplainOptions, Explanation, Prediction
from camserve.batch import explain_with_engine
from camserve.cam import DEFAULT_METHOD, CamEngine, CamRequest, Classes, Head, Method, Target, TopPredicted
from camserve.cam.layers import Layout
from camserve.cam.sanity import sanity_passes
from camserve.errors import ClientError
from camserve.faithfulness import forward_passes as faithfulness_passes
from camserve.imaging import OpenedImage, encode_image, open_image, resize_image, snap_to_decode_scale
from camserve.pixels import model_pixels
from camserve.work import PreparedRequest, RowResult, Section, ServiceView, Terms, render

__all__ = ["Task"]


@dataclass(frozen=True)
class Task:
    """One task: how its outputs read, and what an explanation of it explains."""

    name: str
    head: Head | None
    """The engine's head: the explained scalar and the per-class scores; None for a task the engine's shared pass
    does not explain (a detector's boxes)."""
    probabilities: bool = True
    """Its scores are probabilities (not regression values)."""
    exclusive: bool = False
    """Its classes exclude each other under a softmax (what Finer-CAM's contrast with look-alikes needs)."""
    default_explain: int = 1
    """How many classes a request without ``target`` or ``explain`` explains."""

    kind: ClassVar[str] = "classification"
    """What it is, in words: ``classification``, ``detection`` or ``segmentation`` (the docs, error messages)."""
    options: ClassVar[frozenset[str]] = frozenset({"topk", "target", "aug_smooth", "sanity"})
    """The options of :data:`TASK_OPTIONS` it takes; a request that gives another one a value is refused."""
    probes_layers: ClassVar[bool] = True
    """Its layers' shapes are probed once, at a square input (a detector's images come at their own sizes)."""
    figure: ClassVar[str] = "probability"
    """The name of the explained class's own figure in an explanation."""
    unit: ClassVar[str] = "class"
    what: ClassVar[str] = "classes"
    """What its class indices count, in words (error messages)."""
    one: ClassVar[str] = "a class"
    """One of :attr:`what`, in words."""

    @property
    def classifies(self) -> bool:
        """Whether it gives each image one score per class (predictions and ``topk``)."""
        return "topk" in self.options

    # --- Its outputs ---

    def classes(self, outputs: int) -> int:
        """How many classes a request may name, for a model with ``outputs`` outputs."""
        return outputs

    def outputs(self, classes: int) -> int:
        """How many outputs a model of ``classes`` classes has (the inverse of :meth:`classes`)."""
        return classes

    def check_outputs(self, outputs: int, arch: str) -> str | None:
        """Why a model with ``outputs`` outputs cannot be served as this task, with the fix; None when it can."""
        return None

    def default_labels(self, classes: int) -> list[str]:
        """Names for classes that no labels file names: ``class_i`` (a regression model's ``output_i``)."""
        return [f"{self.unit}_{i}" for i in range(classes)]

    def scores(self, outputs: Tensor) -> Tensor:
        """(N, classes) per-class scores: probabilities, or a regression's values."""
        return self.head.scores(outputs)

    def predictions(self, scores: Tensor, topk: int, labels: Sequence[str], threshold: float) -> list[Prediction]:
        """One image's predictions from its (classes,) scores: the top ``topk`` by probability."""
        values, indices = scores.float().cpu().topk(min(topk, len(scores)))
        return [
            Prediction(i, labels[i], probability=round(p, 6))
            for i, p in zip(indices.tolist(), values.tolist(), strict=True)
        ]

    def explained(self, score: float) -> dict[str, float]:
        """The explained class's own figure in an explanation (its probability, a segment's share, ...)."""
        return {self.figure: round(score, 6)}

    def serving(self, model, spec) -> Task:
        """The task as it serves this loaded ``model`` of this ``spec`` (a zero-shot model's scores read through a
        softmax or a sigmoid, as the model was trained); itself for most."""
        return self

    # --- A request ---

    def terms(self, options: ExplainOptions, service: ServiceView) -> Terms:
        """What a request names beside its image (:class:`~camserve.work.Terms`): a classifier's classes are the
        model's labels. A ClientError says what is wrong with them."""
        return Terms(service.spec.labels)

    def default_target(self, explain: int | None, threshold: float, classes: int) -> Target:
        """What a request without ``target`` explains, for a model of ``classes`` classes."""
        return TopPredicted(min(explain or self.default_explain, classes))

    def targets(self, options: ExplainOptions, classes: int) -> Target:
        """What a request explains: the classes it names, or the task's default; a ClientError says why not."""
        if options.target is not None and max(options.target) >= classes:
            raise ClientError(
                "InvalidOption",
                f"target must be {self.one} index from 0 to {classes - 1} (this model has {classes} {self.what}), "
                f"got {list(options.target)}",
            )
        if options.target is None and (options.explain or 1) > classes:
            raise ClientError(
                "InvalidOption",
                f"explain must be at most {classes} (this model has {classes} {self.what}), got {options.explain}",
            )
        if options.target is not None:
            return Classes(options.target)
        return self.default_target(options.explain, options.threshold, classes)

    def prepare_input(
        self, service: ServiceView, data: bytes, options: ExplainOptions, cam: CamRequest, terms: Terms
    ) -> PreparedRequest:
        """A request's image: its header checked against the limits and the request's work against the budget,
        then decoded at the output size and the model's."""
        opened = open_image(data, service.limits)
        budget = service.budget
        output = snap_to_decode_scale(opened, budget.output_size(opened.width, opened.height, options.max_side))
        explanations = cam.targets.count  # at most: a multi-label model explains only its positive classes of these
        measuring = explanations * faithfulness_passes(options.faithfulness_steps) if options.faithfulness else 0
        method_passes = self.forward_passes(service.engine, cam) + terms.passes
        checking = sanity_passes(service.engine, cam) if options.sanity else 0
        budget.check(explanations, output, options.method, method_passes, measuring, checking)
        spec = service.spec
        rgb, model_input = self.model_input(opened, output, spec.input_size, spec.channels, options.window)
        return PreparedRequest(
            options, cam, resize_image(rgb, output), model_input, opened.width, opened.height, terms
        )  # fmt: skip

    def sample_input(self) -> bytes:
        """What a door explains before it says the model is ready: a seeded noise photo, 160x120 PNG."""
        noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
        return encode_image(noise, "png")

    def model_input(
        self,
        opened: OpenedImage,
        output: tuple[int, int],
        side: int,
        channels: int = 3,
        window: tuple[float, float] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The decoded image (at least the output's size) and the pixels the model reads, which its batch squashes to
        the ``side`` square of ``channels`` (:func:`camserve.pixels.model_pixels`; ``window``: a DICOM's VOI window)."""
        return model_pixels(opened, output, side, channels, window)

    def default_method(self, layout: str) -> str:
        """The method of a request that names none, at a layer of this ``layout``."""
        return DEFAULT_METHOD

    def check_method(self, record: Method, layer: str, layout: str) -> None:
        """Refuse a method that cannot explain this task's outputs at this layer, saying why and what works."""
        if Layout(layout).volume and not record.any_dimensions:
            raise ClientError(
                "InvalidOption",
                f"method {record.name} resizes, flips or masks the input in 2D; a 3D network's layer is explained "
                "by the gradient and activation families (gradcam, gradcam++, xgradcam, hirescam, layercam, "
                "eigencam, ...): choose one of them",
            )
        if record.seeds is not None and not self.exclusive:
            raise ClientError(
                "InvalidOption",
                f"method {record.name} contrasts a class with its look-alike classes under a softmax, which "
                f"{'an' if self.name[0] in 'aeiou' else 'a'} {self.name} model does not have: choose another method, "
                f"such as {DEFAULT_METHOD}",
            )

    def forward_passes(self, engine: CamEngine, cam: CamRequest) -> int:
        """The passes one request costs (its method record's count)."""
        return engine.forward_passes(cam)

    # --- Its batch and its response ---

    def explain(self, service: ServiceView, prepared: list[PreparedRequest]) -> list[RowResult]:
        """A batch of prepared requests explained with one pass of the engine (:mod:`camserve.batch`)."""
        return explain_with_engine(service, self, prepared)

    def image_predictions(self, scores: Tensor, options: ExplainOptions, labels: Sequence[str]):
        """One image's ``predictions`` section, or None when the task has none."""
        return self.predictions(scores, options.topk, labels, options.threshold)

    def pixel_classes(self, logits: Tensor) -> np.ndarray | None:
        """A batch's class per pixel, for a task that has one."""
        return None

    def measure(self, logits: Tensor, classes: Tensor):
        """For faithfulness, a task whose score of an explained class is not its per-class score: (the measure of
        masked outputs, p(x)); None: its :meth:`scores`."""
        return None

    def render_explanation(
        self, service: ServiceView, item: PreparedRequest, index: int, label: str, figure, cam, decorate=None
    ) -> Explanation:
        """One explanation of the request's ``index`` (its own index; ``label`` its name), from its map at the
        layer's grid: at the image's output size, drawn on it (``decorate``: a segment's outline)."""
        return render(item, index, label, figure, cam, decorate)

    def section(
        self, item: PreparedRequest, pixels: np.ndarray | None, scores: Tensor, size: tuple[int, int]
    ) -> Section:
        """The task's own part of one image's response, beside its explanations (a segmenter's segments)."""
        return Section()
