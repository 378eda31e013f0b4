"""A real torchserve on free loopback ports, with the shipped config.properties and token authorization on.

The .mar is built once per session (random weights, batchSize 8); the server starts once for this module and is
stopped in a finalizer, even when tests fail.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from tests.conftest import ROOT, encode, sample_photos

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if shutil.which("java") is None:
    pytest.skip("TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)", allow_module_level=True)

TORCHSERVE = str(Path(sys.executable).with_name("torchserve"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    inference: str
    management: str
    keys: dict[str, str]
    workdir: Path

    def headers(self, api: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[api]}"}

    def predict(self, path: str = "predictions", **kwargs) -> requests.Response:
        return requests.post(f"{self.inference}/{path}/resnet50", headers=self.headers(), timeout=120, **kwargs)

    def describe(self) -> dict:
        response = requests.get(f"{self.management}/models/resnet50", headers=self.headers("management"), timeout=30)
        response.raise_for_status()
        return response.json()[0]


def shipped_config_for_test(store: Path, ports: dict[str, int]) -> str:
    """The shipped config.properties with its ports moved to free ones; everything else, auth included, as shipped."""
    text = (ROOT / "config.properties").read_text()
    for key, port in ports.items():
        text = re.sub(rf"^{key}=http://127\.0\.0\.1:\d+$", f"{key}=http://127.0.0.1:{port}", text, flags=re.M)
    text = re.sub(r"^model_store=.*$", f"model_store={store}", text, flags=re.M)
    return text + f"\ninitial_worker_port={free_port()}\n"


@pytest.fixture(scope="module")
def server(built_mar, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("torchserve")
    ports = {name: free_port() for name in ("inference_address", "management_address", "metrics_address")}
    config = workdir / "config.properties"
    config.write_text(shipped_config_for_test(built_mar.parent, ports))
    assert "disable_token_authorization=false" in config.read_text()
    tmp = workdir / "tmp"
    tmp.mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "TEMP": str(tmp),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    log = open(workdir / "torchserve.out", "w")  # noqa: SIM115 - closed in the finalizer
    command = [TORCHSERVE, "--start", "--foreground", "--ncs", "--model-store", str(built_mar.parent), "--ts-config"]
    process = subprocess.Popen(
        [*command, str(config)], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        running = Server(
            inference=f"http://127.0.0.1:{ports['inference_address']}",
            management=f"http://127.0.0.1:{ports['management_address']}",
            keys={},
            workdir=workdir,
        )
        wait_until_ready(running, process, workdir)
        yield running
    finally:
        subprocess.run([TORCHSERVE, "--stop"], cwd=workdir, env=env, capture_output=True, timeout=60)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


def wait_until_ready(server: Server, process: subprocess.Popen, workdir: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"torchserve exited with {process.returncode}:\n{(workdir / 'torchserve.out').read_text()[-4000:]}"
            )
        key_file = workdir / "key_file.json"
        if key_file.exists():
            try:
                keys = json.loads(key_file.read_text())
                server.keys = {api: keys[api]["key"] for api in ("inference", "management")}
                if any(worker["status"] == "READY" for worker in server.describe()["workers"]):
                    return
            except (requests.RequestException, json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.5)
    pytest.fail(f"resnet50 was not ready in {timeout_s} s:\n{(workdir / 'torchserve.out').read_text()[-4000:]}")


def model_log(server: Server) -> str:
    return (server.workdir / "logs" / "model_log.log").read_text()


def heatmap_of(explanation: dict) -> np.ndarray:
    levels = cv2.imdecode(np.frombuffer(base64.b64decode(explanation["heatmap"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert levels.dtype == np.uint16
    return levels.astype(np.float64) / 65535.0


def assert_valid_answer(answer: dict, width: int, height: int) -> None:
    assert answer["model"] == {"name": "resnet50", "version": "1.0", "weights": "random"}
    assert answer["image"] == {"width": width, "height": height}
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(answer["explanations"][0]["overlay"]), np.uint8), 1)
    assert overlay.shape == (height, width, 3)


def test_raw_body(server, chelsea):
    response = requests.put(
        f"{server.inference}/predictions/resnet50", data=encode(chelsea, "JPEG"), headers=server.headers(), timeout=120
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert_valid_answer(answer, 451, 300)
    assert len(answer["predictions"]) == 5
    assert answer["explanations"][0]["index"] == answer["predictions"][0]["index"]


def test_multipart_with_options(server, chelsea):
    fields = {"target": "281,282", "topk": "3", "format": "png", "heatmap": "true", "colormap": "viridis"}
    response = server.predict(files={"data": ("cat.png", encode(chelsea, "PNG"))}, data=fields)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert_valid_answer(answer, 451, 300)
    assert len(answer["predictions"]) == 3
    assert [(e["index"], e["label"], e["format"]) for e in answer["explanations"]] == [
        (281, "tabby", "png"),
        (282, "tiger cat", "png"),
    ]
    assert heatmap_of(answer["explanations"][0]).shape == (300, 451)


def test_json_body(server, chelsea):
    body = {"image": base64.b64encode(encode(chelsea, "JPEG")).decode(), "target": 281, "topk": 1, "alpha": 0.3}
    response = server.predict(json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert_valid_answer(answer, 451, 300)
    assert [e["index"] for e in answer["explanations"]] == [281]


def test_explanations_endpoint_gives_the_same_answer(server, chelsea):
    fields = {"target": "281", "heatmap": "true"}
    files = {"data": ("cat.png", encode(chelsea, "PNG"))}
    predicted = server.predict(files=files, data=fields).json()
    explained = server.predict("explanations", files=files, data=fields).json()
    assert explained == predicted


def test_concurrent_distinct_images_each_get_their_own_answer(server):
    photos = sample_photos()
    bodies = [encode(photo, "PNG") for photo in photos]

    def ask(body: bytes) -> dict:
        response = server.predict(files={"data": ("image.png", body)}, data={"heatmap": "true"})
        assert response.status_code == 200, response.text
        return response.json()

    alone = [ask(body) for body in bodies]
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        together = list(pool.map(ask, bodies))
    batch_sizes = [int(n) for n in re.findall(r"answered a batch of (\d+) requests", model_log(server))]
    assert max(batch_sizes) > 1, "the concurrent requests were never batched"
    for photo, single, batched in zip(photos, alone, together, strict=True):
        height, width = photo.shape[:2]
        assert batched["image"] == {"width": width, "height": height}
        assert batched["predictions"][0]["index"] == single["predictions"][0]["index"]
        a, b = heatmap_of(single["explanations"][0]).ravel(), heatmap_of(batched["explanations"][0]).ravel()
        if a.std() == 0 or b.std() == 0:
            np.testing.assert_allclose(a, b, atol=1e-4)
        else:
            assert np.corrcoef(a, b)[0, 1] > 0.999


def test_bad_body_gets_a_4xx_and_the_server_stays_healthy(server, chelsea):
    pid_before = [w["pid"] for w in server.describe()["workers"]]
    for body in (b"this is not an image", b"", encode(chelsea, "PNG")[:500]):
        response = requests.put(
            f"{server.inference}/predictions/resnet50", data=body, headers=server.headers(), timeout=60
        )
        assert 400 <= response.status_code < 500, response.text
        error = response.json()
        assert error["code"] == response.status_code and error["type"] and error["message"]
    assert requests.get(f"{server.inference}/ping", headers=server.headers(), timeout=10).json()["status"] == "Healthy"
    assert [w["pid"] for w in server.describe()["workers"]] == pid_before
    assert server.predict(files={"data": ("cat.png", encode(chelsea, "PNG"))}).status_code == 200


def test_bad_option_names_what_was_wrong(server, chelsea):
    response = server.predict(files={"data": ("cat.png", encode(chelsea, "PNG"))}, data={"topk": "50"})
    assert response.status_code == 400
    assert response.json() == {
        "code": 400,
        "type": "InvalidOption",
        "message": "topk must be an integer from 1 to 20, got '50'",
    }


def test_request_without_the_token_is_refused(server, chelsea):
    response = requests.put(f"{server.inference}/predictions/resnet50", data=encode(chelsea, "PNG"), timeout=60)
    assert response.status_code in (400, 401, 403)
    assert "Token Authorization failed" in response.text


def test_worker_scaling_through_the_management_api(server, chelsea):
    url = f"{server.management}/models/resnet50"
    headers = server.headers("management")
    try:
        response = requests.put(url, params={"min_worker": 2, "synchronous": "true"}, headers=headers, timeout=180)
        assert response.status_code == 200, response.text
        workers = server.describe()["workers"]
        assert len(workers) == 2 and all(w["status"] == "READY" for w in workers)
        assert server.predict(files={"data": ("cat.png", encode(chelsea, "PNG"))}).status_code == 200
    finally:
        requests.put(
            url, params={"min_worker": 1, "max_worker": 1, "synchronous": "true"}, headers=headers, timeout=180
        )
    assert len(server.describe()["workers"]) == 1
