"""KServe's own model server for the explanation service, the runtime that does not depend on TorchServe:

    python -m camserve.kserve --model-dir PATH --http-port N

PATH is a ``.mar`` or an unpacked archive directory; the model is the archive's (its ``model_spec.json``, weights
and model file) and takes the archive's name. KServe's Python SDK (``kserve.Model``, ``kserve.ModelServer``) serves:

- v1 ``POST /v1/models/{m}:predict`` and ``:explain`` with ``{"instances": [...]}``, each instance
  ``{"data": "<base64>", ...options}``: ``{"predictions": [...]}`` (``"explanations"``), one response per instance, a
  bad instance's error object in its place, HTTP 200;
- v2 ``POST /v2/models/{m}/infer``: each input of datatype BYTES holds base64 images (its ``parameters`` are the
  options), and each output of the same name and shape holds the responses as JSON text, as TorchServe's v2
  envelope answers;
- ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{m}``, ``/v2/models/{m}/ready``: the model is ready only
  after its warm-up explanation;
- Prometheus ``/metrics``: KServe's request histograms and the service's stage timings (``camserve_stage_seconds``).

Concurrent requests share one forward pass: an in-process micro-batcher gathers them as TorchServe's frontend does,
with the archive's ``batchSize`` and ``maxBatchDelay`` (:mod:`camserve.batching`); every instance of one request
joins the same batch, and one batch runs at a time (the same explanation service as the TorchServe handler). In a
cluster, the InferenceService's ``batcher`` sidecar may gather requests too; it is optional.

It binds 127.0.0.1 unless told ``--host``: on KServe, authentication is the
platform's (the ingress or the service mesh), and a pod binds all its interfaces.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import uuid
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import orjson
import torch
from fastapi.exceptions import FastAPIDeprecationWarning
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.errors import InvalidInput
from prometheus_client import Counter, Histogram

from camserve import settings as serving
from camserve.api import Request
from camserve.api.readers import load_json
from camserve.batching import MicroBatcher
from camserve.errors import ClientError
from camserve.model import select_device
from camserve.pipeline import ExplanationService
from camserve.spec import archive_manifest, handler_settings, model_config
from camserve.work import RowResult, internal_error

logger = logging.getLogger(__name__)

__all__ = ["CamModel", "main", "unpacked_archive"]

STAGE_SECONDS = Histogram("camserve_stage_seconds", "Each stage of an answered request batch", ["model_name", "stage"])
EXPLANATIONS = Counter("camserve_explanations_served", "Explanations answered", ["model_name"])
REFUSED = Counter("camserve_requests_refused", "Instances answered with an error", ["model_name"])
BATCH_IMAGES = Histogram(
    "camserve_batch_images", "Images in each batch the micro-batcher ran", ["model_name"], buckets=(1, 2, 4, 8, 16, 32)
)


def unpacked_archive(path: str | Path, workdir: str | Path) -> Path:
    """The model directory of ``path``: the directory itself, or a ``.mar`` (a zip) unpacked into ``workdir`` as
    TorchServe unpacks it."""
    path = Path(path)
    if path.is_dir():
        return path
    if not zipfile.is_zipfile(path):
        raise ValueError(f"--model-dir must be a .mar or an unpacked archive directory, got {path}")
    target = Path(workdir) / path.stem
    with zipfile.ZipFile(path) as archive:
        archive.extractall(target)
    return target


class CamModel(Model):
    """The archive's model behind KServe's protocols: the same :class:`ExplanationService` as the TorchServe
    handler, from the same spec, weights and ``handler:`` settings."""

    def __init__(self, model_dir: Path, device: torch.device | None = None) -> None:
        manifest = archive_manifest(model_dir)
        super().__init__(manifest["model"]["modelName"])
        self.model_dir, self.manifest = model_dir, manifest
        self.device = device or select_device(0)
        self.service: ExplanationService | None = None
        self.batcher: MicroBatcher | None = None

    def load(self) -> bool:
        """Build the service, then explain one synthetic photo: ready only when that answers 200."""
        cv2.setNumThreads(1)  # as in the TorchServe worker: requests decode and render in parallel instead
        settings = handler_settings(self.model_dir, self.manifest)
        self.service = ExplanationService.from_archive(
            self.model_dir, self.manifest["model"]["serializedFile"], settings, self.device, model_name=self.name
        )
        config = model_config(self.model_dir, self.manifest)  # TorchServe's batching, from the same archive
        batch_size = int(config.get("batchSize", serving.BATCH_SIZE))
        delay = int(config.get("maxBatchDelay", serving.MAX_BATCH_DELAY_MS)) / 1000
        self.batcher = MicroBatcher(self._answer_batch, max_batch=batch_size, max_delay=delay)
        warm_up = self.service.warm_up()
        if warm_up.status != 200:
            raise RuntimeError(f"the warm-up explanation of {self.name} failed: {warm_up.body}")
        spec = self.service.spec
        logger.info("%s (%s, %s weights) ready on %s", self.name, spec.arch, spec.weights, self.device)
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        """The v2 metadata's inputs: any name, BYTES, one base64 image per element; its parameters are the options."""
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        """The v2 metadata's outputs: the input's name and shape, each element a response's JSON text."""
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    async def _answer(self, requests: Sequence[Request]) -> list[dict]:
        """Each request's body: the service's answer, with the request id on an error. Concurrent requests are
        gathered into one batch, as TorchServe's frontend gathers them (the archive's ``batchSize`` and
        ``maxBatchDelay``; :class:`~camserve.batching.MicroBatcher`), and answered off the event loop (health checks
        stay answered), one batch at a time."""
        try:
            results = await self.batcher.submit(list(requests))
        except Exception:  # the service contains each request's failures; this is the last line of defence
            logger.exception("answering %d instances failed", len(requests))
            results = [internal_error("the batch")] * len(requests)
        self._report(results)
        return [result.with_id(request.id) for result, request in zip(results, requests, strict=True)]

    def _answer_batch(self, requests: list[Request]) -> list[RowResult]:
        BATCH_IMAGES.labels(self.name).observe(len(requests))
        return self.service.answer(requests)

    def _report(self, results: list[RowResult]) -> None:
        for stage, seconds in self.service.stage_seconds.items():
            STAGE_SECONDS.labels(self.name, stage).observe(seconds)
        EXPLANATIONS.labels(self.name).inc(sum(len(r.body["explanations"]) for r in results if r.status == 200))
        REFUSED.labels(self.name).inc(sum(r.status != 200 for r in results))

    async def predict(self, payload, headers: dict[str, str] | None = None, response_headers=None):
        request_id = (headers or {}).get("x-request-id")
        if isinstance(payload, InferRequest):
            return await self._infer_v2(payload, request_id)
        return {"predictions": await self._answer(_instances(payload, request_id))}

    async def explain(self, payload, headers: dict[str, str] | None = None):
        request_id = (headers or {}).get("x-request-id")
        return {"explanations": await self._answer(_instances(payload, request_id))}

    async def _infer_v2(self, request: InferRequest, request_id: str | None) -> InferResponse:
        """Each BYTES element of each input is one image (base64 text) with that input's parameters as options;
        the outputs mirror the inputs, each element the response's JSON text."""
        requests, shapes = [], []
        for item in request.inputs:
            if item.datatype != "BYTES":
                raise InvalidInput(f"input {item.name} must have datatype BYTES (base64 images), got {item.datatype}")
            options = dict(item.parameters or {})
            elements = [e.decode() if isinstance(e, bytes) else e for e in np.asarray(item.data, dtype=object).ravel()]
            requests += [Request.v2_element(e, options, request_id) for e in elements]
            shapes.append((item.name, len(elements)))
        bodies = iter(await self._answer(requests))
        outputs = []
        for name, count in shapes:
            texts = [orjson.dumps(next(bodies)).decode() for _ in range(count)]
            outputs.append(InferOutput(name=name, shape=[count], datatype="BYTES", data=texts))
        response_id = request.id or str(uuid.uuid4())  # the v2 protocol answers an id, made up when none came
        return InferResponse(response_id=response_id, model_name=self.name, infer_outputs=outputs)


