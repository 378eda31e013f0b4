"""The service end to end: a real TorchServe at each batch delay, under load, where a lone request's time goes,
and the worker's memory."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from camserve.imaging import encode_image
from camserve.settings import COMPILE_STARTUP_TIMEOUT_S
from camtools.archive import ServingConfig
from camtools.bench.context import BenchConfig
from camtools.models import PreparedModel


def measure_service(
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
    levels, memory, delays, profile, photos = [], {}, [], {}, []
    for index, delay in enumerate(config.batch_delays_ms):
        with tempfile.TemporaryDirectory(prefix="bench-", dir=workdir) as scratch:
            serving = ServingConfig(
                batch_size=config.server_batch_size,
                max_batch_delay_ms=delay,
                precision=config.server_precision,
                channels_last=config.server_channels_last,
                compile=config.server_compile,
            )
            mar = build_archive(prepared, Path(scratch) / "store", config=serving)
            starting = {"timeout_s": COMPILE_STARTUP_TIMEOUT_S} if config.server_compile else {}  # it compiles
            with run_torchserve(mar, Path(scratch) / "server", **starting) as server:
                if index == 0:
                    for concurrency in config.concurrency:
                        floor_batch = {1: 1, max(config.concurrency): max(config.batch_sizes)}.get(concurrency)
                        floor_ms = floor(floor_batch) if floor and floor_batch else None
                        marks = log_marks(server)
                        profiled = concurrency == max(config.concurrency)
                        levels.append(_load(server, bodies, concurrency, config.requests_per_level, profiled=profiled))
                        if floor_ms is not None:
                            levels[-1] |= {"floor_batch": floor_batch, "floor_ms_per_image": floor_ms}
                        if concurrency == 1:
                            profile |= _profile(server, marks, levels[-1])
                        if profiled:
                            profile |= {k: v for k, v in levels[-1].items() if k.startswith("loaded_")}
                    memory = _memory(server, bodies, config.soak_requests)
                    photos = _photos_served(server, config, floor)
                    measured = [level for level in levels if level["concurrency"] in (1, max(config.concurrency))]
                else:
                    measured = [
                        _load(server, bodies, concurrency, config.requests_per_level)
                        for concurrency in sorted({1, max(config.concurrency)})
                    ]
                delays += [{"batch_delay_ms": delay, **level} for level in measured]
    return levels, memory, delays, profile, photos


PHOTO_CONCURRENCY = 8
"""The concurrency at which the service's photo throughput is measured, against the forward pass at batch 8."""
PHOTO_THROUGHPUT_TARGET = 0.8
"""1080p photos at concurrency 8: at least this share of the plain forward pass's images/s at batch 8."""
LOG_WAIT_S = 10.0
"""How long a loaded profile waits for the worker's log lines of the requests it timed."""
PHOTO_ROUNDS = 3
"""1080p at concurrency 8 is measured in this many rounds, each against the forward pass timed right before it: this
shared host drifts by a third within minutes, and the median of the rounds' ratios is quoted."""


