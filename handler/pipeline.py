"""From request rows to response bodies: parse, decode, one batched CAM pass, render. No TorchServe in here.

One bad row fails only itself: it comes back as its own 4xx result while the rest of the batch is answered.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from handler.cam import CamEngine, CamRequest, LayerNotFoundError, normalize_map, spatial_layers
from handler.contract import (
    ExplainOptions,
    ExplainResponse,
    Explanation,
    ModelInfo,
    Prediction,
    parse_request,
)
from handler.errors import ClientError
from handler.imaging import (
    DecodeLimits,
    decode_image,
    encode_heatmap_png16,
    encode_image,
    render_overlay,
    resize_for_model,
    to_base64,
)
from handler.model import INPUT_SIZE, images_to_batch

logger = logging.getLogger(__name__)

__all__ = ["ExplanationService", "PreparedRequest", "RowResult"]


@dataclass(frozen=True)
class RowResult:
    """The HTTP status and JSON body for one request row."""

    status: int
    body: dict[str, object]


def cam_request(options: ExplainOptions) -> CamRequest:
    """What the engine needs of a request's options."""
    return CamRequest(classes=options.target, top=options.explain, layer=options.layer, method=options.method)


@dataclass(frozen=True)
class PreparedRequest:
    """A decoded request: its options, the upright RGB image and the model-sized copy."""

    options: ExplainOptions
    rgb: np.ndarray
    model_input: np.ndarray


@dataclass
class ExplanationService:
    """Serves explanations of one model: ``answer(rows)`` gives one :class:`RowResult` per row, in order."""

    engine: CamEngine
    labels: Sequence[str]
    model_info: ModelInfo
    device: torch.device
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    channels_last: bool = False
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """How long each stage of the last call took: decode, forward, cam, encode."""
    _pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)), repr=False
    )
    """Decoding and encoding run one request per thread: OpenCV and Pillow release the GIL while they work."""
    layers: Sequence[str] = ()
    """The layers requests may name; by default every layer of the model that gives a spatial map."""

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = spatial_layers(self.engine.model)

    def answer(self, rows: Sequence[Mapping[str, object]]) -> list[RowResult]:
        started = time.perf_counter()
        prepared = list(self._pool.map(self._prepare_or_refuse, rows))
        self.stage_seconds = {"decode": time.perf_counter() - started}
        valid = [index for index, item in enumerate(prepared) if isinstance(item, PreparedRequest)]
        results = list(prepared)  # refusals stay in place; each valid request is replaced by its answer
        if valid:
            for index, result in zip(valid, self.explain([prepared[i] for i in valid]), strict=True):
                results[index] = result
        return results

    def prepare(self, row: Mapping[str, object]) -> PreparedRequest:
        """Parse and decode one row; a :class:`ClientError` says why it cannot be served."""
        request = parse_request(row)
        if request.options.layer not in self.layers:
            raise ClientError("InvalidOption", str(LayerNotFoundError(request.options.layer, self.layers)))
        rgb = decode_image(request.image, self.limits)
        return PreparedRequest(request.options, rgb, resize_for_model(rgb, INPUT_SIZE))

    def _prepare_or_refuse(self, row: Mapping[str, object]) -> PreparedRequest | RowResult:
        try:
            return self.prepare(row)
        except ClientError as error:
            return RowResult(error.status, error.to_dict())

    def explain(self, prepared: list[PreparedRequest]) -> list[RowResult]:
        """One forward pass and one gradient call for the whole batch, then each request's overlays in parallel."""
        started = time.perf_counter()
        batch = images_to_batch([item.model_input for item in prepared], self.device, self.channels_last)
        output = self.engine(batch, [cam_request(item.options) for item in prepared])
        probabilities = output.logits.float().softmax(dim=1).cpu()  # one copy off the device for the whole batch
        top_probabilities, top_indices = probabilities.topk(max(item.options.topk for item in prepared), dim=1)
        top_probabilities, top_indices = top_probabilities.tolist(), top_indices.tolist()
        self.stage_seconds["forward"] = self.engine.seconds["forward"]
        self.stage_seconds["cam"] = time.perf_counter() - started - self.engine.seconds["forward"]
        started = time.perf_counter()
        predictions = [
            [
                Prediction(index=i, label=self.labels[i], probability=round(p, 6))
                for i, p in zip(indices[: item.options.topk], probabilities[: item.options.topk])
            ]
            for item, indices, probabilities in zip(prepared, top_indices, top_probabilities)
        ]
        target_probabilities = [probabilities[n, targets].tolist() for n, targets in enumerate(output.targets)]
        results = list(
            self._pool.map(self._respond, prepared, predictions, output.targets, target_probabilities, output.maps)
        )
        self.stage_seconds["encode"] = time.perf_counter() - started
        return results

    def _respond(
        self,
        item: PreparedRequest,
        predictions: list[Prediction],
        targets: list[int],
        target_probabilities: list[float],
        maps: torch.Tensor,
    ) -> RowResult:
        try:
            heatmaps = normalize_map(maps, item.rgb.shape[:2]).cpu().numpy()
            explanations = [
                self._render(item, target, probability, heatmap)
                for target, probability, heatmap in zip(targets, target_probabilities, heatmaps)
            ]
        except Exception:  # one request's rendering must not fail its batch neighbours
            logger.exception("rendering the explanation failed")
            return RowResult(500, {"code": 500, "type": "InternalError", "message": "rendering failed"})
        height, width = item.rgb.shape[:2]
        return RowResult(200, ExplainResponse(self.model_info, width, height, predictions, explanations).to_dict())

    def _render(self, item: PreparedRequest, target: int, probability: float, heatmap: np.ndarray) -> Explanation:
        options = item.options
        overlay = render_overlay(item.rgb, heatmap, options.alpha, options.colormap)
        return Explanation(
            index=target,
            label=self.labels[target],
            probability=round(probability, 6),
            method=options.method,
            layer=options.layer,
            format=options.format,
            overlay=to_base64(encode_image(overlay, options.format)),
            heatmap=to_base64(encode_heatmap_png16(heatmap)) if options.heatmap else None,
        )
