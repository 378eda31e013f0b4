"""The benchmark: every contender in one run, on the same inputs, as ratios to the plain torchvision forward pass.

Contenders: (1) the floor, torchvision ResNet-50 under ``inference_mode``; (2) this engine in-process, Grad-CAM alone
and with overlay encoding; (3) pytorch-grad-cam's ``GradCAM``, the peer; (4) the running TorchServe service end to
end over HTTP, at each batch delay measured. Also the fast paths (precision, channels_last) with their agreement,
channels_last by batch size, the share of decode and encode, the cost of the response's bytes (JSON, base64), where
a lone request's time goes inside the server, and the worker's memory. Not shipped in the .mar.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from camserve.api import WorkBudget
from camserve.cam import METHODS, CamEngine, CamRequest, Family, normalize_map
from camserve.imaging import encode_image, resize_for_model
from camserve.model import PRECISIONS, images_to_batch
from camserve.pipeline import ExplanationService
from camtools.archive import ServingConfig
from camtools.gradcam import GradCAM
from camtools.models import PreparedModel, prepare_model

__all__ = ["BenchConfig", "run_benchmark", "sample_images", "write_reports"]


@dataclass(frozen=True)
class BenchConfig:
    device: str = "cpu"
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = 10
    warmup: int = 2
    arch: str = "resnet50"
    layer: str | None = None
    """None: the model's default layer."""
    agreement_images: int = 32
    server: bool = True
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    requests_per_level: int = 48
    soak_requests: int = 1000
    server_precision: str = "fp32"
    server_channels_last: int = ServingConfig.channels_last
    """The smallest batch that runs channels_last in the service (1: every batch, 0: none)."""
    batch_delays_ms: tuple[int, ...] = (ServingConfig.max_batch_delay_ms, 5)
    """TorchServe's maxBatchDelay for the service: the first gets every concurrency level and the memory soak, the
    others concurrency 1 and the highest level, to choose the default from."""
    server_batch_size: int = ServingConfig.batch_size
    channels_last_batches: tuple[int, ...] = (1, 2, 4, 8)
    weights: str = "random"
    """imagenet, random or a state_dict path: speed does not depend on the weights, agreement does."""


