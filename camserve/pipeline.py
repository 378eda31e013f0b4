"""From request rows to response bodies: parse, decode, one batched CAM pass, render. No TorchServe in here.

Every failure stays in its own row, by mechanism: each row's preparation and rendering runs inside
:func:`contained`, which turns a :class:`ClientError` into its 4xx and any other exception into that row's 500; when
the batched engine call itself fails, the batch's rows are explained one by one, so that only the row that really
fails gets the 500.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from camserve.api import (
    DEFAULT_TOPK,
    ExplainOptions,
    ExplainResponse,
    Explanation,
    ModelInfo,
    Prediction,
    WorkBudget,
    parse_request,
)
from camserve.cam import (
    DEFAULT_METHOD,
    CamEngine,
    CamRequest,
    Classes,
    LayerNotFoundError,
    method_record,
    normalize_map,
)
from camserve.errors import ClientError
from camserve.faithfulness import Faithfulness, faithfulness
from camserve.faithfulness import forward_passes as faithfulness_passes
from camserve.imaging import (
    DecodeLimits,
    clip_map,
    encode_heatmap_png16,
    encode_image,
    load_rgb,
    map_at,
    open_image,
    render_overlay,
    resize_for_model,
    resize_image,
    snap_to_decode_scale,
    to_base64,
)
from camserve.model import images_to_batch
from camserve.spec import ModelSpec
from camserve.tasks import task_named

logger = logging.getLogger(__name__)

__all__ = ["ExplanationService", "PreparedRequest", "RowResult", "contained"]


@dataclass(frozen=True)
class RowResult:
    """The HTTP status and JSON body for one request row."""

    status: int
    body: dict[str, object]


def internal_error(what: str) -> RowResult:
    """A 500 for one row; the traceback is in the log, next to the request id the handler adds."""
    return RowResult(500, {"code": 500, "type": "InternalError", "message": f"{what} failed on the server"})


def contained(step: str, work: Callable[[], object]) -> object | RowResult:
    """``work()``, or the row's own error result: a ClientError's 4xx, or a 500 for anything else (logged)."""
    try:
        return work()
    except ClientError as error:
        return RowResult(error.status, error.to_dict())
    except Exception:
        logger.exception("%s failed for one request; its batch neighbours are answered", step)
        return internal_error(step)


class _ByteCount:
    """The bytes a batch's responses add up to, under a limit; thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit, self.total, self._lock = limit, 0, threading.Lock()

    def reserve(self, size: int) -> None:
        with self._lock:
            if self.total + size > self.limit:
                raise ClientError(
                    "ResponseTooLarge",
                    f"this response ({size} bytes) and those of the requests served in the same batch would exceed "
                    f"{self.limit} bytes together, TorchServe's limit for one batch: ask for a smaller max_side, "
                    "format jpeg or no heatmap, or send it again",
                )
            self.total += size


@dataclass
class PreparedRequest:
    """A decoded request: its options, what the engine explains, the image at output size (released once rendered)
    and the model-sized copy."""

    options: ExplainOptions
    cam: CamRequest
    display: np.ndarray | None
    model_input: np.ndarray
    width: int
    """The uploaded image's upright size."""
    height: int


