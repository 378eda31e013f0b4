"""The benchmark's shared context: its configuration, the model and images every section times, the timer and
the machine."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from camtools.archive import ServingConfig


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
    server_compile: bool = ServingConfig.compile
    """The service with the network before its default layer compiled (:mod:`camserve.cam.compiled`)."""
    batch_delays_ms: tuple[int, ...] = (ServingConfig.max_batch_delay_ms, 5)
    """TorchServe's maxBatchDelay for the service: the first gets every concurrency level and the memory soak, the
    others concurrency 1 and the highest level, to choose the default from."""
    server_batch_size: int = ServingConfig.batch_size
    channels_last_batches: tuple[int, ...] = (1, 2, 4, 8)
    weights: str = "random"
    """imagenet, random or a state_dict path: speed does not depend on the weights, agreement does."""
    detector: str = "fasterrcnn_mobilenet_v3_large_320_fpn"
    segmenter: str = "lraspp_mobilenet_v3_large"
    """The detector's and segmenter's rows: torchvision builders, seeded random weights."""
    audit_images: tuple[int, int] = (48, 240)
    """The audit section's two runs: their difference cancels Ray's start-up and the actors' loading."""
    sections: tuple[str, ...] = ()
    """Run only these in-process sections (their report fields: ``methods``, ``audit``, ...); () runs every one."""


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


def make_timer(device: torch.device) -> Callable[[dict[str, Callable[[], object]], int, int], dict[str, float]]:
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
    sanity: list[dict[str, object]] = field(default_factory=list)
    vit: list[dict[str, object]] = field(default_factory=list)
    """The methods that need a vision transformer, on ViT-B/16."""
    """The sanity check's cost: explanations with and without it, each against the plain forward pass."""
    fast_paths: list[dict[str, object]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    image_work: list[dict[str, object]] = field(default_factory=list)
    """Each step of a camera-like photo's image work, per codec (:mod:`camtools.bench.imagework`)."""
    photos: list[dict[str, object]] = field(default_factory=list)
    service_photos: list[dict[str, object]] = field(default_factory=list)
    """Phone photos through TorchServe end to end: a lone request's profile per size, 1080p at concurrency 8."""
    dense: list[dict[str, object]] = field(default_factory=list)
    channels_last: list[dict[str, object]] = field(default_factory=list)
    response_bytes: list[dict[str, object]] = field(default_factory=list)
    service: list[dict[str, object]] = field(default_factory=list)
    batch_delays: list[dict[str, object]] = field(default_factory=list)
    profile: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    targets: list[dict[str, object]] = field(default_factory=list)
    audit: dict[str, object] = field(default_factory=dict)
    """The dataset audit on Ray Data: its marginal throughput against the plain forward pass at batch 8."""


@dataclass(frozen=True)
class BenchContext:
    """What every section of one run shares: the configuration, the device and its timer, the model, its spec and
    the sample images."""

    config: BenchConfig
    device: torch.device
    timed: Callable[[dict[str, Callable[[], object]], int, int], dict[str, float]]
    model: torch.nn.Module
    spec: object
    images: list[np.ndarray]