def sample_images(count: int) -> list[np.ndarray]:
    """``count`` distinct RGB photos: scikit-image's samples, then their mirror images and crops."""
    import skimage.data as data

    def rgb(image: np.ndarray) -> np.ndarray:
        return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]

    base = [rgb(getattr(data, name)()) for name in ("chelsea", "astronaut", "coffee", "rocket", "camera", "coins")]
    variants = [*base, *(image[:, ::-1] for image in base)]
    variants += [image[image.shape[0] // 4 :, : image.shape[1] * 3 // 4] for image in base]
    variants += [image[: image.shape[0] * 3 // 4, image.shape[1] // 4 :] for image in base]
    while len(variants) < count:
        variants += [np.rot90(image).copy() for image in variants[: count - len(variants)]]
    return [np.ascontiguousarray(image) for image in variants[:count]]


def _timer(device: torch.device) -> Callable[[dict[str, Callable[[], object]], int, int], dict[str, float]]:
    """Median seconds of each contender, timed round-robin so that drift in the machine's speed hits all alike."""

    def run(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
        for fn in contenders.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(repeats):
            for name, fn in contenders.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - started)
        return {name: statistics.median(values) for name, values in times.items()}

    return run


def plain_forward(model: torch.nn.Module, batch: torch.Tensor) -> None:
    """The floor every contender is compared with: the network alone under ``inference_mode``."""
    with torch.inference_mode():
        model(batch)


def machine_info(device: torch.device) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "device": str(device),
        "python": platform.python_version(),
    }


@dataclass
class BenchReport:
    machine: dict[str, object]
    config: dict[str, object]
    in_process: list[dict[str, object]] = field(default_factory=list)
    methods: list[dict[str, object]] = field(default_factory=list)
    fast_paths: list[dict[str, object]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    channels_last: list[dict[str, object]] = field(default_factory=list)
    response_bytes: list[dict[str, object]] = field(default_factory=list)
    service: list[dict[str, object]] = field(default_factory=list)
    batch_delays: list[dict[str, object]] = field(default_factory=list)
    profile: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    targets: list[dict[str, object]] = field(default_factory=list)


def run_benchmark(config: BenchConfig, workdir: Path | None = None) -> BenchReport:
    device = torch.device(config.device)
    timed = _timer(device)
    images = sample_images(max(config.agreement_images, max(config.batch_sizes)))
    prepared = prepare_model(arch=config.arch, weights=config.weights, layer=config.layer)
    spec = prepared.spec
    config = replace(config, layer=spec.default_layer)
    model = prepared.model.to(device)
    report = BenchReport(machine=machine_info(device) | {"weights": spec.weights}, config=asdict(config))
    steps = ["in-process", "methods", "fast paths", "channels_last by batch", "decode/encode share", "response bytes"]
    steps += ["service"] if config.server else []
    progress = tqdm(steps, desc="benchmark", unit="step")
    for step in progress:
        progress.set_postfix_str(step)
        if step == "in-process":
            report.in_process = _in_process(model, spec, images, config, device, timed)
        elif step == "methods":
            report.methods = _method_costs(model, spec, images, config, device, timed)
        elif step == "fast paths":
            report.fast_paths = _fast_paths(model, spec, images, config, device, timed)
        elif step == "channels_last by batch":
            report.channels_last = _channels_last_by_batch(model, spec, images, config, device, timed)
        elif step == "decode/encode share":
            report.stages = _stage_shares(model, spec, images, config, device)
        elif step == "response bytes":
            report.response_bytes = _response_bytes(model, spec, images, device)
        else:
            floor = partial(_floor_ms_per_image, model, spec, images, device, timed, config)
            report.service, report.memory, report.batch_delays, report.profile = _service(
                prepared, images, config, workdir, floor
            )
    report.targets = _targets(report)
    return report


def _in_process(model, spec, images, config: BenchConfig, device, timed) -> list[dict[str, object]]:
    from pytorch_grad_cam import GradCAM as PeerGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    peer_model = copy.deepcopy(model).requires_grad_(True)  # the peer backpropagates into every parameter
    peer = PeerGradCAM(model=peer_model, target_layers=[peer_model.get_submodule(config.layer)])
    engine = GradCAM(model, config.layer, input_size=spec.input_size)
    service = _service_for(model, spec, device)
    side = spec.input_size
    rows = []
    for batch_size in config.batch_sizes:
        chosen = images[:batch_size]
        batch = images_to_batch([resize_for_model(image, side) for image in chosen], spec, device)
        prepared = [service.prepare({"body": encode_image(image, "png")}) for image in chosen]
        with torch.inference_mode():
            top1 = model(batch).argmax(dim=1).tolist()

        def cam_only(batch: torch.Tensor = batch) -> None:
            normalize_map(torch.cat(engine(batch).maps), (side, side))

        def cam_and_overlays(prepared: list = prepared) -> None:
            service.explain([copy.copy(item) for item in prepared])  # explain() releases each image it renders

        def peer_gradcam(batch: torch.Tensor = batch, targets: list = top1) -> None:
            peer(input_tensor=batch, targets=[ClassifierOutputTarget(c) for c in targets])

        contenders = {
            "floor: torchvision forward": partial(plain_forward, model, batch),
            "engine: Grad-CAM": cam_only,
            "engine: Grad-CAM + overlay encoding": cam_and_overlays,
            "pytorch-grad-cam GradCAM": peer_gradcam,
        }
        medians = timed(contenders, config.repeats, config.warmup)
        floor_s = medians["floor: torchvision forward"]
        for name, median in medians.items():
            rows.append(
                {
                    "contender": name,
                    "batch": batch_size,
                    "seconds": median,
                    "ms_per_image": 1000 * median / batch_size,
                    "images_per_s": batch_size / median,
                    "ratio_to_floor": median / floor_s,
                }
            )
    peer.activations_and_grads.release()
    return rows


def _method_costs(model, spec, images, config: BenchConfig, device, timed) -> list[dict[str, object]]:
    """Each method's cost per image at ``config.layer`` relative to the plain forward pass, timed round-robin.

    ScoreCAM and Ablation-CAM run one forward pass per scored channel, so they are timed on one image with at most
    two repeats.
    """
    engine = CamEngine(model, input_size=spec.input_size)
    rows = []
    for method in timed_methods(engine):
        perturbation = METHODS[method].family is Family.PERTURBATION
        batch_size = 1 if perturbation else max(config.batch_sizes)
        repeats = min(config.repeats, 2) if perturbation else config.repeats
        batch = images_to_batch(
            [resize_for_model(image, spec.input_size) for image in images[:batch_size]], spec, device
        )
        requests = [CamRequest(layer=config.layer, method=method)] * batch_size

        medians = timed(
            {"floor": partial(plain_forward, model, batch), method: partial(engine, batch, requests)},
            repeats,
            min(config.warmup, 1),
        )
        rows.append(
            {
                "method": method,
                "layer": config.layer,
                "batch": batch_size,
                "ms_per_image": 1000 * medians[method] / batch_size,
                "ratio_to_floor": medians[method] / medians["floor"],
            }
        )
    return rows


def timed_methods(engine: CamEngine) -> list[str]:
    """The methods the benchmark times: those that the default work budget serves (SESS's 2 x 122 + 1 passes per
    image are counted, not timed)."""
    budget = WorkBudget().max_forward_passes
    return [name for name in METHODS if engine.forward_passes(CamRequest(method=name)) <= budget]


def _service_for(model, spec, device) -> ExplanationService:
    engine = CamEngine(model, input_size=spec.input_size, default_layer=spec.default_layer)
    return ExplanationService(engine=engine, spec=spec, device=device)


def _fast_paths(base_model, spec, images, config: BenchConfig, device, timed) -> list[dict[str, object]]:
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    side = spec.input_size
    inputs = [resize_for_model(image, side) for image in images[: config.agreement_images]]
    batch_size = max(config.batch_sizes)
    reference_top1, reference_maps = None, None
    rows, runs = [], {}
    for channels_last in (False, True):
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = copy.deepcopy(base_model).to(device, memory_format=memory_format)
        for precision in precisions:
            engine = GradCAM(model, config.layer, autocast_dtype=PRECISIONS[precision], input_size=side)
            batches = [
                images_to_batch(inputs[i : i + batch_size], spec, device, channels_last)
                for i in range(0, len(inputs), batch_size)
            ]
            targets = None if reference_top1 is None else [[c] for c in reference_top1]
            top1, maps = [], []
            for index, batch in enumerate(batches):
                wanted = None if targets is None else targets[index * batch_size : (index + 1) * batch_size]
                output = engine(batch, wanted)
                top1 += output.logits.argmax(dim=1).tolist()
                maps += [normalize_map(m, (side, side))[0].cpu().numpy().ravel() for m in output.maps]
            if reference_top1 is None:
                reference_top1, reference_maps = top1, maps
            runs[(precision, channels_last)] = partial(engine, batches[0])
            rows.append(
                {
                    "precision": precision,
                    "channels_last": channels_last,
                    "batch": batches[0].shape[0],
                    "top1_agreement": float(np.mean([a == b for a, b in zip(top1, reference_top1)])),
                    "heatmap_correlation": float(np.mean([_correlation(a, b) for a, b in zip(maps, reference_maps)])),
                }
            )
    medians = timed(runs, config.repeats, config.warmup)
    for row in rows:
        row["seconds"] = medians[(row["precision"], row["channels_last"])]
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
        row["ships"] = row["top1_agreement"] >= 0.99 and row["heatmap_correlation"] >= 0.98
    return rows


def _channels_last_by_batch(model, spec, images, config: BenchConfig, device, timed) -> list[dict[str, object]]:
    """Grad-CAM on inputs in the channels_last memory format against the default one, at each batch size, with the
    model's weights as they are (the service converts only the inputs of batches from its threshold on)."""
    engine = GradCAM(model, config.layer, input_size=spec.input_size)
    rows = []
    for batch_size in config.channels_last_batches:
        inputs = [resize_for_model(image, spec.input_size) for image in images[:batch_size]]
        runs = {
            layout: partial(engine, images_to_batch(inputs, spec, device, channels_last=layout == "channels_last"))
            for layout in ("contiguous", "channels_last")
        }
        medians = timed(runs, config.repeats, config.warmup)
        rows.append(
            {
                "batch": batch_size,
                "contiguous_ms_per_image": 1000 * medians["contiguous"] / batch_size,
                "channels_last_ms_per_image": 1000 * medians["channels_last"] / batch_size,
                "speedup": medians["contiguous"] / medians["channels_last"],
            }
        )
    return rows


def channels_last_threshold(rows: Sequence[dict[str, object]]) -> int:
    """The smallest measured batch from which channels_last is faster at every larger measured batch; 0: never."""
    threshold = 0
    for row in sorted(rows, key=lambda r: r["batch"], reverse=True):
        if row["speedup"] <= 1.0:
            break
        threshold = row["batch"]
    return threshold


def _response_bytes(model, spec, images, device, repeats: int = 50) -> list[dict[str, object]]:
    """What a response's bytes cost on the worker's CPU, per response: TorchServe's own ``json.dumps(indent=2)``
    (what it runs on a dict) against orjson, and the standard library's base64 against pybase64 on the overlay."""
    import base64
    import json as stdlib_json

    import orjson
    import pybase64

    service = _service_for(model, spec, device)
    bodies = [result.body for result in service.answer([{"body": encode_image(i, "jpeg")} for i in images[:8]])]
    overlays = [encode_image(image, "jpeg") for image in images[:8]]
    contenders = {
        "JSON: json.dumps(indent=2), TorchServe's": (lambda: [stdlib_json.dumps(b, indent=2).encode() for b in bodies]),
        "JSON: orjson.dumps": lambda: [orjson.dumps(b) for b in bodies],
        "base64: base64.b64encode": lambda: [base64.b64encode(o) for o in overlays],
        "base64: pybase64.b64encode": lambda: [pybase64.b64encode(o) for o in overlays],
    }
    medians = _timer(torch.device("cpu"))(contenders, repeats, 3)
    return [
        {
            "step": name,
            "us_per_response": 1e6 * seconds / len(bodies),
            "bytes_per_response": statistics.mean(len(orjson.dumps(b)) for b in bodies)
            if name.startswith("JSON")
            else statistics.mean(map(len, overlays)),
        }
        for name, seconds in medians.items()
    ]


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b, atol=1e-3) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _stage_shares(model, spec, images, config: BenchConfig, device) -> dict[str, float]:
    """Where a batch's time goes when it arrives as JPEG files: decode, CAM (forward + gradient), encode."""
    service = _service_for(model, spec, device)
    rows = [{"body": encode_image(image, "jpeg")} for image in images[: max(config.batch_sizes)]]
    totals = dict.fromkeys(("decode", "cam", "encode"), 0.0)
    for repeat in range(config.warmup + config.repeats):
        service.answer(rows)
        if repeat >= config.warmup:
            for stage in totals:
                totals[stage] += service.stage_seconds[stage]
    whole = sum(totals.values())
    return {f"{stage}_share": seconds / whole for stage, seconds in totals.items()} | {
        f"{stage}_ms_per_image": 1000 * seconds / config.repeats / len(rows) for stage, seconds in totals.items()
    }


def _floor_ms_per_image(model, spec, images, device, timed, config: BenchConfig, batch_size: int) -> float:
    """The plain forward pass at ``batch_size``, ms per image, timed now."""
    batch = images_to_batch([resize_for_model(image, spec.input_size) for image in images[:batch_size]], spec, device)
    floor = partial(plain_forward, model, batch)
    return 1000 * timed({"floor": floor}, config.repeats, config.warmup)["floor"] / batch_size


def _service(
    prepared: PreparedModel,
    images,
    config: BenchConfig,
    workdir: Path | None,
    floor: Callable[[int], float] | None = None,
):
    """The service at each batch delay: every concurrency level, the memory soak and the profile of a lone request
    at the first; concurrency 1 and the highest level at the others.

    Right before concurrency 1 and the highest level (at the first delay), ``floor`` times the plain forward pass
    at batch 1 and at the largest in-process batch, while the server idles: the service's targets compare with the
    machine as it is in that minute, since a shared machine drifts over a run."""
    from camtools.archive import build_archive
    from camtools.local_server import run_torchserve

    bodies = [encode_image(image, "jpeg") for image in images[:16]]
    levels, memory, delays, profile = [], {}, [], {}
    for index, delay in enumerate(config.batch_delays_ms):
        with tempfile.TemporaryDirectory(prefix="bench-", dir=workdir) as scratch:
            serving = ServingConfig(
                batch_size=config.server_batch_size,
                max_batch_delay_ms=delay,
                precision=config.server_precision,
                channels_last=config.server_channels_last,
            )
            mar = build_archive(prepared, Path(scratch) / "store", config=serving)
            with run_torchserve(mar, Path(scratch) / "server") as server:
                if index == 0:
                    for concurrency in config.concurrency:
                        floor_batch = {1: 1, max(config.concurrency): max(config.batch_sizes)}.get(concurrency)
                        floor_ms = floor(floor_batch) if floor and floor_batch else None
                        marks = _log_marks(server)
                        levels.append(_load(server, bodies, concurrency, config.requests_per_level))
                        if floor_ms is not None:
                            levels[-1] |= {"floor_batch": floor_batch, "floor_ms_per_image": floor_ms}
                        if concurrency == 1:
                            profile |= _profile(server, marks, levels[-1])
                        if concurrency == max(config.concurrency):
                            profile |= _loaded_profile(server, marks, levels[-1])
                    memory = _memory(server, bodies, config.soak_requests)
                    measured = [level for level in levels if level["concurrency"] in (1, max(config.concurrency))]
                else:
                    measured = [
                        _load(server, bodies, concurrency, config.requests_per_level)
                        for concurrency in sorted({1, max(config.concurrency)})
                    ]
                delays += [{"batch_delay_ms": delay, **level} for level in measured]
    return levels, memory, delays, profile


def _log_marks(server) -> dict[str, int]:
    """How far the worker's and the frontend's logs go now: a profile reads only what comes after."""
    return {name: _read_log(server, name).count("\n") for name in ("model_log", "ts_log")}


def _read_log(server, name: str) -> str:
    path = server.workdir / "logs" / f"{name}.log"
    return path.read_text() if path.exists() else ""


def _batch_lines(server, marks: dict[str, int]) -> list[tuple[int, float, dict[str, float]]]:
    """The worker's batch log lines since ``marks``: (requests, handler ms, {stage: ms}) for each."""
    import re

    batches = []
    for line in _read_log(server, "model_log").splitlines()[marks["model_log"] :]:
        found = re.search(r"answered a batch of (\d+) requests .* in ([\d.]+) ms \((.*) ms\)", line)
        if found:
            stages = {stage: float(value) for stage, value in (p.rsplit(" ", 1) for p in found.group(3).split(", "))}
            batches.append((int(found.group(1)), float(found.group(2)), stages))
    return batches


def _profile(server, marks: dict[str, int], level: dict[str, object]) -> dict[str, float]:
    """Where a lone request's time goes (medians, ms), from the worker's batch log lines (the handler's stages) and
    the frontend's job log (queue wait, backend time): the rest of the client's p50 is HTTP and the frontend."""
    import re

    stages: dict[str, list[float]] = {}
    for requests, handler_ms, stage_ms in _batch_lines(server, marks):
        if requests == 1:
            for stage, value in {"handler": handler_ms, **stage_ms}.items():
                stages.setdefault(stage, []).append(value)
    for line in _read_log(server, "ts_log").splitlines()[marks["ts_log"] :]:
        found = re.search(r"Waiting time ns: (\d+), Backend time ns: (\d+)", line)
        if found:
            stages.setdefault("queue", []).append(int(found.group(1)) / 1e6)
            stages.setdefault("backend", []).append(int(found.group(2)) / 1e6)
    if not {"handler", "backend", "queue"} <= stages.keys():
        return {}
    profile = {f"{stage}_ms": statistics.median(values) for stage, values in stages.items()}
    profile["worker_protocol_ms"] = profile["backend_ms"] - profile["handler_ms"]
    profile["http_and_frontend_ms"] = level["p50_ms"] - profile["backend_ms"] - profile["queue_ms"]
    profile["client_p50_ms"] = level["p50_ms"]
    return profile


def _loaded_profile(server, marks: dict[str, int], level: dict[str, object]) -> dict[str, float]:
    """Where an image's time goes at the highest concurrency (ms per image, summed over the level's batches): the
    handler's stages, and the rest of the service's time per image (TorchServe, and the client's own share of the
    CPU when it runs on the same machine)."""
    batches = _batch_lines(server, marks)
    images = sum(requests for requests, _, _ in batches)
    if not images:
        return {}
    totals: dict[str, float] = {}
    for _, handler_ms, stage_ms in batches:
        for stage, value in {"handler": handler_ms, **stage_ms}.items():
            totals[stage] = totals.get(stage, 0.0) + value
    loaded = {f"loaded_{stage}_ms_per_image": total / images for stage, total in totals.items()}
    loaded["loaded_concurrency"] = level["concurrency"]
    loaded["loaded_mean_batch"] = images / len(batches)
    loaded["loaded_service_ms_per_image"] = 1000 / level["images_per_s"]
    loaded["loaded_outside_handler_ms_per_image"] = (
        loaded["loaded_service_ms_per_image"] - loaded["loaded_handler_ms_per_image"]
    )
    return loaded


def _load(server, bodies: Sequence[bytes], concurrency: int, count: int) -> dict[str, object]:
    import requests

    sessions = [requests.Session() for _ in range(concurrency)]

    def one(index: int) -> tuple[float, int]:
        started = time.perf_counter()
        response = server.predict(session=sessions[index % concurrency], data=bodies[index % len(bodies)])
        return time.perf_counter() - started, response.status_code

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency * 2)))  # warm-up
        started = time.perf_counter()
        results = list(pool.map(one, range(count)))
        wall = time.perf_counter() - started
    latencies = np.array([seconds for seconds, _ in results]) * 1000
    return {
        "concurrency": concurrency,
        "requests": count,
        "errors": sum(status != 200 for _, status in results),
        "images_per_s": count / wall,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "p99_ms": float(np.percentile(latencies, 99)),
    }