def _instances(payload: object, request_id: str | None) -> list[Request]:
    if isinstance(payload, (bytes, bytearray)):  # a JSON body sent without its content type
        try:
            payload = load_json(payload)
        except ClientError as error:
            raise InvalidInput(error.message) from None
    if not isinstance(payload, Mapping) or not isinstance(payload.get("instances"), list):
        raise InvalidInput('a v1 request is {"instances": [{"data": "<base64 image>", ...options}, ...]}')
    return [Request.v1_instance(item, request_id) for item in payload["instances"]]


class _JsonInferBody:
    """ASGI middleware: a v2 ``infer`` request without the binary extension's ``inference-header-content-length``
    is all JSON, so read it as JSON whatever its content type. tritonclient sends its JSON requests with none, and
    KServe's SDK would otherwise take the body for binary tensors and refuse it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/infer"):
            headers = [(key, value) for key, value in scope["headers"] if key != b"content-type"]
            if not any(key == b"inference-header-content-length" for key, _ in headers):
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class _LoopbackServer(ModelServer):
    """KServe's ModelServer, listening on ``host``. No public way exists: KServe 0.21's ``RESTServer`` hard-codes
    ``host="0.0.0.0"`` (kserve/protocol/rest/server.py), so ``start`` is the SDK's own, the host set before it runs."""

    def __init__(self, host: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.host = host

    def start(self, models: list[Model]) -> None:
        from kserve.model_server import FASTAPI_APP_IMPORT_STRING, app
        from kserve.protocol.rest.server import RESTServer

        self._register_and_check_atleast_one_model_is_ready(models)
        app.add_middleware(_JsonInferBody)
        self._rest_server = RESTServer(
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            grace_period=self.grace_period,
            timeout_keep_alive=self.timeout_keep_alive,
        )
        self._rest_server.config.host = self.host
        self.servers.append(self._rest_server.start())
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m camserve.kserve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a .mar, or an unpacked archive directory")
    parser.add_argument("--http-port", type=int, default=serving.INFERENCE_PORT, help="(default: %(default)s)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: %(default)s; a pod: 0.0.0.0)"
    )
    parser.add_argument("--device", help="cpu or cuda:N (default: cuda:0 when CUDA is present, else cpu)")
    args = parser.parse_args(argv)
    # KServe's SDK answers v1 with FastAPI's ORJSONResponse, which FastAPI now deprecates: a warning on the first
    # request about the SDK's code, not ours, that its users cannot act on. This one warning alone is silenced.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated", category=FastAPIDeprecationWarning)
    device = torch.device(args.device) if args.device else select_device(0)
    with tempfile.TemporaryDirectory(prefix="camserve-kserve-") as workdir:
        model = CamModel(unpacked_archive(args.model_dir, workdir), device)
        model.load()
        _LoopbackServer(args.host, http_port=args.http_port, enable_grpc=False).start([model])


if __name__ == "__main__":
    main()
