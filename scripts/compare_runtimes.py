"""Both runtimes side by side on one archive, in one run: TorchServe (the shipped config, its batching) and KServe's
own model server (python -m camserve.kserve). For each: p50 of one request at a time, and images/s with 8 clients
each sending one image per request; for KServe also one request carrying 8 instances (what KServe's batcher makes
of 8 concurrent requests in a cluster).

Both servers run at once and are loaded in turn, round-robin for ``--rounds`` rounds, so that the drift of a shared
machine hits both alike; each row is the median of its rounds.

  python scripts/compare_runtimes.py --weights random --requests 48 --rounds 5 --out docs/bench/runtimes.md
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import requests

from camserve.imaging import encode_image
from camtools.archive import build_archive
from camtools.bench.context import sample_images
from camtools.bench.service import batch_lines, log_marks
from camtools.local_server import batch_images, free_port, run_torchserve
from camtools.models import prepare_model

ROOT = Path(__file__).resolve().parent.parent


def timed(send, requests_count: int, clients: int) -> tuple[float, float]:
    """(p50 ms, requests/s) of ``requests_count`` calls of ``send(i)`` from ``clients`` threads."""
    latencies = []

    def one(i: int) -> None:
        started = time.perf_counter()
        response = send(i)
        assert response.status_code == 200, response.text[:500]
        latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, range(requests_count)))
    return 1000 * statistics.median(latencies), requests_count / (time.perf_counter() - started)


def kserve_server(archive: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "camserve.kserve", "--model-dir", str(archive), "--http-port", str(port)]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).ok:
                return process
        except requests.RequestException:
            time.sleep(0.5)
    raise RuntimeError("the KServe model server did not become ready: " + log.read_text()[-2000:])


TORCHSERVE, KSERVE = "TorchServe 0.12.0", "KServe 0.21.0 (camserve.kserve)"


def mean_batch(runtime: str, server, port: int, model: str, measure):
    """``measure()``'s result and the mean images per batch the runtime ran meanwhile: TorchServe's from its
    worker's batch log lines, KServe's from its micro-batcher's histogram."""
    if runtime == TORCHSERVE:
        marks = log_marks(server)
        result = measure()
        time.sleep(0.5)  # the worker's log reaches its file a moment after the last answer
        sizes = [requests_count for requests_count, _, _ in batch_lines(server, marks)]
        return result, sum(sizes) / max(1, len(sizes))
    url = f"http://127.0.0.1:{port}"
    before = batch_images(url, model)
    result = measure()
    batches, images = (after - earlier for after, earlier in zip(batch_images(url, model), before, strict=True))
    return result, images / max(1.0, batches)


def _loads(server, model: str, port: int, photos: list[str]):
    """(row, send(i), clients, images per request) of each measurement, TorchServe's and KServe's in turn."""
    torchserve_url = f"{server.inference}/predictions/{model}"
    kserve_url = f"http://127.0.0.1:{port}/v1/models/{model}:predict"

    def torchserve_send(i: int) -> requests.Response:
        return requests.post(torchserve_url, json={"image": photos[i % 8]}, headers=server.headers(), timeout=300)

    def kserve_send(i: int, count: int = 1) -> requests.Response:
        instances = [{"data": photos[(i + k) % 8]} for k in range(count)]
        return requests.post(kserve_url, json={"instances": instances}, timeout=300)

    for clients in (1, 8):
        load = f"{clients} client(s), 1 image per request"
        yield (TORCHSERVE, load), torchserve_send, clients, 1
        yield (KSERVE, load), kserve_send, clients, 1
    yield (KSERVE, "1 client, 8 instances per request"), lambda i: kserve_send(i, 8), 1, 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--requests", type=int, default=48, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds; each row is their median")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    photos = [base64.b64encode(encode_image(image, "jpeg")).decode() for image in sample_images(8)]
    measured: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="runtimes-") as folder:
        folder = Path(folder)
        archive = build_archive(prepare_model(arch=args.arch, weights=args.weights), folder / "store")
        port = free_port()
        process = kserve_server(archive, port, folder / "kserve.log")
        try:
            with run_torchserve(archive, folder / "torchserve") as server:
                for _, send, clients, _ in _loads(server, archive.stem, port, photos):  # warm-up, not counted
                    timed(send, 2 * clients, clients)
                for _ in range(args.rounds):
                    for row, send, clients, images in _loads(server, archive.stem, port, photos):
                        count = args.requests if images == 1 else max(2, args.requests // images)
                        measure = partial(timed, send, count, clients)
                        (p50, rate), batch = mean_batch(row[0], server, port, archive.stem, measure)
                        measured.setdefault(row, []).append((p50, images * rate, batch))
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    rows = [(*row, *map(statistics.median, zip(*values, strict=True))) for row, values in measured.items()]
    lines = [
        f"{args.arch}, {args.weights} weights, {args.requests} requests per row, {os.cpu_count()} CPU cores; both "
        f"servers up, loaded in turn for {args.rounds} rounds, each row the median of its rounds:",
        "",
        "| runtime | load | p50 ms per request | images / s | images per batch |",
        "|---|---|---:|---:|---:|",
        *(f"| {runtime} | {load} | {p50:.0f} | {rate:.1f} | {batch:.1f} |" for runtime, load, p50, rate, batch in rows),
    ]
    loaded = "8 client(s), 1 image per request"
    kserve, torchserve = ([rate for _, rate, _ in measured[(runtime, loaded)]] for runtime in (KSERVE, TORCHSERVE))
    ratios = ", ".join(f"{k / t:.2f}" for k, t in zip(kserve, torchserve, strict=True))
    lines += ["", f"KServe's images/s over TorchServe's with 8 clients, round by round: {ratios}."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