def _rss_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def _memory(server, bodies: Sequence[bytes], count: int) -> dict[str, float]:
    """The worker's RSS after warm-up and after ``count`` more requests at concurrency 8, and its peak."""
    if count <= 0:
        return {}
    (pid,) = server.worker_pids()
    before = _rss_mb(pid)
    result = _load(server, bodies, 8, count)
    after = _rss_mb(pid)
    return {
        "requests": count,
        "errors": result["errors"],
        "rss_after_warmup_mb": before["VmRSS"],
        "rss_after_mb": after["VmRSS"],
        "rss_growth_mb": after["VmRSS"] - before["VmRSS"],
        "peak_rss_mb": after["VmHWM"],
    }


def _targets(report: BenchReport) -> list[dict[str, object]]:
    """The engine's targets at every batch measured, then the service's: on a GPU against in-process Grad-CAM at the
    server's batch size (same precision), on a CPU against the plain fp32 forward pass."""

    def pick(contender: str, batch: int) -> dict[str, object] | None:
        return next((r for r in report.in_process if r["contender"] == contender and r["batch"] == batch), None)

    targets = []
    for batch in sorted({row["batch"] for row in report.in_process}):
        floor = pick("floor: torchvision forward", batch)
        cam = pick("engine: Grad-CAM", batch)
        full = pick("engine: Grad-CAM + overlay encoding", batch)
        peer = pick("pytorch-grad-cam GradCAM", batch)
        targets.append(_target(f"(2)/(1) Grad-CAM alone, batch {batch}", cam["seconds"] / floor["seconds"], "<=", 1.05))
        targets.append(
            _target(f"(2)/(1) with overlay encoding, batch {batch}", full["seconds"] / floor["seconds"], "<=", 1.05)
        )
        targets.append(
            _target(f"(3)/(2) peer vs Grad-CAM alone, batch {batch}", peer["seconds"] / cam["seconds"], ">=", 2.5)
        )
    on_gpu = str(report.machine["device"]).startswith("cuda")
    if on_gpu and (cam32 := pick("engine: Grad-CAM", 32)):
        ratio = cam32["seconds"] / pick("floor: torchvision forward", 32)["seconds"]
        targets.append(_target("GPU: (forward + Grad-CAM) / forward, batch 32", ratio, "<=", 1.10))
    if not report.service:
        return targets
    best_service = max(level["images_per_s"] for level in report.service)
    single = next((level for level in report.service if level["concurrency"] == 1), None)
    if on_gpu:
        server_batch = int(report.config["server_batch_size"])
        measured = [row["batch"] for row in report.in_process if row["batch"] <= server_batch] or [0]
        cam = pick("engine: Grad-CAM", max(measured))
        if cam:
            targets.append(
                _target(
                    f"GPU: service images/s / in-process Grad-CAM images/s, batch {cam['batch']}",
                    best_service / cam["images_per_s"],
                    ">=",
                    0.25,
                )
            )
        full1 = pick("engine: Grad-CAM + overlay encoding", 1)
        if single and full1:
            excess = single["p50_ms"] - 1000 * full1["seconds"]
            targets.append(
                _target(
                    "GPU: p50 at concurrency 1 - in-process batch-1 Grad-CAM + overlay encoding, ms", excess, "<=", 6.0
                )
            )
        return targets
    # The floor timed right before the level (the same minute) where the run has it, else the in-process one.
    floor1, floor8 = pick("floor: torchvision forward", 1), pick("floor: torchvision forward", 8)
    floor1_ms = single.get("floor_ms_per_image") if single else None
    if floor1_ms is None and floor1:
        floor1_ms = 1000 * floor1["seconds"]
    if single and floor1_ms:
        excess = single["p50_ms"] - floor1_ms
        targets.append(_target("CPU: p50 at concurrency 1 - plain fp32 forward at batch 1, ms", excess, "<=", 25.0))
    top = max(report.service, key=lambda level: level["concurrency"])
    floor8_ms = top.get("floor_ms_per_image") if top.get("floor_batch") == 8 else None
    if floor8_ms is None and floor8:
        floor8_ms = 1000 / floor8["images_per_s"]
    if floor8_ms:
        ratio = best_service / (1000 / floor8_ms)
        targets.append(_target("CPU: service images/s / plain fp32 forward images/s at batch 8", ratio, ">=", 1.1))
    return targets


