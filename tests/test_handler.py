"""The TorchServe handler through TorchServe's MockContext, on the archive the build script makes."""

from __future__ import annotations

import base64
import json
import sys

import numpy as np
import pytest
import torch
from ts.metrics.metric_type_enum import MetricTypes

from tests.conftest import encode
from tests.helpers import RecordingContext


@pytest.fixture(scope="module")
def served(unpacked_mar):
    sys.path.insert(0, str(unpacked_mar))  # as TorchServe does: the archive's root is importable
    try:
        from gradcam_handler import GradCamHandler

        handler = GradCamHandler()
        handler.initialize(RecordingContext(unpacked_mar))
        yield handler, unpacked_mar
    finally:
        sys.path.remove(str(unpacked_mar))


def test_archive_holds_the_spec_config_and_the_runtime_package(unpacked_mar):
    spec = json.loads((unpacked_mar / "model_spec.json").read_text())
    assert len(spec["labels"]) == 1000 and spec["labels"][281] == "tabby" and spec["weights"] == "random"
    assert spec["default_layer"] == "layer4" and spec["input_size"] == 224
    assert (unpacked_mar / "camserve" / "cam" / "methods" / "registry.py").is_file()
    assert not (unpacked_mar / "camtools").exists()
    config = (unpacked_mar / "model-config.yaml").read_text()
    assert "batchSize: 8" in config


def test_a_batch_with_one_bad_request_fails_only_that_request(served, chelsea):
    handler, model_dir = served
    context = RecordingContext(model_dir)
    rows = [
        {"body": bytearray(encode(chelsea, "JPEG"))},
        {"body": bytearray(b"definitely not an image")},
        {"data": bytearray(encode(chelsea, "PNG")), "target": bytearray(b"281,282"), "heatmap": bytearray(b"1")},
        {"body": {"image": base64.b64encode(encode(chelsea, "PNG")).decode(), "topk": 99}},
        {"data": bytearray(encode(chelsea, "PNG")), "layer": b"layer9"},
        {"data": bytearray(encode(chelsea, "PNG")), "method": b"layercam", "layer": b"layer3", "explain": b"2"},
    ]
    with torch.inference_mode():  # as BaseHandler would run inference: the gradient path must survive it
        bodies = handler.handle(rows, context)
    assert all(isinstance(body, bytes) for body in bodies)  # the JSON itself: TorchServe passes bytes through
    responses = [json.loads(body) for body in bodies]
    assert len(responses) == 6
    assert context.statuses == {1: (400, "Bad Request"), 3: (400, "Bad Request"), 4: (400, "Bad Request")}
    assert set(context.content_types.values()) == {"application/json"}
    assert responses[1]["type"] == "InvalidImage"
    assert "topk must be an integer from 1 to 20, got 99" in responses[3]["message"]
    assert (
        "gives a spatial map, one of conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4"
        in responses[4]["message"]
    )
    layercam = responses[5]
    assert [(e["method"], e["layer"]) for e in layercam["explanations"]] == [("layercam", "layer3")] * 2
    assert [e["index"] for e in layercam["explanations"]] == [p["index"] for p in layercam["predictions"][:2]]

    first, third = responses[0], responses[2]
    assert first["model"] == {
        "name": "resnet50",
        "version": "1.0",
        "weights": "random",
        "arch": "resnet50",
        "classes": 1000,
        "task": "multiclass",
    }
    assert first["image"] == {"width": 451, "height": 300}
    assert len(first["predictions"]) == 5
    probabilities = [p["probability"] for p in first["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert [e["index"] for e in first["explanations"]] == [first["predictions"][0]["index"]]
    assert [(e["index"], e["label"]) for e in third["explanations"]] == [(281, "tabby"), (282, "tiger cat")]
    recorded = context.metrics.values
    assert recorded["ExplanationsServed"] == [1 + 2 + 2] and recorded["RequestsRefused"] == [3]
    assert recorded["BatchSize"] == [6]
    assert all(len(recorded[name]) == 1 and recorded[name][0] > 0 for name in ("HandlerTime", "ForwardTime", "CamTime"))
    assert context.metrics.get_metric("ExplanationsServed", MetricTypes.COUNTER) is not None  # declared, kept
    heatmap = np.frombuffer(base64.b64decode(third["explanations"][0]["heatmap"]), np.uint8)
    import cv2

    levels = cv2.imdecode(heatmap, cv2.IMREAD_UNCHANGED)
    assert levels.dtype == np.uint16 and levels.shape == (300, 451) and levels.max() == 65535


def test_handler_defines_exactly_one_class(unpacked_mar):
    from ts.utils.util import list_classes_from_module

    sys.path.insert(0, str(unpacked_mar))
    try:
        import gradcam_handler

        assert [cls.__name__ for cls in list_classes_from_module(gradcam_handler)] == ["GradCamHandler"]
    finally:
        sys.path.remove(str(unpacked_mar))


def test_nothing_escapes_handle_and_a_500_carries_its_request_id(served, chelsea, monkeypatch):
    handler, model_dir = served
    context = RecordingContext(model_dir)
    context.request_ids = {0: "id-good", 1: "id-broken", 2: "id-bad"}
    original = handler.service.prepare

    def prepare(request):
        if request.id == "id-broken":
            raise RecursionError("injected")
        return original(request)

    monkeypatch.setattr(handler.service, "prepare", prepare)
    rows = [
        {"data": bytearray(encode(chelsea, "JPEG"))},
        {"data": bytearray(encode(chelsea, "JPEG")), "broken": b"1"},
        {"data": bytearray(encode(chelsea, "JPEG")), "topk": b"--5"},
    ]
    responses = [json.loads(body) for body in handler.handle(rows, context)]
    assert context.statuses == {1: (500, "Internal Server Error"), 2: (400, "Bad Request")}
    assert responses[1] == {
        "code": 500,
        "type": "InternalError",
        "message": "preparing the request failed on the server",
        "request_id": "id-broken",
    }
    assert responses[2]["request_id"] == "id-bad" and "topk must be an integer" in responses[2]["message"]
    assert "request_id" not in responses[0] and responses[0]["predictions"]

    monkeypatch.setattr(handler.service, "answer", lambda rows: 1 / 0)  # even the service itself failing
    context = RecordingContext(model_dir)
    responses = [json.loads(body) for body in handler.handle(rows[:1], context)]
    assert context.statuses == {0: (500, "Internal Server Error")} and responses[0]["type"] == "InternalError"


def test_a_fresh_worker_answers_a_lone_fullgrad_request_with_real_timings(unpacked_mar, chelsea):
    """FullGrad runs apart from the shared forward pass: a batch of it alone, first on a new worker, once raised a
    KeyError (the timings were set only by the shared pass) and then reported the previous batch's."""
    sys.path.insert(0, str(unpacked_mar))
    try:
        from gradcam_handler import GradCamHandler

        handler = GradCamHandler()
        context = RecordingContext(unpacked_mar)
        handler.initialize(context)
        rows = [{"data": bytearray(encode(chelsea, "PNG")), "method": b"fullgrad", "target": b"281"}]
        (body,) = handler.handle(rows, context)
    finally:
        sys.path.remove(str(unpacked_mar))
    response = json.loads(body)
    assert context.statuses == {}  # no error status set: 200
    assert [(e["method"], e["index"]) for e in response["explanations"]] == [("fullgrad", 281)]
    seconds = handler.service.stage_seconds
    assert set(seconds) == {"decode", "forward", "cam", "encode"}
    assert 0 < seconds["forward"] < 10 and 0 < seconds["cam"] < 10  # FullGrad's own pass, then its gradients
