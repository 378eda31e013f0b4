"""TorchServe entry point: the model lifecycle, the device, batching and per-request status. No math, no pixels.

TorchServe loads a handler module only if it defines exactly one class: helpers live in the ``handler`` package.
"""

from __future__ import annotations

import logging
import os
import time
from http import HTTPStatus
from pathlib import Path

import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handler.cam import CamEngine
from handler.contract import ModelInfo
from handler.imaging import DecodeLimits
from handler.model import autocast_dtype, build_resnet50, load_state_dict_file, read_labels, select_device
from handler.pipeline import ExplanationService

logger = logging.getLogger(__name__)


class GradCamHandler(BaseHandler):
    """ResNet-50 predictions with a Grad-CAM overlay in the same response.

    ``/predictions`` and ``/explanations`` give the same answer. Settings come from the ``handler:`` section of
    the archive's model-config.yaml: ``weights`` (the name responses report), ``scorecam_channels``,
    ``precision`` (fp32, bf16, fp16 on CUDA), ``channels_last``, ``torch_threads`` (default: cores ÷ maxWorkers)
    and ``limits`` (``max_bytes``, ``max_pixels``, ``min_side``).
    """

    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        model_config = context.model_yaml_config or {}
        settings = model_config.get("handler", {}) or {}
        self.device = select_device(properties.get("gpu_id"))
        if self.device.type == "cpu":
            # workers × threads ≤ cores: each of maxWorkers workers takes its share of the cores unless told.
            share = max(1, (os.cpu_count() or 1) // max(1, int(model_config.get("maxWorkers", 1))))
            torch.set_num_threads(int(settings.get("torch_threads") or share))
        channels_last = bool(settings.get("channels_last", False))
        manifest_model = context.manifest["model"]
        state_dict = load_state_dict_file(model_dir / manifest_model["serializedFile"])
        model = build_resnet50(state_dict, channels_last=channels_last).to(self.device)
        precision = autocast_dtype(str(settings.get("precision", "fp32")), self.device)
        self.service = ExplanationService(
            engine=CamEngine(
                model, autocast_dtype=precision, scorecam_channels=int(settings.get("scorecam_channels", 64))
            ),
            labels=read_labels(model_dir / "index_to_name.json"),
            model_info=ModelInfo(
                name=context.model_name,
                version=str(manifest_model.get("modelVersion", "")),
                weights=str(settings.get("weights", "unknown")),
            ),
            device=self.device,
            limits=DecodeLimits(**settings.get("limits", {})),
            channels_last=channels_last,
        )
        self.model = model
        self.context = context
        self.manifest = context.manifest
        self.initialized = True
        logger.info("resnet50 Grad-CAM ready on %s with %s weights", self.device, self.service.model_info.weights)

    def handle(self, data: list[dict], context) -> list[dict]:
        started = time.perf_counter()
        results = self.service.answer(data)
        request_ids = getattr(context, "request_ids", None)
        # Behind a KServe envelope the rows are one request's instances: a refused instance answers with its error
        # object inside the envelope's list, and the HTTP status stays the request's.
        one_row_per_request = not request_ids or len(request_ids) == len(results)
        for index, result in enumerate(results if one_row_per_request else []):
            context.set_response_content_type(index, "application/json")
            if result.status != HTTPStatus.OK:
                context.set_response_status(result.status, HTTPStatus(result.status).phrase, index)
        elapsed_ms = (time.perf_counter() - started) * 1000
        refused = sum(result.status != HTTPStatus.OK for result in results)
        self._report_metrics(context.metrics, elapsed_ms, results, refused)
        logger.info("answered a batch of %d requests (%d refused) in %.1f ms", len(data), refused, elapsed_ms)
        return [result.body for result in results]

    def _report_metrics(self, metrics, elapsed_ms: float, results: list, refused: int) -> None:
        """The metrics declared in metrics.yaml: stage times, batch size, explanations served, refusals."""
        metrics.add_time("HandlerTime", round(elapsed_ms, 2), None, "ms")
        names = {"decode": "DecodeTime", "forward": "ForwardTime", "cam": "CamTime", "encode": "EncodeTime"}
        for stage, seconds in self.service.stage_seconds.items():
            metrics.add_time(names[stage], round(seconds * 1000, 2), None, "ms")
        metrics.add_metric("BatchSize", len(results), "count", None, metric_type=MetricTypes.GAUGE)
        served = sum(len(r.body["explanations"]) for r in results if r.status == HTTPStatus.OK)
        metrics.add_counter("ExplanationsServed", served)
        metrics.add_counter("RequestsRefused", refused)
