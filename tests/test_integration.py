"""A real torchserve on free loopback ports, with the shipped config.properties and token authorization on.

The .mar is built once per session (random weights, batchSize 8); the server starts once for this module and is
stopped in a finalizer, even when tests fail.
"""

from __future__ import annotations

import base64
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import requests

from handler.local_server import run_torchserve
from tests.conftest import encode, sample_photos

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if shutil.which("java") is None:
    pytest.skip("TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(built_mar, tmp_path_factory):
    with run_torchserve(built_mar, tmp_path_factory.mktemp("torchserve")) as running:
        assert "disable_token_authorization=false" in (running.workdir / "config.properties").read_text()
        yield running


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
    batch_sizes = [int(n) for n in re.findall(r"answered a batch of (\d+) requests", server.model_log())]
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
    pid_before = server.worker_pids()
    for body in (b"this is not an image", b"", encode(chelsea, "PNG")[:500]):
        response = requests.put(
            f"{server.inference}/predictions/resnet50", data=body, headers=server.headers(), timeout=60
        )
        assert 400 <= response.status_code < 500, response.text
        error = response.json()
        assert error["code"] == response.status_code and error["type"] and error["message"]
    assert requests.get(f"{server.inference}/ping", headers=server.headers(), timeout=10).json()["status"] == "Healthy"
    assert server.worker_pids() == pid_before
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
    try:
        response = server.scale(2)
        assert response.status_code == 200, response.text
        workers = server.describe()["workers"]
        assert len(workers) == 2 and all(w["status"] == "READY" for w in workers)
        assert server.predict(files={"data": ("cat.png", encode(chelsea, "PNG"))}).status_code == 200
    finally:
        server.scale(1)
    assert len(server.describe()["workers"]) == 1


def test_every_method_layer_and_top_n_through_the_server(server, chelsea):
    from handler.cam import METHODS

    files = {"data": ("cat.png", encode(chelsea, "PNG"))}
    for method, layer in zip(METHODS, ["layer4", "layer3", "layer4.2", "layer3.5.conv2", "layer2", "layer4", "layer4"]):
        response = server.predict(files=files, data={"method": method, "layer": layer, "explain": "2"})
        assert response.status_code == 200, (method, response.text)
        answer = response.json()
        assert [(e["method"], e["layer"]) for e in answer["explanations"]] == [(method, layer)] * 2
        assert [e["index"] for e in answer["explanations"]] == [p["index"] for p in answer["predictions"][:2]]
        assert_valid_answer(answer, 451, 300)


def test_unknown_layer_is_a_400_listing_the_valid_ones(server, chelsea):
    response = server.predict(files={"data": ("cat.png", encode(chelsea, "PNG"))}, data={"layer": "layer5"})
    assert response.status_code == 400
    message = response.json()["message"]
    assert "layer must be one of conv1" in message and "layer4" in message and "'layer5'" in message
