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
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch

from camserve import settings as serving
from camserve.api import (
    DEFAULT_MAX_DETECTIONS,
    DEFAULT_SCORE_THRESHOLD,
    DEFAULT_TOPK,
    DetectionItem,
    ExplainOptions,
    ExplainResponse,
    Explanation,
    ModelInfo,
    Prediction,
    Segment,
    WorkBudget,
    check_fit,
    parse_request,
)
from camserve.cam import (
    DEFAULT_METHOD,
    DETECTION_METHOD,
    METHODS,
    PYRAMID_METHOD,
    CamEngine,
    CamRequest,
    Classes,
    Family,
    LayerNotFoundError,
    TopPredicted,
    method_record,
    normalize_map,
)
from camserve.cam.detection import (
    DetectionOutput,
    DetectionRequest,
    explain_detections,
    matched_score,
)
from camserve.cam.sanity import Sanity, SanityFigure, sanity_passes
from camserve.errors import ClientError
from camserve.faithfulness import Faithfulness, faithfulness
from camserve.faithfulness import forward_passes as faithfulness_passes
from camserve.imaging import (
    DecodeLimits,
    clip_map,
    draw_detection,
    encode_binary_mask,
    encode_class_mask,
    encode_heatmap_png16,
    encode_image,
    fit_within,
    load_rgb,
    map_at,
    open_image,
    outline_segment,
    render_overlay,
    resize_for_model,
    resize_image,
    snap_to_decode_scale,
    to_base64,
)
from camserve.model import autocast_dtype, channels_last_from, images_to_batch, load_model
from camserve.spec import SPEC_FILE, ModelSpec
from camserve.tasks import predicted_classes, task_named

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


