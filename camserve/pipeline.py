"""From requests to response bodies: parse, decode, one batched pass, render. No TorchServe in here.

The service's steps: :meth:`ExplanationService.prepare` (a request's options, its budget from the image header, then
its pixels), the task's batch (``camserve.tasks``: one engine pass, or a detector's), and each request's response
(``camserve.batch``, ``camserve.work``). Every failure stays in its own request, by mechanism: each request's
preparation and rendering runs inside :func:`~camserve.work.contained`, which turns a
:class:`~camserve.errors.ClientError` into its 4xx and any other exception into that request's 500; when the
batched pass itself fails, the batch's requests are explained one by one, so that only the one that really fails
gets the 500.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from camserve import settings as serving
from camserve.api import DEFAULT_TOPK, ModelInfo, Request, WorkBudget
from camserve.cam import CamEngine, CamRequest, LayerNotFoundError, method_record
from camserve.cam.compiled import split_at
from camserve.cam.sanity import Sanity
from camserve.errors import ClientError
from camserve.imaging import DecodeLimits
from camserve.model import autocast_dtype, channels_last_from, load_model
from camserve.spec import SPEC_FILE, ModelSpec
from camserve.tasks import check_fit, serving_task
from camserve.work import PreparedRequest, RowResult, contained, internal_error

logger = logging.getLogger(__name__)

__all__ = ["ExplanationService", "PreparedRequest", "RowResult", "contained", "internal_error"]


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
        self.task = serving_task(spec, self.engine.model)
        self.engine.head = self.task.head or self.engine.head  # the task decides what an explanation differentiates
        self.engine.input_channels, self.engine.input_spatial = spec.channels, spec.volume
        self.model_info = ModelInfo(
            self.model_name or spec.name, spec.version, spec.weights, spec.arch, spec.num_classes, spec.task
        )
        # The budget reads layer shapes per request: probe them now, once, not from the request threads at once.
        if self.task.probes_layers:
            self.engine.layers()
        self.pool = ThreadPoolExecutor(max_workers=max(1, self.threads))
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
        the weights ``serialized_file`` loaded onto ``device``, and the ``handler:`` settings of its model-config.yaml
        (``precision``, ``channels_last``, ``compile``, ``scorecam_channels``, ``limits``, ``budget``)."""
        model_dir = Path(model_dir)
        spec = ModelSpec.load(model_dir / SPEC_FILE)
        compiling = bool(settings.get("compile", serving.COMPILE))
        if compiling and device.type != "cpu":  # no run has exercised a compiled prefix on a GPU
            logger.warning("compile is for CPU workers; %s runs the eager model", device)
            compiling = False
        # A compiled prefix picks its own layouts, and a new input stride would compile it again.
        channels_last = 0 if compiling else channels_last_from(settings.get("channels_last", False))
        model = load_model(spec, model_dir / serialized_file, model_dir, device, channels_last=channels_last == 1)
        engine = CamEngine(
            model,
            autocast_dtype=autocast_dtype(str(settings.get("precision", "fp32")), device),
            scorecam_channels=int(settings.get("scorecam_channels", serving.SCORECAM_CHANNELS)),
            input_size=spec.input_size,
            default_layer=spec.default_layer,
        )
        service = cls(
            engine=engine,
            spec=spec,
            model_name=model_name,
            device=device,
            limits=DecodeLimits(**settings.get("limits", {})),
            budget=WorkBudget(**settings.get("budget", {})),
            channels_last_from=channels_last,
            **({"threads": threads} if threads else {}),
        )
        if compiling:
            try:
                service.compile_default_layer()
            except Exception:  # Inductor builds its kernels with the worker's C++ compiler, which may be missing
                logger.exception("compiling the network before %s failed; the eager model serves", spec.default_layer)
                engine.compiled.clear()
                service.channels_last_from = channels_last_from(settings.get("channels_last", False))
        return service

    def compile_default_layer(self) -> None:
        """Compile the network before the default layer (:func:`camserve.cam.compiled.split_at`; its
        :class:`CompileRefused` says why not), then explain the sample input alone and in a pair: batches of one
        are compiled apart, and the pair compiles every larger batch (a dynamic batch dimension)."""
        layer = self.spec.default_layer
        started = time.perf_counter()
        self.engine.compiled[layer] = split_at(self.engine.model, layer)
        for count in (1, 2):
            results = self.answer([self._sample_row() for _ in range(count)])
            if any(result.status != 200 for result in results):
                raise RuntimeError(f"the compiled model's warm-up failed: {results[0].body}")
        logger.info("the network before %s compiled in %.1f s", layer, time.perf_counter() - started)

    def answer(self, requests: Sequence[Request | Mapping[str, object]]) -> list[RowResult]:
        """One result per request, in order. Each is a :class:`~camserve.api.Request` that a door made of its
        runtime's request; a mapping is read as a TorchServe row (:meth:`Request.torchserve`)."""
        started = time.perf_counter()
        requests = [r if isinstance(r, Request) else Request.torchserve(r) for r in requests]
        prepared = list(self.pool.map(lambda r: contained("preparing the request", lambda: self.prepare(r)), requests))
        self.stage_seconds = {"decode": time.perf_counter() - started}
        valid = [index for index, item in enumerate(prepared) if isinstance(item, PreparedRequest)]
        results = list(prepared)  # refusals stay in place; each valid request is replaced by its answer
        if valid:
            for index, result in zip(valid, self.explain([prepared[i] for i in valid]), strict=True):
                results[index] = result
        return results

    def warm_up(self) -> RowResult:
        """One explanation of the task's sample input (seeded noise: a photo, a volume), as the runtime's first
        request would ask it (an embedding model's of the image's similarity to itself): what a door answers before
        it says the model is ready."""
        (result,) = self.answer([self._sample_row()])
        return result

    def _sample_row(self) -> dict[str, bytearray]:
        image = self.task.sample_input()
        row = {"data": bytearray(image)}
        if "reference" in self.task.options:
            row["reference"] = bytearray(image)
        return row

    def prepare(self, given: Request | Mapping[str, object]) -> PreparedRequest:
        """Read, check the budget from the header, then decode one request; a :class:`ClientError` says why not."""
        request = (given if isinstance(given, Request) else Request.torchserve(given)).read()
        task, options = self.task, self._options(request.options)
        terms = task.terms(options, self)
        targets = task.targets(options, len(terms.labels))
        cam = CamRequest(targets, options.layer, options.method, options.eigen_smooth, options.aug_smooth)
        return task.prepare_input(self, request.image, options, cam, terms)

    def _options(self, given):
        """A request's options with the model's defaults filled in, after checking that the task takes them and
        that its layer and method can explain it."""
        check_fit(self.task, given)
        options = replace(
            given,
            layer=given.layer or self.spec.default_layer,
            topk=given.topk or DEFAULT_TOPK,  # at most the classes (or prompts) there are: the predictions' own
            threshold=self.spec.threshold if given.threshold is None else given.threshold,
            score_threshold=serving.DEFAULT_SCORE_THRESHOLD if given.score_threshold is None else given.score_threshold,
            max_detections=given.max_detections or serving.DEFAULT_MAX_DETECTIONS,
        )
        if options.layer not in self.spec.layers:
            raise ClientError("InvalidOption", str(LayerNotFoundError(options.layer, list(self.spec.layers))))
        layout = self.spec.layers[options.layer]
        options = replace(options, method=given.method or self.task.default_method(layout))
        record = method_record(options.method)
        self.task.check_method(record, options.layer, layout)
        why_not = record.applies(self.engine, options.layer) if record.applies is not None else None
        if why_not:
            raise ClientError("InvalidOption", f"method {options.method} does not apply here: {why_not}")
        return options

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
        return self.task.explain(self, prepared)