def _photos_served(server, config: BenchConfig, floor: Callable[[int], float] | None) -> list[dict[str, object]]:
    """Camera-like phone photos (:func:`camera_photo`) through TorchServe end to end (the shipped max_side
    2048): for each size, a lone request's profile (the client's p50, the frontend's queue and backend times, the
    worker protocol, the handler's stages) against the plain forward pass at batch 1 timed right before; then 1080p
    photos at concurrency 8 against the forward pass at batch 8, in rounds (:func:`_loaded_rounds`)."""
    from camtools.bench.imagework import PHOTOS, camera_photo
    from camtools.bench.inprocess import PHOTO_TARGETS_MS

    rows = []
    for name, size in PHOTOS.items():
        body = camera_photo(size)
        floor_ms = floor(1) if floor else None
        marks = log_marks(server)
        level = _load(server, [body], 1, max(4, config.requests_per_level // 6))
        row = {"photo": name, "width": size[0], "height": size[1], "jpeg_bytes": len(body), **level}
        row |= _profile(server, marks, level)
        if floor_ms is not None:
            row |= {"floor_ms": floor_ms, "over_floor_ms": level["p50_ms"] - floor_ms}
            row["target_over_floor_ms"] = PHOTO_TARGETS_MS[name]
        rows.append(row)
        if name == "1080p":
            photo = {"photo": name, "width": size[0], "height": size[1], "jpeg_bytes": len(body)}
            rows.append(photo | _loaded_rounds(server, body, config, floor))
    return rows


def _loaded_rounds(server, body: bytes, config: BenchConfig, floor: Callable[[int], float] | None) -> dict:
    """``body`` at :data:`PHOTO_CONCURRENCY` against the forward pass at that batch timed right before, in
    :data:`PHOTO_ROUNDS` rounds: the median round, with every round's ratio (one round, unrated, without ``floor``)
    and where its images' time went (:func:`_loaded_profile`)."""
    rounds = []
    for index in range(PHOTO_ROUNDS if floor else 1):
        floor_ms = floor(PHOTO_CONCURRENCY) if floor else None
        level = _load(server, [body], PHOTO_CONCURRENCY, config.requests_per_level, warm=index > 0, profiled=True)
        if floor_ms is not None:
            level |= {"floor_ms": floor_ms, "ratio_to_floor": level["images_per_s"] * floor_ms / 1000}
            level["target_ratio"] = PHOTO_THROUGHPUT_TARGET
        rounds.append(level)
    rounds.sort(key=lambda level: level.get("ratio_to_floor", level["images_per_s"]))
    median = rounds[len(rounds) // 2]
    if floor:
        median["round_ratios"] = [level["ratio_to_floor"] for level in rounds]
    return median


def log_marks(server) -> dict[str, int]:
    """How far the worker's and the frontend's logs go now: a profile reads only what comes after."""
    return {name: _read_log(server, name).count("\n") for name in ("model_log", "ts_log")}


def _read_log(server, name: str) -> str:
    path = server.workdir / "logs" / f"{name}.log"
    return path.read_text() if path.exists() else ""


def batch_lines(server, marks: dict[str, int]) -> list[tuple[int, float, dict[str, float]]]:
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
    for requests, handler_ms, stage_ms in batch_lines(server, marks):
        # Lone requests that were explained (a refused one logs no forward pass): every stage's median is then over
        # the same batches, so the forward pass's median stays below the handler's.
        if requests == 1 and "forward" in stage_ms:
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
    """Where an image's time goes under load (ms per image, summed over the level's batches since ``marks``): the
    handler's stages, and the rest of the service's time per image (TorchServe, and the client's own share of the
    CPU when it runs on the same machine). TorchServe writes the worker's log lines after the answers: this waits
    for the level's requests to appear there, up to :data:`LOG_WAIT_S`."""
    deadline = time.monotonic() + LOG_WAIT_S
    batches = batch_lines(server, marks)
    while sum(requests for requests, _, _ in batches) < level["requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
        batches = batch_lines(server, marks)
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
    loaded["loaded_client_cpu_ms_per_image"] = level["client_cpu_ms_per_image"]
    return loaded


def _load(
    server, bodies: Sequence[bytes], concurrency: int, count: int, warm: bool = False, profiled: bool = False
) -> dict[str, object]:
    """``count`` requests from ``concurrency`` clients, after a warm-up of two each (one each, which opens its
    connection, when the server is ``warm`` already); with the CPU time the clients took (this process's), which on
    one machine is not the service's. ``profiled``: with where the timed requests' time went in the worker
    (:func:`_loaded_profile`, from the log lines written after the warm-up)."""
    import requests

    sessions = [requests.Session() for _ in range(concurrency)]

    def one(index: int) -> tuple[float, int]:
        started = time.perf_counter()
        response = server.predict(session=sessions[index % concurrency], data=bodies[index % len(bodies)])
        return time.perf_counter() - started, response.status_code

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency * (1 if warm else 2))))  # warm-up
        marks = log_marks(server) if profiled else {}
        serving = serving_pids(server) if profiled else {}
        before = {name: process_cpu_s(pids) for name, pids in serving.items()}
        started, cpu = time.perf_counter(), time.process_time()
        results = list(pool.map(one, range(count)))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        used = {name: process_cpu_s(pids) - before[name] for name, pids in serving.items()}
    latencies = np.array([seconds for seconds, _ in results]) * 1000
    level = {
        "concurrency": concurrency,
        "requests": count,
        "errors": sum(status != 200 for _, status in results),
        "images_per_s": count / wall,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "client_cpu_ms_per_image": 1000 * cpu / count,
    }
    if not profiled:
        return level
    return level | _loaded_profile(server, marks, level) | cpu_use(used, cpu, wall, count)


def serving_pids(server) -> dict[str, list[int]]:
    """The processes that serve: TorchServe's workers, and their parent, the Java frontend that started them."""
    workers = server.worker_pids()
    return {"worker": workers, "frontend": sorted({int(_stat(pid)[1]) for pid in workers})}


def process_cpu_s(pids: Sequence[int]) -> float:
    """The CPU seconds that processes have used so far, all their threads, user and system."""
    return sum(int(fields[11]) + int(fields[12]) for fields in map(_stat, pids)) / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """``/proc/PID/stat``'s fields after the command's name: state, ppid, ..., utime (index 11), stime (12)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def cpu_use(serving: dict[str, float], client: float, wall: float, count: int) -> dict[str, float]:
    """Where the machine's CPU went while ``count`` images were served in ``wall`` seconds: each ``serving``
    process's CPU seconds and the load generator's (``client``), as ms per image; the share of the cores that was
    busy; and the images/s that the same CPU per image allows with every core busy, the most this machine can serve
    whatever the scheduling."""
    cores = len(os.sched_getaffinity(0))
    total = sum(serving.values()) + client
    use = {f"loaded_cpu_{name}_ms_per_image": 1000 * value / count for name, value in serving.items()}
    return use | {
        "loaded_cpu_ms_per_image": 1000 * total / count,
        "loaded_cores": cores,
        "loaded_cores_busy": total / (cores * wall),
        "loaded_cpu_bound_images_per_s": cores * count / total,
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