def _target(name: str, value: float, relation: str, bound: float) -> dict[str, object]:
    met = value <= bound if relation == "<=" else value >= bound
    return {"measure": name, "value": value, "target": f"{relation} {bound:g}", "met": met}


def write_reports(report: BenchReport, out_dir: Path, stem: str = "bench") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"{stem}.{kind}" for kind in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(asdict(report), indent=2))
    paths["md"].write_text(markdown(report))
    _plot(report, paths["png"])
    return paths


def _table(header: Sequence[str], alignments: str, rows: Sequence[Sequence[object]]) -> list[str]:
    """A markdown table; ``alignments`` has one letter per column, l or r."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in alignments) + "|"
    return ["", "| " + " | ".join(header) + " |", rule, *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def markdown(report: BenchReport) -> str:
    m = report.machine
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ""
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads{gpu}; "
        f"torch {m['torch']}, device {m['device']}, {m['weights']} weights."
    ]
    lines += _table(
        ["contender", "batch", "ms / image", "images / s", "× floor"],
        "lrrrr",
        [
            [
                r["contender"],
                r["batch"],
                f"{r['ms_per_image']:.1f}",
                f"{r['images_per_s']:.1f}",
                f"{r['ratio_to_floor']:.2f}",
            ]
            for r in report.in_process
        ],
    )
    if report.methods:
        lines += _table(
            [f"method (at {report.methods[0]['layer']})", "batch", "ms / image", "× floor"],
            "lrrr",
            [
                [r["method"], r["batch"], f"{r['ms_per_image']:.1f}", f"{r['ratio_to_floor']:.2f}"]
                for r in report.methods
            ],
        )
    if report.fast_paths:
        lines += _table(
            ["precision", "channels_last", "speed-up", "top-1 agreement", "heatmap correlation", "ships"],
            "llrrrl",
            [
                [
                    r["precision"],
                    r["channels_last"],
                    f"{r['speedup']:.2f}×",
                    f"{100 * r['top1_agreement']:.1f}%",
                    f"{r['heatmap_correlation']:.4f}",
                    "yes" if r["ships"] else "no",
                ]
                for r in report.fast_paths
            ],
        )
    if report.channels_last:
        threshold = channels_last_threshold(report.channels_last)
        lines += _table(
            ["batch", "contiguous ms / image", "channels_last ms / image", "channels_last speed-up"],
            "rrrr",
            [
                [
                    r["batch"],
                    f"{r['contiguous_ms_per_image']:.1f}",
                    f"{r['channels_last_ms_per_image']:.1f}",
                    f"{r['speedup']:.2f}×",
                ]
                for r in report.channels_last
            ],
        )
        lines += [
            "",
            f"channels_last pays from batch {threshold} on (Grad-CAM, weights unconverted): build with "
            f"`--channels-last {threshold}`."
            if threshold
            else "channels_last does not pay here: `--channels-last 0`.",
        ]
    if report.response_bytes:
        lines += _table(
            ["response bytes", "µs / response", "bytes"],
            "lrr",
            [
                [r["step"], f"{r['us_per_response']:.1f}", f"{r['bytes_per_response']:.0f}"]
                for r in report.response_bytes
            ],
        )
    if report.stages:
        stages = report.stages
        shares = ", ".join(
            f"{stage} {100 * stages[f'{stage}_share']:.1f}% ({stages[f'{stage}_ms_per_image']:.1f} ms/image)"
            for stage in ("decode", "cam", "encode")
        )
        lines += ["", f"Stage shares for JPEG requests: {shares}."]
    if report.service:
        lines += _table(
            ["concurrency", "requests", "errors", "images / s", "p50 ms", "p95 ms", "p99 ms", "plain forward before"],
            "rrrrrrrr",
            [
                [s["concurrency"], s["requests"], s["errors"], f"{s['images_per_s']:.1f}"]
                + [f"{s[key]:.0f}" for key in ("p50_ms", "p95_ms", "p99_ms")]
                + [
                    f"{s['floor_ms_per_image']:.1f} ms / image at batch {s['floor_batch']}"
                    if "floor_ms_per_image" in s
                    else ""
                ]
                for s in report.service
            ],
        )
    if report.batch_delays:
        lines += _table(
            ["maxBatchDelay ms", "concurrency", "images / s", "p50 ms", "p95 ms"],
            "rrrrr",
            [
                [d["batch_delay_ms"], d["concurrency"], f"{d['images_per_s']:.1f}", f"{d['p50_ms']:.0f}"]
                + [f"{d['p95_ms']:.0f}"]
                for d in report.batch_delays
            ],
        )
    if "handler_ms" in report.profile:
        prof = report.profile
        inside = ", ".join(f"{stage} {prof[f'{stage}_ms']:.1f}" for stage in ("decode", "forward", "cam", "encode"))
        lines += [
            "",
            f"Where a lone request's {prof['client_p50_ms']:.1f} ms go (medians at concurrency 1): handler "
            f"{prof['handler_ms']:.1f} ms ({inside}); TorchServe's worker protocol {prof['worker_protocol_ms']:.1f} "
            f"ms; queue and batch delay {prof['queue_ms']:.1f} ms; HTTP and the frontend "
            f"{prof['http_and_frontend_ms']:.1f} ms.",
        ]
    if "loaded_handler_ms_per_image" in report.profile:
        prof = report.profile
        inside = ", ".join(
            f"{stage} {prof[f'loaded_{stage}_ms_per_image']:.1f}" for stage in ("decode", "forward", "cam", "encode")
        )
        lines += [
            "",
            f"Under load (concurrency {prof['loaded_concurrency']:.0f}, batches of {prof['loaded_mean_batch']:.1f} on "
            f"average), per image: {prof['loaded_service_ms_per_image']:.1f} ms of service time = handler "
            f"{prof['loaded_handler_ms_per_image']:.1f} ms ({inside}) + "
            f"{prof['loaded_outside_handler_ms_per_image']:.1f} ms outside the handler (TorchServe, and the load "
            "generator's share of the CPU when it runs on the same machine).",
        ]
    if report.memory:
        mem = report.memory
        lines += [
            "",
            f"Worker memory: RSS {mem['rss_after_warmup_mb']:.0f} MB after warm-up, {mem['rss_after_mb']:.0f} MB after "
            f"{mem['requests']} more requests ({mem['rss_growth_mb']:+.1f} MB, {mem['errors']} errors); "
            f"peak {mem['peak_rss_mb']:.0f} MB.",
        ]
    lines += _table(
        ["target", "measured", "wanted", "met"],
        "lrll",
        [[t["measure"], f"{t['value']:.3f}", t["target"], "yes" if t["met"] else "NO"] for t in report.targets],
    )
    return "\n".join(lines) + "\n"


def _plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if report.service else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    contenders = list(dict.fromkeys(r["contender"] for r in report.in_process))
    batches = sorted({r["batch"] for r in report.in_process})
    width = 0.8 / len(contenders)
    for i, contender in enumerate(contenders):
        values = [
            next(r["ms_per_image"] for r in report.in_process if r["contender"] == contender and r["batch"] == b)
            for b in batches
        ]
        ax.bar(np.arange(len(batches)) + i * width, values, width, label=contender)
    ax.set_xticks(np.arange(len(batches)) + width * (len(contenders) - 1) / 2, [f"batch {b}" for b in batches])
    ax.set_ylabel("ms per image")
    ax.set_title(f"In-process, {report.machine['device']}")
    ax.legend(fontsize=7)
    if report.service:
        ax = axes[0][1]
        levels = [s["concurrency"] for s in report.service]
        ax.plot(levels, [s["images_per_s"] for s in report.service], "o-", label="throughput (images/s)")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images / s")
        twin = ax.twinx()
        for key, style in (("p50_ms", "s--"), ("p99_ms", "^:")):
            twin.plot(levels, [s[key] for s in report.service], style, color="tab:red", label=key)
        twin.set_ylabel("latency, ms")
        ax.set_title("TorchServe end to end over HTTP")
        ax.legend(loc="upper left", fontsize=7)
        twin.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


FIGURES_START = "<!-- figures:start"
FIGURES_END = "<!-- figures:end -->"
FIGURE_RUNS = {"docs/bench/bench.json": "two CPU cores", "docs/bench/bench_cuda.json": "NVIDIA H100"}
"""The benchmark runs whose figures the README quotes, each the one source of its numbers."""


def readme_figures(root: Path) -> str:
    """The README's block of measured figures, generated from the benchmark runs in :data:`FIGURE_RUNS`, so that
    every section quotes the same run and says which it was."""
    runs = {path: json.loads((root / path).read_text()) for path in FIGURE_RUNS}

    def device(path: str) -> str:
        machine = runs[path]["machine"]
        name = machine["gpu"] or f"{machine['cores']} {machine['cpu']} cores"
        return f"{name}, torch {machine['torch']} (`{path}`)"

    def per_batch(path: str, contender: str, key: str, digits: int) -> str:
        rows = [r for r in runs[path]["in_process"] if r["contender"] == contender]
        return " / ".join(f"{r[key]:.{digits}f}" for r in rows)

    def batches(path: str) -> str:
        return "/".join(str(r["batch"]) for r in runs[path]["in_process"] if r["contender"].startswith("floor"))

    def peer(path: str) -> str:
        rows = runs[path]["in_process"]
        ours = {r["batch"]: r["seconds"] for r in rows if r["contender"] == "engine: Grad-CAM"}
        theirs = {r["batch"]: r["seconds"] for r in rows if r["contender"].startswith("pytorch-grad-cam")}
        return " / ".join(f"{theirs[b] / ours[b]:.2f}" for b in ours)

    def service(path: str) -> str:
        levels = runs[path]["service"]
        best = max(levels, key=lambda level: level["images_per_s"])
        return f"{best['images_per_s']:.1f} at concurrency {best['concurrency']}"

    def latency(path: str) -> str:
        single = next(level for level in runs[path]["service"] if level["concurrency"] == 1)
        return f"{single['p50_ms']:.0f}"

    def memory(path: str) -> str:
        m = runs[path]["memory"]
        return f"{m['rss_after_warmup_mb']:.0f} → {m['rss_after_mb']:.0f} ({m['requests']} requests)"

    def target(path: str, prefix: str) -> str:
        """A service target of the run (its device's), or why there is none: runs before the targets existed."""
        on_gpu = str(runs[path]["machine"]["device"]).startswith("cuda")
        if on_gpu != prefix.startswith("GPU"):
            return ""
        found = next((t for t in runs[path]["targets"] if t["measure"].startswith(prefix)), None)
        if found is None:
            return "not measured (an older run)"
        return f"{found['value']:.2f} (wanted {found['target'].replace('>=', '≥').replace('<=', '≤')})"

    def profile(path: str) -> str:
        prof = runs[path].get("profile") or {}
        if "handler_ms" not in prof:
            return "not measured (an older run)"
        handler = ", ".join(f"{stage} {prof[f'{stage}_ms']:.1f}" for stage in ("decode", "forward", "cam", "encode"))
        return (
            f"{prof['client_p50_ms']:.1f} = handler {prof['handler_ms']:.1f} ({handler}) + worker protocol "
            f"{prof['worker_protocol_ms']:.1f} + queue {prof['queue_ms']:.1f} + HTTP and frontend "
            f"{prof['http_and_frontend_ms']:.1f}"
        )

    def loaded(path: str) -> str:
        prof = runs[path].get("profile") or {}
        if "loaded_handler_ms_per_image" not in prof:
            return "not measured (an older run)"
        stages = ", ".join(
            f"{stage} {prof[f'loaded_{stage}_ms_per_image']:.1f}" for stage in ("decode", "forward", "cam", "encode")
        )
        return (
            f"{prof['loaded_service_ms_per_image']:.1f} = handler {prof['loaded_handler_ms_per_image']:.1f} ({stages})"
            f" + outside it {prof['loaded_outside_handler_ms_per_image']:.1f}; concurrency "
            f"{prof['loaded_concurrency']:.0f}, batches of {prof['loaded_mean_batch']:.1f}"
        )

    def response_bytes(path: str) -> str:
        rows = {r["step"].split(": ")[1]: r["us_per_response"] for r in runs[path].get("response_bytes") or []}
        if not rows:
            return "not measured (an older run)"
        standard, fast = rows["json.dumps(indent=2), TorchServe's"], rows["orjson.dumps"]
        return (
            f"JSON {standard:.0f} → {fast:.0f} (orjson); base64 "
            f"{rows['base64.b64encode']:.0f} → {rows['pybase64.b64encode']:.0f} (pybase64)"
        )

    def batch_delays(path: str) -> str:
        rows = runs[path].get("batch_delays") or []
        if not rows:
            return "not measured (an older run)"
        return "; ".join(
            f"{r['batch_delay_ms']} ms, concurrency {r['concurrency']}: {r['images_per_s']:.1f}/s, "
            f"p50 {r['p50_ms']:.0f}"
            for r in rows
        )

    def channels_last(path: str) -> str:
        rows = runs[path].get("channels_last") or []
        return " / ".join(f"{r['speedup']:.2f}× (batch {r['batch']})" for r in rows) or "not measured (an older run)"

    paths = list(FIGURE_RUNS)

    def ratios(contender: str, key: str = "ratio_to_floor", digits: int = 2) -> list[str]:
        return [per_batch(p, contender, key, digits) for p in paths]

    rows = [
        ("batch sizes", *(batches(p) for p in paths)),
        ("forward pass, ms per image, by batch", *ratios("floor: torchvision forward", "ms_per_image", 1)),
        ("Grad-CAM ÷ forward, in process, by batch", *ratios("engine: Grad-CAM")),
        ("Grad-CAM + overlay encoding ÷ forward, by batch", *ratios("engine: Grad-CAM + overlay encoding")),
        ("pytorch-grad-cam ÷ Grad-CAM, by batch", *(peer(p) for p in paths)),
        ("service, images/s at its best concurrency", *(service(p) for p in paths)),
        ("service p50 at concurrency 1, ms", *(latency(p) for p in paths)),
        ("CPU: p50 at concurrency 1 − fp32 forward at batch 1, ms", *(target(p, "CPU: p50") for p in paths)),
        ("CPU: service images/s ÷ fp32 forward images/s at batch 8", *(target(p, "CPU: service") for p in paths)),
        ("GPU: service images/s ÷ in-process Grad-CAM images/s", *(target(p, "GPU: service") for p in paths)),
        ("GPU: p50 at concurrency 1 − in-process batch 1, ms", *(target(p, "GPU: p50") for p in paths)),
        ("channels_last speed-up of Grad-CAM, by batch", *(channels_last(p) for p in paths)),
        ("a lone request's p50, where it goes, ms", *(profile(p) for p in paths)),
        ("under load, where an image's service time goes, ms", *(loaded(p) for p in paths)),
        ("response bytes, µs per response", *(response_bytes(p) for p in paths)),
        ("maxBatchDelay: images/s and p50 ms", *(batch_delays(p) for p in paths)),
        ("worker RSS after warm-up → after the soak, MB", *(memory(p) for p in paths)),
    ]
    method_names = [row["method"] for row in runs[paths[0]]["methods"]]
    method_rows = []
    for name in method_names:
        cells = []
        for path in paths:
            row = next((r for r in runs[path]["methods"] if r["method"] == name), None)
            cells.append(f"{row['ratio_to_floor']:.2f} (batch {row['batch']})" if row else "")
        method_rows.append((f"`{name}` ÷ forward, timed alone against it", *cells))
    lines = [
        f"{FIGURES_START} (generated by `python scripts/bench.py --readme-figures` from the runs named in each "
        "column; rerun the benchmark, not this block) -->",
        *_table(["figure", *(FIGURE_RUNS[p] for p in paths)], "l" + "r" * len(paths), [*rows, *method_rows])[1:],
        "",
        f"Runs: {'; '.join(device(p) for p in paths)}. Seeded random weights. The in-process rows time four "
        "contenders round-robin; the method rows time each method against the forward pass alone in the same run, "
        "so the two Grad-CAM ratios are two timings of one call and differ by that run's noise.",
        FIGURES_END,
    ]
    return "\n".join(lines)


def replace_readme_figures(readme: str, figures: str) -> str:
    """``readme`` with its figures block (from :data:`FIGURES_START` to :data:`FIGURES_END`) replaced."""
    return replace_readme_block(readme, FIGURES_START, FIGURES_END, figures)


COSTS_START = "<!-- method-costs:start"
COSTS_END = "<!-- method-costs:end -->"
COSTS_RUN = "docs/bench/bench.json"
"""The benchmark run whose method rows the README's cost table quotes."""


def readme_method_costs(root: Path) -> str:
    """The README's table of what each method costs, generated from :data:`COSTS_RUN`."""
    run = json.loads((root / COSTS_RUN).read_text())
    machine = run["machine"]
    lines = [
        f"{COSTS_START} (generated by `python scripts/bench.py --readme-figures` from `{COSTS_RUN}`) -->",
        *_table(
            ["method", "batch", "ms / image", "× forward pass"],
            "lrrr",
            [
                (f"`{row['method']}`", row["batch"], f"{row['ms_per_image']:.1f}", f"{row['ratio_to_floor']:.2f}")
                for row in run["methods"]
            ],
        )[1:],
        "",
        f"Measured at `{run['config']['layer']}` of a ResNet-50 with seeded random weights on {machine['cores']} "
        f"{machine['cpu']} cores (torch {machine['torch']}), each method timed round-robin against the plain forward "
        "pass at the same batch. ScoreCAM and Ablation-CAM score 64 channels, one image at a time. Not timed: `sess`, "
        "2 × 122 + 1 passes per image (over the shipped budget), and `faithfulness`, 2S + 1 extra passes per "
        "explanation (33 at S = 16), both counted in the work budget.",
        COSTS_END,
    ]
    return "\n".join(lines)


def replace_readme_block(readme: str, start_marker: str, end_marker: str, block: str) -> str:
    start, end = readme.index(start_marker), readme.index(end_marker) + len(end_marker)
    return readme[:start] + block + readme[end:]
