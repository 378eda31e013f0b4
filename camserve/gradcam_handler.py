"""TorchServe entry point: the model lifecycle, the device, batching and per-request status. No math, no pixels.

TorchServe loads a handler module only if it defines exactly one class: helpers live in the ``camserve`` package.
"""

from __future__ import annotations

import logging
import os
import time
from http import HTTPStatus
from pathlib import Path

import cv2
import orjson
import psutil
import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

import camserve
from camserve.api import Request, is_envelope_instance, is_v2_input
from camserve.model import select_device
from camserve.pipeline import ExplanationService
from camserve.work import RowResult, internal_error

logger = logging.getLogger(__name__)


def _sibling_workers() -> int:
    """TorchServe's worker processes on this server, this one included (0 outside TorchServe)."""
    try:
        parent = psutil.Process().parent()
        children = parent.children() if parent else []
    except psutil.Error:
        return 0
    count = 0
    for child in children:
        try:
            count += any("model_service_worker" in part for part in child.cmdline())
        except psutil.Error:  # a worker that just exited
            continue
    return count


class GradCamHandler(BaseHandler):
    """Top-k predictions with a class activation map overlay in the same response, for the model in the archive's
    ``model_spec.json``.

    ``/predictions`` and ``/explanations`` give the same answer. Settings come from the ``handler:`` section of
    the archive's model-config.yaml: ``scorecam_channels``,
    ``precision`` (fp32, bf16, fp16 on CUDA), ``channels_last`` (true, false, or the smallest batch that runs
    channels_last), ``torch_threads`` (default: cores ÷ the workers
    running), ``limits`` (``max_bytes``, ``max_pixels``, ``min_side``) and ``budget`` (see ``WorkBudget``).
    """

    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        model_config = context.model_yaml_config or {}
        settings = model_config.get("handler", {}) or {}
        self.device = select_device(properties.get("gpu_id"))
        # OpenCV's own thread pool would compete with torch's threads and with the per-request decode/render
        # threads: requests run in parallel instead, each single-threaded inside OpenCV.
        cv2.setNumThreads(1)
        self.fixed_threads = int(settings.get("torch_threads") or 0)
        self._threads_checked = 0.0
        if self.fixed_threads and self.device.type == "cpu":
            torch.set_num_threads(self.fixed_threads)
        threads = self._share_cores()
        self.service = ExplanationService.from_archive(
            model_dir,
            context.manifest["model"]["serializedFile"],
            settings,
            self.device,
            model_name=context.model_name,
            threads=threads,
        )
        spec, model = self.service.spec, self.service.engine.model
        self.model = model
        self.context = context
        self.manifest = context.manifest
        self.initialized = True
        logger.info(
            "%s (%s, %d classes, %s weights) ready on %s; runtime from %s",
            context.model_name,
            spec.arch,
            spec.num_classes,
            spec.weights,
            self.device,
            Path(camserve.__file__).parent,
        )

    def handle(self, data: list[dict], context) -> list[bytes | str | dict]:
        """One body per row, never an exception: TorchServe would fail the whole batch with a 503 on one.

        Each body is its JSON already, made by orjson (TorchServe would otherwise run ``json.dumps(indent=2)``,
        45x slower), except the instances of a KServe v1 request, which its envelope serialises together."""
        started = time.perf_counter()
        request_ids = getattr(context, "request_ids", None) or {}
        # Behind a KServe envelope the rows are one request's instances, under that request's id.
        one_row_per_request = not any(is_envelope_instance(row) for row in data)
        requests = [
            Request.torchserve(row, request_ids.get(index if one_row_per_request else 0))
            for index, row in enumerate(data)
        ]
        try:
            self._share_cores()
            results = self.service.answer(requests)
        except Exception:  # the service contains each row's failures; this is the last line of defence
            logger.exception("answering a batch of %d requests failed", len(data))
            results = [internal_error("the batch")] * len(data)
        # A refused instance of a KServe envelope answers with its error object inside the envelope's list, and the
        # HTTP status stays 200, alone or beside good instances.
        bodies = []
        for index, result in enumerate(results):
            body = result.with_id(requests[index].id)
            if is_v2_input(data[index]):  # a v2 output of datatype BYTES holds strings: the response's JSON text
                bodies.append(orjson.dumps(body).decode())
            elif one_row_per_request:  # the JSON bytes themselves: TorchServe passes bytes through untouched
                bodies.append(orjson.dumps(body))
            else:  # the instances of one KServe v1 request: its envelope builds the one JSON answer
                bodies.append(body)
            if one_row_per_request:
                context.set_response_content_type(index, "application/json")
                if result.status != HTTPStatus.OK:
                    context.set_response_status(result.status, HTTPStatus(result.status).phrase, index)
        elapsed_ms = (time.perf_counter() - started) * 1000
        refused = sum(result.status != HTTPStatus.OK for result in results)
        try:
            self._report_metrics(context.metrics, elapsed_ms, results, refused)
        except Exception:  # metrics must never cost an answer
            logger.exception("reporting metrics failed")
        stages = ", ".join(f"{stage} {1000 * seconds:.1f}" for stage, seconds in self.service.stage_seconds.items())
        logger.info(
            "answered a batch of %d requests (%d refused) in %.1f ms (%s ms)", len(data), refused, elapsed_ms, stages
        )
        return bodies

    def _share_cores(self) -> int:
        """workers × threads ≤ cores, also after workers are scaled through the management API: every 10 s, count
        this server's worker processes (this one's siblings) and take this worker's share of the cores."""
        if self.device.type != "cpu":
            return min(8, os.cpu_count() or 1)
        now = time.monotonic()
        if self.fixed_threads or now - self._threads_checked < 10:
            return self.fixed_threads or torch.get_num_threads()
        self._threads_checked = now
        workers = max(1, _sibling_workers())
        share = max(1, (os.cpu_count() or 1) // max(1, workers))
        if share != torch.get_num_threads():
            torch.set_num_threads(share)
            logger.info("%d workers on %d cores: %d torch threads each", workers, os.cpu_count() or 1, share)
        return share

    def _report_metrics(self, metrics, elapsed_ms: float, results: list[RowResult], refused: int) -> None:
        """The metrics declared in metrics.yaml: stage times, batch size, explanations served, refusals."""
        metrics.add_time("HandlerTime", round(elapsed_ms, 2), None, "ms")
        names = {"decode": "DecodeTime", "forward": "ForwardTime", "cam": "CamTime", "encode": "EncodeTime"}
        for stage, seconds in self.service.stage_seconds.items():
            metrics.add_time(names[stage], round(seconds * 1000, 2), None, "ms")
        metrics.add_metric("BatchSize", len(results), "count", None, metric_type=MetricTypes.GAUGE)
        served = sum(len(r.body["explanations"]) for r in results if r.status == HTTPStatus.OK)
        metrics.add_counter("ExplanationsServed", served)
        metrics.add_counter("RequestsRefused", refused)
