"""Run a real torchserve on free loopback ports with the shipped config.properties, for tests and benchmarks.

Everything but the ports and the model store is as configured, token authorization included. Not shipped in the .mar.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import requests

__all__ = ["LocalTorchServe", "batch_images", "free_port", "run_torchserve"]

ROOT = Path(__file__).resolve().parent.parent
TORCHSERVE = shutil.which("torchserve") or str(Path(sys.executable).with_name("torchserve"))
ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LocalTorchServe:
    """A running torchserve: its URLs, its tokens and its working directory (logs/, key_file.json)."""

    inference: str
    management: str
    metrics: str
    workdir: Path
    keys: dict[str, str] = field(default_factory=dict)
    model: str = "resnet50"

    def headers(self, api: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[api]}"} if self.keys else {}

    def predict(self, path: str = "predictions", session: requests.Session | None = None, **kwargs):
        sender = session or requests
        url = f"{self.inference}/{path}/{self.model}"
        return sender.post(url, headers=self.headers(), timeout=kwargs.pop("timeout", 120), **kwargs)

    def describe(self) -> dict:
        url = f"{self.management}/models/{self.model}"
        response = requests.get(url, headers=self.headers("management"), timeout=30)
        response.raise_for_status()
        return response.json()[0]

    def scale(self, workers: int, timeout_s: float = 180) -> requests.Response:
        params = {"min_worker": workers, "max_worker": workers, "synchronous": "true"}
        url = f"{self.management}/models/{self.model}"
        return requests.put(url, params=params, headers=self.headers("management"), timeout=timeout_s)

    def worker_pids(self) -> list[int]:
        return [int(worker["pid"]) for worker in self.describe()["workers"]]

    def model_log(self) -> str:
        return (self.workdir / "logs" / "model_log.log").read_text()


def config_for(store: Path, ports: dict[str, int], extra: str = "", source: Path = ROOT / "config.properties") -> str:
    """``source`` (the shipped config.properties by default) on loopback with free ports and the given model store;
    ``extra`` lines are appended."""
    text = source.read_text()
    for key, port in ports.items():
        text = re.sub(rf"^{key}=http://[^:/]+:\d+$", f"{key}=http://127.0.0.1:{port}", text, flags=re.M)
    text = re.sub(r"^model_store=.*$", f"model_store={store}", text, flags=re.M)
    text = re.sub(
        r"^metrics_config=(.*)$", lambda m: f"metrics_config={_local_path(m.group(1), source)}", text, flags=re.M
    )
    grpc = f"grpc_inference_port={free_port()}\ngrpc_management_port={free_port()}\n"
    return f"{text}\ninitial_worker_port={free_port()}\n{grpc}{extra}"


KSERVE_MOUNT = "/mnt/models/"
"""Where KServe mounts the storageUri in a predictor pod: config/ and model-store/ sit below it."""


def _local_path(path: str, source: Path) -> Path:
    """A path from a config file, on this machine: a KServe pod path maps into the storage layout that ``source``
    (its config/config.properties) belongs to; a relative one is the repository's."""
    if path.startswith(KSERVE_MOUNT):
        return source.parent.parent / path[len(KSERVE_MOUNT) :]
    return ROOT / path


PORT_TAKEN = "Address already in use"
"""What TorchServe prints when a port that :func:`free_port` found free was taken before it bound it."""


@contextmanager
def run_torchserve(
    mar: Path, workdir: Path, extra_config: str = "", timeout_s: float = 180, config_source: Path | None = None
) -> Iterator[LocalTorchServe]:
    """Start torchserve serving every archive in ``mar``'s folder (``load_models=all``) and wait until each has a
    READY worker; always stop it on exit. The server's ``model`` is ``mar``'s.

    A port is free when picked and bound only later, by TorchServe: when another process takes one in between, the
    server exits saying so, and starts again on fresh ports (three tries)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / "tmp"  # TorchServe's pid file and worker sockets: private to this server
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for attempt in range(3):
        process, server, auth = _start(mar, workdir, extra_config, config_source or ROOT / "config.properties", env)
        try:
            try:
                for archive in sorted(mar.parent.glob("*.mar")):
                    _wait_until_ready(replace(server, model=archive.stem), process, timeout_s, auth)
            except _PortTaken:
                if attempt == 2:
                    raise
                (workdir / "torchserve.out").rename(workdir / f"torchserve.{attempt}.out")  # kept, to see why
                continue
            yield server
            return
        finally:
            _stop(process, workdir, env)


class _PortTaken(RuntimeError):
    """TorchServe exited because one of its ports was taken."""


def _start(
    mar: Path, workdir: Path, extra_config: str, source: Path, env: dict[str, str]
) -> tuple[subprocess.Popen, LocalTorchServe, bool]:
    """A TorchServe process on fresh free ports, with the config it was given written in ``workdir``; its server;
    whether it asks for tokens."""
    ports = {key: free_port() for key in ADDRESS_KEYS}
    config = workdir / "config.properties"
    config.write_text(config_for(mar.parent, ports, extra_config, source))
    (workdir / "key_file.json").unlink(missing_ok=True)  # a failed try's tokens are not this server's
    command = [TORCHSERVE, "--start", "--foreground", "--ncs", "--model-store", str(mar.parent)]
    with open(workdir / "torchserve.out", "w") as log:
        process = subprocess.Popen(
            [*command, "--ts-config", str(config)],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    urls = (f"http://127.0.0.1:{ports[key]}" for key in ADDRESS_KEYS)
    auth = "disable_token_authorization=true" not in config.read_text()
    return process, LocalTorchServe(*urls, workdir=workdir, model=mar.stem), auth


def _stop(process: subprocess.Popen, workdir: Path, env: dict[str, str]) -> None:
    """Stop this server by its own pid file (``torchserve --stop`` in its workdir), then its process group."""
    subprocess.run([TORCHSERVE, "--stop"], cwd=workdir, env=env, capture_output=True, timeout=60)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _wait_until_ready(server: LocalTorchServe, process: subprocess.Popen, timeout_s: float, auth: bool) -> None:
    """Wait for a READY worker of ``server.model``; with token ``auth``, the tokens go into ``server.keys`` (the
    dict it shares with the caller's server). :class:`_PortTaken` when TorchServe exited for a taken port."""
    deadline = time.monotonic() + timeout_s
    output = server.workdir / "torchserve.out"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = output.read_text()
            failure = _PortTaken if PORT_TAKEN in text else RuntimeError
            raise failure(f"torchserve exited with {process.returncode}:\n{text[-4000:]}")
        key_file = server.workdir / "key_file.json"
        if key_file.exists() or not auth:
            try:
                if auth:
                    written = json.loads(key_file.read_text())
                    server.keys.update({api: written[api]["key"] for api in ("inference", "management")})
                if any(worker["status"] == "READY" for worker in server.describe()["workers"]):
                    return
            except (requests.RequestException, json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.5)
    raise RuntimeError(f"{server.model} was not ready in {timeout_s} s:\n{output.read_text()[-4000:]}")


def batch_images(base_url: str, model: str) -> tuple[float, float]:
    """(batches, images) that a ``python -m camserve.kserve`` server at ``base_url`` has run for ``model`` so far:
    its micro-batcher's ``camserve_batch_images`` histogram, read from ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{base_url}/metrics", timeout=10).text
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "camserve_batch_images"
        for sample in family.samples
        if sample.labels.get("model_name") == model
    }
    return values.get("camserve_batch_images_count", 0.0), values.get("camserve_batch_images_sum", 0.0)
