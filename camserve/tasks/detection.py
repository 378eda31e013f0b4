"""Detectors: boxes, each explained by its box score (pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``, in
:mod:`camserve.cam.detection`). A detector takes its images at their own sizes, one forward pass per batch; its
response lists its detections, each explained one's overlay with its box and label drawn on it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import ClassVar

import cv2
import numpy as np
import torch

from camserve.api import DetectionItem, ExplainOptions, ExplainResponse
from camserve.cam import (
    DETECTION_METHOD,
    METHODS,
    PYRAMID_METHOD,
    CamEngine,
    CamRequest,
    Classes,
    Method,
    Target,
    TopPredicted,
    normalize_map,
)
from camserve.cam.detection import DetectionOutput, DetectionRequest, explain_detections, matched_score
from camserve.cam.layers import Layout
from camserve.errors import ClientError
from camserve.faithfulness import Faithfulness, faithfulness
from camserve.imaging import OpenedImage, encode_binary_mask, fit_within, load_rgb, resize_image, to_base64
from camserve.medical import grey_to_rgb
from camserve.overlays import draw_detection
from camserve.pixels import load_gray
from camserve.tasks.base import Task
from camserve.work import BatchBytes, PreparedRequest, ResponseSize, RowResult, ServiceView, contained, render

__all__ = ["DETECTION", "Detection"]


@dataclass(frozen=True)
class Detection(Task):
    """A detector: its detections above a score, each explained by its box score."""

    kind: ClassVar[str] = "detection"
    options: ClassVar[frozenset[str]] = frozenset({"detection", "score_threshold", "max_detections"})
    probes_layers: ClassVar[bool] = False
    figure: ClassVar[str] = "score"

    def targets(self, options: ExplainOptions, classes: int) -> Target:
        """The detections a request names, by index among those kept, or its top ``explain`` (3)."""
        if options.detection is None:
            return TopPredicted(min(options.explain or self.default_explain, options.max_detections))
        if max(options.detection) >= options.max_detections:
            raise ClientError(
                "InvalidOption",
                f"detection must be an index below max_detections ({options.max_detections}), got "
                f"{list(options.detection)}",
            )
        return Classes(options.detection)

    def model_input(
        self, opened: OpenedImage, output: tuple[int, int], side: int, channels: int = 3, window=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The image at its own size, at most ``side`` on its longer side."""
        size = fit_within(opened.width, opened.height, side)
        if opened.precise or window is not None:  # a DICOM through its window, a 16-bit grayscale
            rgb = grey_to_rgb(load_gray(opened, window))
        else:
            rgb = load_rgb(opened, at_least=(max(output[0], size[0]), max(output[1], size[1])))
        return rgb, resize_image(rgb, size)

    def default_method(self, layout: str) -> str:
        """HiResCAM (the registry's ``DETECTION_METHOD``), or EigenCAM at a feature pyramid."""
        return PYRAMID_METHOD if Layout(layout).pyramid else DETECTION_METHOD

    def check_method(self, record: Method, layer: str, layout: str) -> None:
        pyramid = Layout(layout).pyramid
        working = [
            name for name, other in METHODS.items() if other.activations_only or (other.any_scalar and not pyramid)
        ]
        if record.name in working:
            return
        if not record.uses_gradients:
            why = f"method {record.name} scores extra passes by a class score, which a detector's boxes do not give"
        elif pyramid:
            why = f"layer {layer} is a feature pyramid, which a gradient method cannot weigh as one map"
        else:
            why = f"method {record.name} needs a second derivative or a softmax over classes, which a detector lacks"
        raise ClientError("InvalidOption", f"{why}: on this layer a detector takes {', '.join(working)}")

    def forward_passes(self, engine: CamEngine, cam: CamRequest) -> int:
        """Its one forward pass, and a backward pass per explained detection for a gradient method."""
        record = METHODS[cam.method]
        return 1 + cam.count * record.uses_gradients

    def explain(self, service: ServiceView, prepared: list[PreparedRequest]) -> list[RowResult]:
        """One forward pass of the images at their own sizes (:mod:`camserve.cam.detection`), then each request's
        detections, explanations and faithfulness."""
        started = time.perf_counter()
        images = [
            torch.tensor(item.model_input, device=service.device).permute(2, 0, 1).float().div_(255.0)
            for item in prepared
        ]
        requests = [_request(item) for item in prepared]
        layouts = {request.layer: service.spec.layers[request.layer] for request in requests}
        engine = service.engine
        output = explain_detections(engine.model, images, requests, layouts, engine.autocast(service.device))
        service.stage_seconds["forward"] = output.seconds["forward"]
        service.stage_seconds["cam"] = time.perf_counter() - started - output.seconds["forward"]
        started = time.perf_counter()
        measured = {
            n: _faithfulness(engine, images[n], output, n, item.options.faithfulness_steps)
            for n, item in enumerate(prepared)
            if item.options.faithfulness and output.errors[n] is None and output.explained[n]
        }
        maps = [m.float().cpu().numpy() for m in output.maps]
        masks = [None if m is None else m.cpu().numpy() for m in output.masks]
        sent = BatchBytes(service.budget.max_response_bytes)

        def respond(n: int) -> RowResult:
            if output.errors[n] is not None:
                prepared[n].display = None
                return RowResult(400, ClientError("InvalidOption", output.errors[n]).to_dict())
            return contained(
                "rendering the explanation",
                lambda: _respond(service, self, prepared[n], output, n, maps[n], masks[n], sent, measured.get(n)),
            )

        results = list(service.pool.map(respond, range(len(prepared))))
        service.stage_seconds["encode"] = time.perf_counter() - started
        return results