@dataclass
class ExplanationService:
    """Serves explanations of the model that ``spec`` describes: ``answer(rows)`` gives one :class:`RowResult` per
    row, in order."""

    engine: CamEngine
    spec: ModelSpec
    device: torch.device
    model_name: str | None = None
    """The name responses give the model (TorchServe's registered name); None: the spec's."""
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    budget: WorkBudget = field(default_factory=WorkBudget)
    channels_last_from: int = 0
    """Batches of at least this many images run in the channels_last memory format; 0: none
    (:func:`camserve.model.channels_last_from`)."""
    threads: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    """Requests decoded and rendered at once, one per thread: OpenCV and Pillow release the GIL while they work."""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """How long each stage of the last call took: decode, forward, cam, encode."""

    def __post_init__(self) -> None:
        spec = self.spec
        self.task = task_named(spec.task)
        self.engine.head = self.task.head  # the task decides what an explanation differentiates
        self.model_info = ModelInfo(
            self.model_name or spec.name, spec.version, spec.weights, spec.arch, spec.num_classes, spec.task
        )
        # The budget reads layer shapes per request: probe them now, once, not from the request threads at once.
        self.engine.layers()
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.threads))

    def answer(self, rows: Sequence[Mapping[str, object]]) -> list[RowResult]:
        started = time.perf_counter()
        prepared = list(self._pool.map(lambda row: contained("preparing the request", lambda: self.prepare(row)), rows))
        self.stage_seconds = {"decode": time.perf_counter() - started}
        valid = [index for index, item in enumerate(prepared) if isinstance(item, PreparedRequest)]
        results = list(prepared)  # refusals stay in place; each valid request is replaced by its answer
        if valid:
            for index, result in zip(valid, self.explain([prepared[i] for i in valid]), strict=True):
                results[index] = result
        return results

    def prepare(self, row: Mapping[str, object]) -> PreparedRequest:
        """Parse, check the budget from the header, then decode one row; a :class:`ClientError` says why not."""
        request = parse_request(row)
        classes = self.spec.num_classes
        options = replace(
            request.options,
            layer=request.options.layer or self.spec.default_layer,
            topk=min(request.options.topk or DEFAULT_TOPK, classes),
            threshold=self.spec.threshold if request.options.threshold is None else request.options.threshold,
        )
        self._check_method(options.method)
        if options.layer not in self.spec.layers:
            raise ClientError("InvalidOption", str(LayerNotFoundError(options.layer, list(self.spec.layers))))
        if options.target is not None and max(options.target) >= classes:
            raise ClientError(
                "InvalidOption",
                f"target must be a class index from 0 to {classes - 1} (this model has {classes} classes), "
                f"got {list(options.target)}",
            )
        if options.target is None and (options.explain or 1) > classes:
            raise ClientError(
                "InvalidOption",
                f"explain must be at most {classes} (this model has {classes} classes), got {options.explain}",
            )
        targets = (
            Classes(options.target)
            if options.target is not None
            else self.task.default_target(options.explain, options.threshold, classes)
        )
        cam = CamRequest(targets, options.layer, options.method, options.eigen_smooth, options.aug_smooth)
        opened = open_image(request.image, self.limits)
        output = snap_to_decode_scale(opened, self.budget.output_size(opened.width, opened.height, options.max_side))
        explanations = targets.count  # at most: a multi-label model explains only its positive classes of these
        measuring = explanations * faithfulness_passes(options.faithfulness_steps) if options.faithfulness else 0
        method_passes = self.engine.forward_passes(cam)
        self.budget.check(explanations, output, options.method, method_passes, measuring)
        side = self.spec.input_size
        rgb = load_rgb(opened, at_least=(max(output[0], side), max(output[1], side)))
        return PreparedRequest(
            options, cam, resize_image(rgb, output), resize_for_model(rgb, side), opened.width, opened.height
        )

    def _check_method(self, method: str) -> None:
        """Refuse a method that cannot explain this task's outputs, saying why and what works instead."""
        if method_record(method).seeds is not None and not self.task.exclusive:
            raise ClientError(
                "InvalidOption",
                f"method {method} contrasts a class with its look-alike classes under a softmax, which a "
                f"{self.task.name} model does not have: choose another method, such as {DEFAULT_METHOD}",
            )

    def explain(self, prepared: list[PreparedRequest]) -> list[RowResult]:
        """One forward pass for the whole batch; if that fails, each request alone, so only the culprit fails."""
        try:
            return self._explain_together(prepared)
        except Exception:
            if len(prepared) == 1:
                logger.exception("explaining a request failed")
                return [internal_error("the explanation")]
            logger.exception("the batched explanation of %d requests failed; explaining each alone", len(prepared))
            return [self.explain([item])[0] for item in prepared]

    def _explain_together(self, prepared: list[PreparedRequest]) -> list[RowResult]:
        started = time.perf_counter()
        channels_last = 0 < self.channels_last_from <= len(prepared)
        batch = images_to_batch([item.model_input for item in prepared], self.spec, self.device, channels_last)
        output = self.engine(batch, [item.cam for item in prepared])
        scores = self.task.scores(output.logits).cpu()  # one copy off the device for the whole batch
        self.stage_seconds["forward"] = output.seconds["forward"]
        self.stage_seconds["cam"] = time.perf_counter() - started - output.seconds["forward"]
        started = time.perf_counter()
        labels = self.spec.labels
        predictions = [
            self.task.predictions(row, item.options.topk, labels, item.options.threshold)
            for item, row in zip(prepared, scores, strict=True)
        ]
        target_probabilities = [scores[n, targets].tolist() for n, targets in enumerate(output.targets)]
        measured = self._faithfulness(prepared, batch, output, target_probabilities)
        # The maps leave the device here, at the layer's resolution: the render threads only call NumPy and OpenCV.
        maps = [m.float().cpu().numpy() for m in output.maps]

        # TorchServe passes a batch's responses to its frontend as one message, which must fit max_response_size:
        # the batch's bytes are counted together, and the request that would overflow them is refused alone.
        sent = _ByteCount(self.budget.max_response_bytes)

        def respond(n: int) -> RowResult:
            return contained(
                "rendering the explanation",
                lambda: self._respond(
                    prepared[n],
                    predictions[n],
                    output.targets[n],
                    target_probabilities[n],
                    maps[n],
                    sent,
                    measured.get(n),
                ),
            )

        results = list(self._pool.map(respond, range(len(prepared))))
        self.stage_seconds["encode"] = time.perf_counter() - started
        return results

    def _faithfulness(
        self, prepared: list[PreparedRequest], batch: torch.Tensor, output, target_probabilities: list[list[float]]
    ) -> dict[int, list[Faithfulness]]:
        """Each asking request's explanations measured (``camserve.faithfulness``), in one batched run per step
        count across the whole batch: the maps at the model's input size, the input, p(x) from the forward pass."""
        asking: dict[int, list[int]] = {}
        for n, item in enumerate(prepared):
            if item.options.faithfulness:
                asking.setdefault(item.options.faithfulness_steps, []).append(n)
        measured: dict[int, list[Faithfulness]] = {}
        side = (batch.shape[-2], batch.shape[-1])
        for steps, rows in asking.items():
            counts = [len(output.targets[n]) for n in rows]
            image_of_pair = torch.repeat_interleave(torch.tensor(rows, device=batch.device), torch.tensor(counts))
            maps = torch.cat([normalize_map(output.maps[n], side) for n in rows])
            classes = torch.tensor([c for n in rows for c in output.targets[n]], device=batch.device)
            p_x = torch.tensor([p for n in rows for p in target_probabilities[n]])
            results = faithfulness(
                self.engine.logits, batch[image_of_pair], maps, classes, p_x, steps=steps, scores=self.task.scores
            )
            results = iter(results)
            for n, count in zip(rows, counts, strict=True):
                measured[n] = [next(results) for _ in range(count)]
        return measured

    def _respond(
        self,
        item: PreparedRequest,
        predictions: list[Prediction],
        targets: list[int],
        target_probabilities: list[float],
        maps: np.ndarray,
        sent: _ByteCount,
        measured: list[Faithfulness] | None = None,
    ) -> RowResult:
        """Render one target at a time at the output size, stopping as soon as the response would be too large."""
        response_bytes = 2048  # the predictions and the JSON around the images
        try:
            size = (item.display.shape[0], item.display.shape[1])
            explanations = []
            for index, (target, probability, cam) in enumerate(zip(targets, target_probabilities, maps, strict=True)):
                heatmap = map_at(cam, size)
                explanation = self._render(item, target, probability, heatmap)
                if measured is not None:
                    explanation = replace(explanation, faithfulness=asdict(measured[index]))
                response_bytes += len(explanation.overlay) + len(explanation.heatmap or "") + 512
                self.budget.check_response(response_bytes)
                explanations.append(explanation)
            sent.reserve(response_bytes)
        finally:
            item.display = None  # the image is rendered (or refused): release it before the batch is done
        response = ExplainResponse(self.model_info, item.width, item.height, predictions, explanations)
        return RowResult(200, response.to_dict())

    def _render(self, item: PreparedRequest, target: int, probability: float, heatmap: np.ndarray) -> Explanation:
        options = item.options
        if options.clip is not None:
            heatmap = clip_map(heatmap, *options.clip)
        overlay = render_overlay(
            item.display, heatmap, options.alpha, options.colormap, options.overlay, options.region
        )
        return Explanation(
            index=target,
            label=self.spec.labels[target],
            **self.task.explained(probability),
            method=options.method,
            layer=options.layer,
            format=options.format,
            width=overlay.shape[1],
            height=overlay.shape[0],
            overlay=to_base64(encode_image(overlay, options.format)),
            heatmap=to_base64(encode_heatmap_png16(heatmap)) if options.heatmap else None,
        )
