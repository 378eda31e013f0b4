"""The benchmark: every contender in one run, on the same inputs, as ratios to the plain torchvision forward pass.

Contenders: (1) the floor, torchvision ResNet-50 under ``inference_mode``; (2) this engine in-process, Grad-CAM alone
and with overlay encoding; (3) pytorch-grad-cam's ``GradCAM``, the peer; (4) the running TorchServe service end to
end over HTTP. Also the fast paths (precision, channels_last) with their agreement, the share of decode and encode,
and the worker's memory. Not shipped in the .mar.
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

from camserve.cam import METHODS, PERTURBATION_METHODS, CamEngine, CamRequest, GradCAM, normalize_map
from camserve.imaging import encode_image, resize_for_model
from camserve.model import PRECISIONS, images_to_batch
from camserve.pipeline import ExplanationService
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
    server_channels_last: bool = True
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
    service: list[dict[str, object]] = field(default_factory=list)
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
    steps = ["in-process", "methods", "fast paths", "decode/encode share"] + (["service"] if config.server else [])
    progress = tqdm(steps, desc="benchmark", unit="step")
    for step in progress:
        progress.set_postfix_str(step)
        if step == "in-process":
            report.in_process = _in_process(model, spec, images, config, device, timed)
        elif step == "methods":
            report.methods = _method_costs(model, spec, images, config, device, timed)
        elif step == "fast paths":
            report.fast_paths = _fast_paths(model, spec, images, config, device, timed)
        elif step == "decode/encode share":
            report.stages = _stage_shares(model, spec, images, config, device)
        else:
            report.service, report.memory = _service(prepared, images, config, workdir)
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

        def floor(batch: torch.Tensor = batch) -> None:
            with torch.inference_mode():
                model(batch)

        def cam_only(batch: torch.Tensor = batch) -> None:
            normalize_map(torch.cat(engine(batch).maps), (side, side))

        def cam_and_overlays(prepared: list = prepared) -> None:
            service.explain([copy.copy(item) for item in prepared])  # explain() releases each image it renders

        def peer_gradcam(batch: torch.Tensor = batch, targets: list = top1) -> None:
            peer(input_tensor=batch, targets=[ClassifierOutputTarget(c) for c in targets])

        contenders = {
            "floor: torchvision forward": floor,
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
    for method in (m for m in METHODS if m != "sess"):  # 2 x 122 + 1 passes per image: counted, not timed
        batch_size = 1 if method in PERTURBATION_METHODS else max(config.batch_sizes)
        repeats = min(config.repeats, 2) if method in PERTURBATION_METHODS else config.repeats
        batch = images_to_batch(
            [resize_for_model(image, spec.input_size) for image in images[:batch_size]], spec, device
        )
        requests = [CamRequest(layer=config.layer, method=method)] * batch_size

        def floor(batch: torch.Tensor = batch) -> None:
            with torch.inference_mode():
                model(batch)

        medians = timed({"floor": floor, method: partial(engine, batch, requests)}, repeats, min(config.warmup, 1))
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


def _service(prepared: PreparedModel, images, config: BenchConfig, workdir: Path | None):
    from camtools.archive import ServingConfig, build_archive
    from camtools.local_server import run_torchserve

    with tempfile.TemporaryDirectory(prefix="bench-", dir=workdir) as scratch:
        serving = ServingConfig(precision=config.server_precision, channels_last=config.server_channels_last)
        mar = build_archive(prepared, Path(scratch) / "store", config=serving)
        bodies = [encode_image(image, "jpeg") for image in images[:16]]
        with run_torchserve(mar, Path(scratch) / "server") as server:
            levels = [
                _load(server, bodies, concurrency, config.requests_per_level) for concurrency in config.concurrency
            ]
            memory = _memory(server, bodies, config.soak_requests)
    return levels, memory


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
    if report.service:
        best_floor = max(r["images_per_s"] for r in report.in_process if r["contender"].startswith("floor"))
        best_service = max(level["images_per_s"] for level in report.service)
        targets.append(_target("service throughput / best in-process floor", best_service / best_floor, ">=", 0.8))
        single = next((level for level in report.service if level["concurrency"] == 1), None)
        floor1 = pick("floor: torchvision forward", 1)
        if single and floor1:
            excess = single["p50_ms"] - 1000 * floor1["seconds"]
            targets.append(_target("p50 at concurrency 1 minus forward(batch 1), ms", excess, "<=", 25.0))
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
    if report.stages:
        stages = report.stages
        shares = ", ".join(
            f"{stage} {100 * stages[f'{stage}_share']:.1f}% ({stages[f'{stage}_ms_per_image']:.1f} ms/image)"
            for stage in ("decode", "cam", "encode")
        )
        lines += ["", f"Stage shares for JPEG requests: {shares}."]
    if report.service:
        lines += _table(
            ["concurrency", "requests", "errors", "images / s", "p50 ms", "p95 ms", "p99 ms"],
            "rrrrrrr",
            [
                [s["concurrency"], s["requests"], s["errors"], f"{s['images_per_s']:.1f}"]
                + [f"{s[key]:.0f}" for key in ("p50_ms", "p95_ms", "p99_ms")]
                for s in report.service
            ],
        )
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
COSTS_RUN = "docs/bench/bench_methods.json"
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