def _request(item: PreparedRequest) -> DetectionRequest:
    options, targets = item.options, item.cam.targets
    chosen = targets.indices if isinstance(targets, Classes) else None
    return DetectionRequest(
        options.layer, options.method, options.eigen_smooth, options.score_threshold, options.max_detections,
        explain=targets.count, chosen=chosen,
    )  # fmt: skip


def _faithfulness(engine: CamEngine, image: torch.Tensor, output: DetectionOutput, n: int, steps: int):
    """Faithfulness of image ``n``'s explained detections: p is the score of the detection's matched box
    (:func:`camserve.cam.detection.matched_score`); deletion fills with the detector's own mean colour."""
    explained = output.explained[n]
    detections = [output.detections[n][d] for d in explained]
    boxes = [torch.tensor(d.box) for d in detections]
    model = engine.model
    mean = getattr(getattr(model, "transform", None), "image_mean", None) or [0.0, 0.0, 0.0]

    def detect(batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        with torch.no_grad(), engine.autocast(batch.device):
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


def _items(labels, output: DetectionOutput, n: int, masks, to_image, shape) -> tuple[list, list[str]]:
    """The image's detections in the uploaded image's pixels, with their masks at the overlay's ``shape``."""
    items, mask_texts = [], []
    keypoints = output.keypoints[n]
    for index, detection in enumerate(output.detections[n]):
        mask = None
        if masks is not None:
            inside = cv2.resize(masks[index], (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR) > 0.5
            mask = to_base64(encode_binary_mask(inside))
            mask_texts.append(mask)
        points = None
        if keypoints is not None:
            points = [
                [round(x * to_image[0], 2), round(y * to_image[1], 2), round(v, 3)]
                for x, y, v in keypoints[index].tolist()
            ]
        box = _scaled(detection.box, to_image)
        items.append(DetectionItem(index, box, detection.label, labels[detection.label], detection.score, mask, points))
    return items, mask_texts


def _scaled(box: tuple[float, ...], scale: tuple[float, float]) -> list[float]:
    return [round(v * scale[i % 2], 2) for i, v in enumerate(box)]


def _respond(
    service: ServiceView,
    task: Task,
    item: PreparedRequest,
    output: DetectionOutput,
    n: int,
    maps: np.ndarray,
    masks: np.ndarray | None,
    sent: BatchBytes,
    measured: list[Faithfulness] | None,
) -> RowResult:
    """A detector's response: the detections in the uploaded image's pixels, each explained one's overlay with
    its box and label drawn on it."""
    size, labels = ResponseSize(service.budget), service.spec.labels
    try:
        shape = item.display.shape[:2]
        model_h, model_w = item.model_input.shape[:2]
        to_image = (item.width / model_w, item.height / model_h)
        to_display = (shape[1] / model_w, shape[0] / model_h)
        items, mask_texts = _items(labels, output, n, masks, to_image, shape)
        for text in mask_texts:
            size.add(text)
        explanations = []
        for slot, (index, cam) in enumerate(zip(output.explained[n], maps, strict=True)):
            detection = output.detections[n][index]
            text = f"{labels[detection.label]} {detection.score:.2f}"
            decorate = partial(draw_detection, box=_scaled(detection.box, to_display), text=text)
            explanation = render(
                item, detection.label, labels[detection.label], task.explained(detection.score), cam, decorate,
            )  # fmt: skip
            explanation = replace(
                explanation,
                detection=index,
                box=_scaled(detection.box, to_image),
                faithfulness=None if measured is None else asdict(measured[slot]),
            )
            size.add_explanation(explanation)
            explanations.append(explanation)
        sent.reserve(size.total)
    finally:
        item.display = None
    response = ExplainResponse(service.model_info, item.width, item.height, None, explanations, detections=items)
    return RowResult(200, response.to_dict())


DETECTION = Detection("detection", None, default_explain=3)
"""IoU + score of the matching box (FasterRCNNBoxScoreTarget, :mod:`camserve.cam.detection`), not an engine head."""