def segment_probability(segments: torch.Tensor, classes: torch.Tensor, outputs: torch.Tensor, pairs: torch.Tensor):
    """A segment's mean probability: for each pair, softmax(outputs)[c] averaged over the pixels of its segment in the
    image that was explained (``segments`` (P, H, W) booleans, ``classes`` (P,)); what faithfulness measures."""
    probability = outputs.float().softmax(dim=1)[torch.arange(len(pairs)), classes[pairs]]
    inside = segments[pairs].float()
    return (probability * inside).sum(dim=(1, 2)) / inside.sum(dim=(1, 2)).clamp_min(1)


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
        # The budget reads layer shapes per request: probe them now, once, not from the request threads at once. A
        # detector's budget needs none, and its images come at their own sizes.
        if self.task.kind != "detection":
            self.engine.layers()
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.threads))
        self.sanity = Sanity(self.engine)  # its randomised copies are built on the first request that asks

    @classmethod
    def from_archive(
        cls,
        model_dir: str | Path,
        serialized_file: str,
        settings: Mapping[str, object],
        device: torch.device,
        model_name: str | None = None,
        threads: int | None = None,
    ) -> ExplanationService:
        """The service for an unpacked archive's model, as both runtimes serve it: its spec (``model_spec.json``),
        the weights ``serialized_file`` loaded onto ``device``, and the ``handler:`` settings of its
        model-config.yaml (``precision``, ``channels_last``, ``scorecam_channels``, ``limits``, ``budget``)."""
        model_dir = Path(model_dir)
        spec = ModelSpec.load(model_dir / SPEC_FILE)
        channels_last = channels_last_from(settings.get("channels_last", False))
        model = load_model(spec, model_dir / serialized_file, model_dir, device, channels_last=channels_last == 1)
        engine = CamEngine(
            model,
            autocast_dtype=autocast_dtype(str(settings.get("precision", "fp32")), device),
            scorecam_channels=int(settings.get("scorecam_channels", serving.SCORECAM_CHANNELS)),
            input_size=spec.input_size,
            default_layer=spec.default_layer,
        )
        return cls(
            engine=engine,
            spec=spec,
            model_name=model_name,
            device=device,
            limits=DecodeLimits(**settings.get("limits", {})),
            budget=WorkBudget(**settings.get("budget", {})),
            channels_last_from=channels_last,
            **({"threads": threads} if threads else {}),
        )

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
        task, classes = self.task, self.spec.num_classes
        check_fit(request.options, task.kind, task.name)
        given = request.options
        options = replace(
            given,
            layer=given.layer or self.spec.default_layer,
            topk=min(given.topk or DEFAULT_TOPK, classes),
            threshold=self.spec.threshold if given.threshold is None else given.threshold,
            score_threshold=DEFAULT_SCORE_THRESHOLD if given.score_threshold is None else given.score_threshold,
            max_detections=given.max_detections or DEFAULT_MAX_DETECTIONS,
        )
        if options.layer not in self.spec.layers:
            raise ClientError("InvalidOption", str(LayerNotFoundError(options.layer, list(self.spec.layers))))
        options = replace(options, method=given.method or self._default_method(options.layer))
        self._check_method(options.method, options.layer)
        targets = self._targets(options, classes)
        cam = CamRequest(targets, options.layer, options.method, options.eigen_smooth, options.aug_smooth)
        opened = open_image(request.image, self.limits)
        output = snap_to_decode_scale(opened, self.budget.output_size(opened.width, opened.height, options.max_side))
        explanations = targets.count  # at most: a multi-label model explains only its positive classes of these
        measuring = explanations * faithfulness_passes(options.faithfulness_steps) if options.faithfulness else 0
        method_passes = self._forward_passes(cam)
        checking = sanity_passes(self.engine, cam) if options.sanity else 0
        self.budget.check(explanations, output, options.method, method_passes, measuring, checking)
        side = self.spec.input_size
        if task.kind == "detection":  # the image at its own size, at most side on its longer side
            model_size = fit_within(opened.width, opened.height, side)
            rgb = load_rgb(opened, at_least=(max(output[0], model_size[0]), max(output[1], model_size[1])))
            model_input = resize_image(rgb, model_size)
        else:
            rgb = load_rgb(opened, at_least=(max(output[0], side), max(output[1], side)))
            model_input = resize_for_model(rgb, side)
        return PreparedRequest(options, cam, resize_image(rgb, output), model_input, opened.width, opened.height)

    def _targets(self, options: ExplainOptions, classes: int):
        """What a request explains: the classes (a detector's detections) it names, or the task's default."""
        if self.task.kind == "detection":
            if options.detection is not None:
                if max(options.detection) >= options.max_detections:
                    raise ClientError(
                        "InvalidOption",
                        f"detection must be an index below max_detections ({options.max_detections}), got "
                        f"{list(options.detection)}",
                    )
                return Classes(options.detection)
            return TopPredicted(min(options.explain or self.task.default_explain, options.max_detections))
        if options.target is not None and max(options.target) >= classes:
            raise ClientError(
                "InvalidOption",
                f"target must be {self.task.one} index from 0 to "
                f"{classes - 1} (this model has {classes} {self.task.what}), got {list(options.target)}",
            )
        if options.target is None and (options.explain or 1) > classes:
            raise ClientError(
                "InvalidOption",
                f"explain must be at most {classes} (this model has {classes} {self.task.what}), got {options.explain}",
            )
        if options.target is not None:
            return Classes(options.target)
        return self.task.default_target(options.explain, options.threshold, classes)

    def _forward_passes(self, cam: CamRequest) -> int:
        """The passes one request costs: the method record's count; for a detector, its one forward pass and a
        backward pass per explained detection for a gradient method."""
        if self.task.kind == "detection":
            return 1 + cam.count * (method_record(cam.method).family is Family.GRADIENT)
        return self.engine.forward_passes(cam)

    def _default_method(self, layer: str) -> str:
        """The method of a request that names none: Grad-CAM; for a detector, HiResCAM
        (the registry's ``DETECTION_METHOD``), or EigenCAM at a feature pyramid."""
        if self.task.kind != "detection":
            return DEFAULT_METHOD
        return PYRAMID_METHOD if self.spec.layers[layer] == "fpn" else DETECTION_METHOD

    def _check_method(self, method: str, layer: str) -> None:
        """Refuse a method that cannot explain this task's outputs at this layer, saying why and what works."""
        record = method_record(method)
        if record.seeds is not None and not self.task.exclusive:
            raise ClientError(
                "InvalidOption",
                f"method {method} contrasts a class with its look-alike classes under a softmax, which a "
                f"{self.task.name} model does not have: choose another method, such as {DEFAULT_METHOD}",
            )
        if self.task.kind == "detection":
            pyramid = self.spec.layers[layer] == "fpn"
            working = [
                name
                for name, other in METHODS.items()
                if other.family is Family.ACTIVATION
                or (other.family is Family.GRADIENT and not pyramid and not other.second_order and other.seeds is None)
            ]
            if method not in working:
                if record.family is not Family.GRADIENT:
                    why = f"method {method} scores extra passes by a class score, which a detector's boxes do not give"
                elif pyramid:
                    why = f"layer {layer} is a feature pyramid, which a gradient method cannot weigh as one map"
                else:
                    why = f"method {method} needs a second derivative or a softmax over classes, which a detector lacks"
                raise ClientError("InvalidOption", f"{why}: on this layer a detector takes {', '.join(working)}")
        why_not = record.applies(self.engine, layer) if record.applies is not None else None
        if why_not:
            raise ClientError("InvalidOption", f"method {method} does not apply here: {why_not}")

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
        if self.task.kind == "detection":
            return self._explain_detections(prepared)
        started = time.perf_counter()
        channels_last = 0 < self.channels_last_from <= len(prepared)
        batch = images_to_batch([item.model_input for item in prepared], self.spec, self.device, channels_last)
        checked = [item.cam if item.options.sanity else None for item in prepared]
        keep = self.sanity.keep([cam for cam in checked if cam is not None])
        output = self.engine(batch, [item.cam for item in prepared], keep=keep)
        checks = self.sanity.figures(batch, checked, output) if any(c is not None for c in checked) else {}
        scores = self.task.scores(output.logits).cpu()  # one copy off the device for the whole batch
        self.stage_seconds["forward"] = output.seconds["forward"]
        self.stage_seconds["cam"] = time.perf_counter() - started - output.seconds["forward"]
        started = time.perf_counter()
        labels = self.spec.labels
        segmenting = self.task.kind == "segmentation"
        predictions = [
            None if segmenting else self.task.predictions(row, item.options.topk, labels, item.options.threshold)
            for item, row in zip(prepared, scores, strict=True)
        ]
        target_probabilities = [scores[n, targets].tolist() for n, targets in enumerate(output.targets)]
        measured = self._faithfulness(prepared, batch, output, target_probabilities)
        # A segmenter's class per pixel, at the model's input size, leaves the device once for the batch.
        segmentation = predicted_classes(output.logits).to(torch.int32).cpu().numpy() if segmenting else None
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
                    None if segmentation is None else (segmentation[n], scores[n]),
                    checks.get(n),
                ),
            )

        results = list(self._pool.map(respond, range(len(prepared))))
        self.stage_seconds["encode"] = time.perf_counter() - started
        return results

    def _explain_detections(self, prepared: list[PreparedRequest]) -> list[RowResult]:
        """A detector's batch: one forward pass of the images at their own sizes (:mod:`camserve.cam.detection`),
        then each request's detections, explanations and faithfulness."""
        started = time.perf_counter()
        images = [
            torch.tensor(item.model_input, device=self.device).permute(2, 0, 1).float().div_(255.0) for item in prepared
        ]
        requests = []
        for item in prepared:
            options, targets = item.options, item.cam.targets
            chosen = targets.indices if isinstance(targets, Classes) else None
            requests.append(
                DetectionRequest(
                    options.layer, options.method, options.eigen_smooth, options.score_threshold,
                    options.max_detections, explain=targets.count, chosen=chosen,
                )
            )  # fmt: skip
        layouts = {request.layer: self.spec.layers[request.layer] for request in requests}
        output = explain_detections(self.engine.model, images, requests, layouts, self.engine.autocast(self.device))
        self.stage_seconds["forward"] = output.seconds["forward"]
        self.stage_seconds["cam"] = time.perf_counter() - started - output.seconds["forward"]
        started = time.perf_counter()
        measured = {
            n: self._detection_faithfulness(images[n], output, n, item.options.faithfulness_steps)
            for n, item in enumerate(prepared)
            if item.options.faithfulness and output.errors[n] is None and output.explained[n]
        }
        maps = [m.float().cpu().numpy() for m in output.maps]
        masks = [None if m is None else m.cpu().numpy() for m in output.masks]
        sent = _ByteCount(self.budget.max_response_bytes)

        def respond(n: int) -> RowResult:
            if output.errors[n] is not None:
                prepared[n].display = None
                return RowResult(400, ClientError("InvalidOption", output.errors[n]).to_dict())
            return contained(
                "rendering the explanation",
                lambda: self._respond_detections(prepared[n], output, n, maps[n], masks[n], sent, measured.get(n)),
            )

        results = list(self._pool.map(respond, range(len(prepared))))
        self.stage_seconds["encode"] = time.perf_counter() - started
        return results

    def _detection_faithfulness(
        self, image: torch.Tensor, output: DetectionOutput, n: int, steps: int
    ) -> list[Faithfulness]:
        """Faithfulness of image ``n``'s explained detections: p is the score of the detection's matched box
        (:func:`camserve.cam.detection.matched_score`); deletion fills with the detector's own mean colour."""
        explained = output.explained[n]
        detections = [output.detections[n][d] for d in explained]
        boxes = [torch.tensor(d.box) for d in detections]
        model = self.engine.model
        mean = getattr(getattr(model, "transform", None), "image_mean", None) or [0.0, 0.0, 0.0]

        def detect(batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
            with torch.no_grad(), self.engine.autocast(batch.device):
                return model(list(batch))

        def measure(outputs: list[dict[str, torch.Tensor]], rows: torch.Tensor) -> torch.Tensor:
            scores = [
                matched_score(found, boxes[row], detections[row].label)
                for found, row in zip(outputs, rows.tolist(), strict=True)
            ]
            return torch.tensor(scores)

        inputs = image[None].expand(len(explained), -1, -1, -1)
        maps = torch.stack([normalize_map(m[None])[0] for m in output.maps[n]]).to(image.device)
        p_x = torch.tensor([d.score for d in detections])
        classes = torch.zeros(len(explained), dtype=torch.long)
        return faithfulness(
            detect, inputs, maps, classes, p_x, steps=steps, batch=8, measure=measure,
            fill=torch.tensor(mean, dtype=image.dtype),
        )  # fmt: skip

    def _respond_detections(
        self,
        item: PreparedRequest,
        output: DetectionOutput,
        n: int,
        maps: np.ndarray,
        masks: np.ndarray | None,
        sent: _ByteCount,
        measured: list[Faithfulness] | None,
    ) -> RowResult:
        """A detector's response: the detections in the uploaded image's pixels, each explained one's overlay with
        its box and label drawn on it."""
        response_bytes = 2048
        try:
            height, width = item.display.shape[:2]
            model_h, model_w = item.model_input.shape[:2]
            to_image = (item.width / model_w, item.height / model_h)
            to_display = (width / model_w, height / model_h)

            def scaled(box: tuple[float, ...], scale: tuple[float, float]) -> list[float]:
                return [round(v * scale[i % 2], 2) for i, v in enumerate(box)]

            items = []
            keypoints = output.keypoints[n]
            for index, detection in enumerate(output.detections[n]):
                mask = None
                if masks is not None:
                    inside = cv2.resize(masks[index], (width, height), interpolation=cv2.INTER_LINEAR) > 0.5
                    mask = to_base64(encode_binary_mask(inside))
                    response_bytes += len(mask)
                points = None
                if keypoints is not None:
                    points = [
                        [round(x * to_image[0], 2), round(y * to_image[1], 2), round(v, 3)]
                        for x, y, v in keypoints[index].tolist()
                    ]
                items.append(
                    DetectionItem(
                        index, scaled(detection.box, to_image), detection.label, self.spec.labels[detection.label],
                        detection.score, mask, points,
                    )
                )  # fmt: skip
            explanations = []
            for slot, (index, cam) in enumerate(zip(output.explained[n], maps, strict=True)):
                detection = output.detections[n][index]
                heatmap = map_at(cam, (height, width))
                text = f"{self.spec.labels[detection.label]} {detection.score:.2f}"
                box = scaled(detection.box, to_display)
                explanation = self._render(
                    item, detection.label, detection.score, heatmap, partial(draw_detection, box=box, text=text)
                )
                explanation = replace(
                    explanation,
                    detection=index,
                    box=scaled(detection.box, to_image),
                    faithfulness=None if measured is None else asdict(measured[slot]),
                )
                response_bytes += len(explanation.overlay) + len(explanation.heatmap or "") + 512
                self.budget.check_response(response_bytes)
                explanations.append(explanation)
            sent.reserve(response_bytes)
        finally:
            item.display = None
        response = ExplainResponse(self.model_info, item.width, item.height, None, explanations, detections=items)
        return RowResult(200, response.to_dict())

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
            measure = None
            if self.task.kind == "segmentation":  # the segment's mean probability, over its pixels in x
                logits = output.logits[image_of_pair]
                measure = partial(segment_probability, predicted_classes(logits) == classes.view(-1, 1, 1), classes)
                p_x = measure(logits, torch.arange(len(classes), device=logits.device)).cpu()
            results = faithfulness(
                self.engine.logits, batch[image_of_pair], maps, classes, p_x, steps=steps, scores=self.task.scores,
                measure=measure,
            )  # fmt: skip
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
        segmentation: tuple[np.ndarray, torch.Tensor] | None = None,
        checked: list[SanityFigure] | None = None,
    ) -> RowResult:
        """Render one target at a time at the output size, stopping as soon as the response would be too large."""
        response_bytes = 2048  # the predictions and the JSON around the images
        segments = mask = classes = None
        try:
            size = (item.display.shape[0], item.display.shape[1])
            if segmentation is not None:  # a segmenter's classes per pixel at the overlay's size, and their shares
                classes = cv2.resize(segmentation[0], (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
                mask = to_base64(encode_class_mask(classes))
                response_bytes += len(mask)
                shares = segmentation[1].tolist()
                present = sorted((c for c, share in enumerate(shares) if share > 0), key=lambda c: -shares[c])
                segments = [Segment(c, self.spec.labels[c], round(shares[c], 6)) for c in present]
            explanations = []
            for index, (target, probability, cam) in enumerate(zip(targets, target_probabilities, maps, strict=True)):
                heatmap = map_at(cam, size)
                outline = None if classes is None else partial(outline_segment, inside=classes == target)
                explanation = self._render(item, target, probability, heatmap, outline)
                if measured is not None:
                    explanation = replace(explanation, faithfulness=asdict(measured[index]))
                if checked is not None:
                    figure = checked[index]
                    sanity = {"rank_correlation": figure.rank_correlation, "randomised": list(figure.randomised)}
                    explanation = replace(explanation, sanity=sanity)
                response_bytes += len(explanation.overlay) + len(explanation.heatmap or "") + 512
                self.budget.check_response(response_bytes)
                explanations.append(explanation)
            sent.reserve(response_bytes)
        finally:
            item.display = None  # the image is rendered (or refused): release it before the batch is done
        response = ExplainResponse(
            self.model_info, item.width, item.height, predictions, explanations, segments=segments, mask=mask
        )
        return RowResult(200, response.to_dict())

    def _render(
        self,
        item: PreparedRequest,
        target: int,
        probability: float,
        heatmap: np.ndarray,
        decorate: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> Explanation:
        """One explanation's overlay (drawn on by ``decorate``: a segment's outline, a detection's box), heatmap and
        figures."""
        options = item.options
        if options.clip is not None:
            heatmap = clip_map(heatmap, *options.clip)
        overlay = render_overlay(
            item.display, heatmap, options.alpha, options.colormap, options.overlay, options.region
        )
        if decorate is not None:
            overlay = decorate(overlay)
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
