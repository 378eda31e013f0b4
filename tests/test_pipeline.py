"""The service on a tiny CNN: failure containment per row, the work budget, max_side, and a fuzz of the real interface.

``ExplanationService.answer`` is what the handler calls with TorchServe's rows; these tests call it the same way.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from camserve import work
from camserve.api import OPTION_NAMES, WorkBudget
from camserve.cam import METHODS, CamEngine, CamRequest, describe_layers
from camserve.pipeline import ExplanationService
from camserve.spec import ModelSpec
from camserve.tasks import base
from tests.conftest import encode

LABELS = ["red", "green", "blue"]


class TinyNet(nn.Module):
    """Three classes; ``layer4`` gives an (8, 7, 7) map for a 224-pixel input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.layer4 = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 8, 3, stride=8, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layer4(self.conv1(x))), 1))


def tiny_spec(model: nn.Module) -> ModelSpec:
    layers = {name: info.layout for name, info in describe_layers(model, 224).items() if info.layout}
    return ModelSpec(
        name="tiny", arch="TinyNet", labels=tuple(LABELS), input_size=224, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), default_layer="layer4", layers=layers, weights="random",
    )  # fmt: skip


def make_service(budget: WorkBudget = WorkBudget(), engine: CamEngine | None = None) -> ExplanationService:
    torch.manual_seed(0)
    model = TinyNet().eval().requires_grad_(False)
    return ExplanationService(
        engine=engine or CamEngine(model, scorecam_channels=None),
        spec=tiny_spec(model),
        device=torch.device("cpu"),
        budget=budget,
        threads=2,
    )


@pytest.fixture(scope="module")
def service() -> ExplanationService:
    return make_service()


def picture(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "PNG")


def decode_png(data: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_UNCHANGED)


# --- Containment ---


class FailsOnWhiteImages(CamEngine):
    """An engine that fails any batch holding an all-white image, as a fault in one row would."""

    calls: int = 0

    def __call__(self, images, requests, keep=()):
        self.calls += 1
        if any(bool((image > 2.0).all()) for image in images):  # white, after ImageNet normalisation
            raise RuntimeError("injected engine failure")
        return super().__call__(images, requests, keep)


def test_an_engine_failure_in_one_row_fails_only_that_row():
    model = TinyNet().eval().requires_grad_(False)
    engine = FailsOnWhiteImages(model)
    service = make_service(engine=engine)
    white = encode(np.full((40, 40, 3), 255, np.uint8), "PNG")
    rows = [{"data": bytearray(picture(seed=n))} for n in range(3)]
    rows.insert(1, {"data": bytearray(white)})
    results = service.answer(rows)
    assert [r.status for r in results] == [200, 500, 200, 200]
    assert results[1].body == {"code": 500, "type": "InternalError", "message": "the explanation failed on the server"}
    assert engine.calls == 1 + 4  # the batch, then each request alone
    for row, result in zip([rows[0], rows[2], rows[3]], [results[0], results[2], results[3]], strict=True):
        alone = service.answer([row])[0]
        assert alone.body["predictions"] == result.body["predictions"]
        assert alone.body["explanations"][0]["overlay"] == result.body["explanations"][0]["overlay"]


def test_an_unexpected_exception_while_preparing_or_rendering_fails_only_its_row(monkeypatch, service):
    original_load, original_render = base.model_pixels, work.render_overlay

    def load(opened, *args):
        if opened.width == 33:
            raise MemoryError("injected")
        return original_load(opened, *args)

    def render(rgb, heat, alpha, *args):
        if alpha == 0.125:
            raise KeyError("injected")
        return original_render(rgb, heat, alpha, *args)

    monkeypatch.setattr(base, "model_pixels", load)
    monkeypatch.setattr(work, "render_overlay", render)
    rows = [
        {"data": bytearray(picture(width=33))},
        {"data": bytearray(picture()), "alpha": b"0.125"},
        {"data": bytearray(picture())},
        {"data": bytearray(b"not an image")},
    ]
    results = service.answer(rows)
    assert [r.status for r in results] == [500, 500, 200, 400]
    assert results[0].body["message"] == "preparing the request failed on the server"
    assert results[1].body["message"] == "rendering the explanation failed on the server"


# --- Fuzz: the real interface, adversarial values, never anything but an answer or a 4xx ---

DIGITS = "0123456789\u0660\u0663\u06f5\u0966\uff13\u00b2"
FUZZED_WORDS = ["gradcam", "scorecam", "eigencam", "cam", "legrad", "guided-gradcam", "smoothgradcam++", "layer4"]
FUZZED_WORDS += ["layer4.1", "conv1", "png", "jet", "true"]
numbers_as_text = st.text(alphabet=DIGITS + "+-.eE_ \t\n,[]x", max_size=30)
values = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    numbers_as_text,
    st.text(max_size=40),
    st.just("9" * 5000),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-5, 5), max_size=12),
    st.recursive(st.integers(0, 3), lambda inner: st.lists(inner, max_size=3), max_leaves=6),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(FUZZED_WORDS),
)
option_names = st.one_of(st.sampled_from(OPTION_NAMES), st.text(max_size=8))


def _multipart(options: dict) -> dict:
    """As TorchServe hands multipart fields to the handler: bytearrays, by name."""
    row = {"data": bytearray(picture(40, 32))}
    for name, value in options.items():
        row[name] = bytearray(value if isinstance(value, bytes) else json.dumps(value).strip('"').encode())
    return row


def _json(options: dict) -> dict:
    return {"body": {"image": base64.b64encode(picture(40, 32)).decode(), **options}}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from([_multipart, _json]), st.dictionaries(option_names, values, max_size=4)),
        min_size=1,
        max_size=3,
    )
)
def test_fuzzed_rows_are_answered_or_refused_with_a_4xx_and_never_hurt_a_good_neighbour(service, rows):
    good = {"data": bytearray(picture())}
    built = [make(options) for make, options in rows]
    results = service.answer([*built, good])
    for result in results[:-1]:
        assert result.status == 200 or 400 <= result.status < 500, result.body
        if result.status != 200:
            assert result.body["message"] and len(result.body["message"]) < 1000
    assert results[-1].status == 200


# --- Budget and output size ---


def test_max_side_scales_the_overlay_and_heatmap_and_the_response_says_both_sizes(service):
    row = {"data": bytearray(picture(400, 200)), "max_side": b"100", "heatmap": b"true", "format": b"png"}
    (result,) = service.answer([row])
    assert result.status == 200, result.body
    assert result.body["image"] == {"width": 400, "height": 200}
    explanation = result.body["explanations"][0]
    assert (explanation["width"], explanation["height"]) == (100, 50)
    assert decode_png(explanation["overlay"]).shape == (50, 100, 3)
    assert decode_png(explanation["heatmap"]).shape == (50, 100)


def test_the_server_cap_applies_when_a_request_gives_no_max_side():
    service = make_service(budget=WorkBudget(max_side=64))
    (result,) = service.answer([{"data": bytearray(picture(256, 128))}])
    assert (result.body["explanations"][0]["width"], result.body["explanations"][0]["height"]) == (64, 32)
    (small,) = service.answer([{"data": bytearray(picture(40, 30)), "max_side": b"1000"}])
    assert (small.body["explanations"][0]["width"], small.body["explanations"][0]["height"]) == (40, 30)


def test_a_request_over_the_pixel_budget_is_refused_before_decoding_with_how_to_fit(monkeypatch):
    service = make_service(budget=WorkBudget(max_output_pixels=100_000))
    monkeypatch.setattr(base, "model_pixels", lambda *a, **k: pytest.fail("decoded an over-budget request"))
    row = {"data": bytearray(picture(400, 300)), "target": b"0,1,2", "max_side": b"1000"}
    (result,) = service.answer([row])
    assert result.status == 400 and result.body["type"] == "OverBudget"
    message = result.body["message"]
    assert "3 explanation(s) of 400x300 pixels = 0.4 megapixels" in message
    assert "at most 0.1 megapixels" in message
    assert "at most 0 explanations" not in message and "set max_side to 210 or less" in message
    monkeypatch.undo()
    (fits,) = service.answer([{**row, "max_side": b"210"}])  # the advice works
    assert fits.status == 200 and len(fits.body["explanations"]) == 3


def test_scorecam_over_the_forward_pass_budget_is_refused():
    service = make_service(budget=WorkBudget(max_forward_passes=5))  # layer4 has 8 channels: 9 passes
    (result,) = service.answer([{"data": bytearray(picture()), "method": b"scorecam"}])
    message = result.body["message"]
    assert result.status == 400 and "needs 9 forward passes (scorecam: 9); at most 5 are run" in message
    assert "--max-forward-passes 9 or more" in message
    one_pass = message[message.index("costs one pass (") + len("costs one pass (") : message.index(")", 80)]
    assert one_pass.split(", ") == [name for name, record in METHODS.items() if record.one_pass]
    assert "gradcam" in one_pass and "scorecam" not in one_pass and "sess" not in one_pass
    (fine,) = service.answer([{"data": bytearray(picture()), "method": b"gradcam"}])
    assert fine.status == 200


def test_sess_on_the_default_budget_is_refused_with_the_flag_that_fits_it():
    service = make_service()  # 16-pixel input: 2 x 122 + 1 passes, over the default 100
    (result,) = service.answer([{"data": bytearray(picture()), "method": b"sess"}])
    passes = service.engine.forward_passes(CamRequest(method="sess"))
    assert passes > WorkBudget().max_forward_passes
    assert result.status == 400 and f"--max-forward-passes {passes} or more" in result.body["message"]
    (faithful,) = service.answer([{"data": bytearray(picture()), "faithfulness": b"true", "faithfulness_steps": b"64"}])
    assert faithful.status == 400 and "faithfulness: 129" in faithful.body["message"]
    assert "fewer faithfulness_steps or no faithfulness" in faithful.body["message"]


def test_a_response_over_the_size_limit_is_refused_for_that_request_alone():
    service = make_service(budget=WorkBudget(max_response_bytes=20_000))
    big = {"data": bytearray(picture(400, 300)), "format": b"png", "heatmap": b"true", "target": b"0,1"}
    results = service.answer([big, {"data": bytearray(picture())}])
    assert results[0].status == 400 and results[0].body["type"] == "ResponseTooLarge"
    assert "at most 20000 are sent" in results[0].body["message"]
    assert results[1].status == 200


def test_classes_bound_target_and_topk():
    service = make_service()
    (result,) = service.answer([{"data": bytearray(picture()), "topk": b"5"}])
    assert [p["label"] for p in result.body["predictions"]] == sorted(
        LABELS, key=lambda label: -next(p["probability"] for p in result.body["predictions"] if p["label"] == label)
    )
    (refused,) = service.answer([{"data": bytearray(picture()), "target": b"3"}])
    assert refused.status == 400 and "from 0 to 2 (this model has 3 classes), got [3]" in refused.body["message"]


def test_a_batch_whose_responses_together_exceed_the_limit_refuses_only_the_overflow():
    """TorchServe hands a batch's responses to its frontend as one message of at most max_response_size."""
    (alone,) = make_service().answer([{"data": bytearray(picture(300, 200)), "format": b"png"}])
    one = len(alone.body["explanations"][0]["overlay"]) + 2048 + 512
    service = make_service(budget=WorkBudget(max_response_bytes=int(one * 1.5)))
    rows = [{"data": bytearray(picture(300, 200)), "format": b"png"}] * 2
    statuses = sorted(result.status for result in service.answer(rows))
    assert statuses == [200, 400]


def test_picture_options_reach_the_pixels():
    service = make_service()
    base = {"data": bytearray(picture(80, 60)), "format": b"png", "heatmap": b"true", "target": b"1"}
    (plain,) = service.answer([dict(base)])
    (clipped,) = service.answer([{**base, "clip": b"0,50"}])
    plain_heat, clipped_heat = (
        decode_png(plain.body["explanations"][0]["heatmap"]),
        decode_png(clipped.body["explanations"][0]["heatmap"]),
    )
    assert (clipped_heat == 65535).mean() >= 0.5 > (plain_heat == 65535).mean()  # the top half is saturated
    (grey,) = service.answer([{**base, "overlay": b"grayscale", "alpha": b"0"}])
    pixels = decode_png(grey.body["explanations"][0]["overlay"])
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    (outlined,) = service.answer([{**base, "overlay": b"outline", "region": b"0.1"}])
    original = cv2.imdecode(np.frombuffer(picture(80, 60), np.uint8), cv2.IMREAD_UNCHANGED)
    changed = np.any(decode_png(outlined.body["explanations"][0]["overlay"]) != original, axis=2)
    assert 0 < changed.mean() < 0.5  # only the contour is drawn; the photo stays


def test_faithfulness_is_measured_per_explanation_and_counted_in_the_budget():
    service = make_service()
    rows = [
        {"data": bytearray(picture(80, 60)), "faithfulness": b"true", "target": b"0,2", "faithfulness_steps": b"8"},
        {"data": bytearray(picture(80, 60, seed=1))},
        {"data": bytearray(picture(80, 60, seed=2)), "faithfulness": b"1"},
    ]
    first, plain, third = service.answer(rows)
    for explanation in first.body["explanations"]:
        measured = explanation["faithfulness"]
        assert set(measured) == {"deletion", "insertion", "drop", "increase", "steps"} and measured["steps"] == 8
        assert 0.0 <= measured["deletion"] <= 1.0 and 0.0 <= measured["insertion"] <= 1.0 and measured["drop"] >= 0
    assert third.body["explanations"][0]["faithfulness"]["steps"] == 16
    assert "faithfulness" not in plain.body["explanations"][0]
    # 1 forward pass + 4 explanations x (2 x 16 + 1) = 133 > 100: refused up front, saying what to change.
    (refused,) = service.answer(
        [{"data": bytearray(picture()), "faithfulness": b"true", "explain": b"3", "topk": b"3"}]
    )
    assert refused.status == 200  # 1 + 3 x 33 = 100 fits exactly
    (refused,) = service.answer([{"data": bytearray(picture()), "faithfulness": b"true", "target": b"0,1,2,0"}])
    assert refused.status == 400 and "133 forward passes" in refused.body["message"]
    assert "faithfulness" in refused.body["message"]


def test_the_sanity_check_is_answered_per_explanation_and_counted_in_the_budget():
    service = make_service(WorkBudget(max_forward_passes=12))
    base = {"data": bytearray(picture(80, 60)), "target": b"0,1,2"}
    eigen_base = {**base, "sanity": b"1", "method": b"eigencam"}
    checked, eigen, plain = service.answer([{**base, "sanity": b"true"}, eigen_base, dict(base)])
    assert all(explanation["sanity"]["randomised"] == ["fc"] for explanation in checked.body["explanations"])
    values = [explanation["sanity"]["rank_correlation"] for explanation in checked.body["explanations"]]
    assert all(-1 <= value < 1 for value in values if value is not None), values  # None: a map ReLU left flat
    assert any(value is not None for value in values), values
    assert [e["sanity"]["rank_correlation"] for e in eigen.body["explanations"]] == [1.0, 1.0, 1.0]
    assert "sanity" not in plain.body["explanations"][0]
    # Score-CAM scores 8 channels: 9 passes, and the check runs them again on the copy: 18 > 12.
    (refused,) = service.answer([{**base, "sanity": b"1", "method": b"scorecam"}])
    assert refused.status == 400 and "18 forward passes" in refused.body["message"]
    assert "sanity: 9" in refused.body["message"] and "no sanity" in refused.body["message"]


def test_a_method_that_does_not_apply_at_the_layer_is_a_400_saying_why(service):
    base = {"data": bytearray(picture()), "method": b"cam", "target": b"1"}
    applies, refused = service.answer([dict(base), {**base, "layer": b"conv1"}])
    assert applies.status == 200 and applies.body["explanations"][0]["method"] == "cam"
    assert refused.status == 400 and "method cam does not apply here" in refused.body["message"]
    assert "takes the mean of conv1's output" in refused.body["message"]
    (no_attention,) = service.answer([{**base, "method": b"legrad"}])
    assert (
        no_attention.status == 400
        and "LeGrad reads the attention of transformer blocks" in no_attention.body["message"]
    )


def test_smoothing_options_reach_the_engine_and_the_budget():
    service = make_service()
    base = {"data": bytearray(picture(80, 60)), "format": b"png", "heatmap": b"true", "target": b"1"}
    plain, eigen, augmented = service.answer([dict(base), {**base, "eigen_smooth": b"1"}, {**base, "aug_smooth": b"1"}])
    maps = [decode_png(r.body["explanations"][0]["heatmap"]).astype(float) for r in (plain, eigen, augmented)]
    assert np.abs(maps[0] - maps[1]).max() > 1000 and np.abs(maps[0] - maps[2]).max() > 1000
    # aug_smooth: 6 passes; with scorecam's 8 channels on top, 6 x 9 = 54; with faithfulness (33) over 100.
    (refused,) = service.answer([{**base, "aug_smooth": b"1", "method": b"scorecam", "faithfulness": b"1",
                                  "faithfulness_steps": b"32"}])  # fmt: skip
    assert refused.status == 400 and "119 forward passes" in refused.body["message"]


# --- Speed mechanisms ---


def test_the_decode_and_render_threads_call_no_torch_operator():
    """A parallel torch operator in a second thread starts a second OpenMP team and slows every later forward pass
    (by a third, measured on two cores): the pool threads may only run NumPy, OpenCV and Pillow."""
    import threading

    torch_dir = str(Path(torch.__file__).parent)
    calls: list[tuple[str, str]] = []

    def is_torch(event: str, frame, arg) -> bool:
        if event == "call":
            return frame.f_code.co_filename.startswith(torch_dir)
        if event == "c_call":
            owner = getattr(arg, "__self__", None)
            module = getattr(arg, "__module__", None) or getattr(type(owner), "__module__", "") or ""
            return isinstance(owner, torch.Tensor) or module.startswith("torch")
        return False

    def profile(frame, event, arg):
        if threading.current_thread() is not threading.main_thread() and is_torch(event, frame, arg):
            calls.append((threading.current_thread().name, getattr(arg, "__name__", frame.f_code.co_name)))

    threading.setprofile(profile)  # for the threads started from now on: the service's pool
    try:
        service = make_service()
        rows = [{"data": picture(seed=n), "explain": b"2", "heatmap": b"1"} for n in range(3)]
        rows.append({"data": picture(), "method": b"layercam", "clip": b"5,95", "overlay": b"outline"})
        rows.append({"data": picture(), "method": b"scorecam", "layer": b"conv1", "faithfulness": b"1"})
        rows.append({"data": picture(), "method": b"eigencam", "aug_smooth": b"1", "format": b"webp"})
        results = service.answer(rows)
    finally:
        threading.setprofile(None)
    assert [result.status for result in results] == [200] * 6
    assert calls == []


def test_channels_last_runs_from_the_configured_batch_size(monkeypatch):
    service = make_service()
    service.channels_last_from = 3
    seen: list[bool] = []
    service.engine.model.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    for count in (1, 2, 3, 4):
        results = service.answer([{"data": picture(seed=n)} for n in range(count)])
        assert [result.status for result in results] == [200] * count
    assert seen == [False, False, True, True]


@pytest.mark.parametrize(("setting", "expected"), [(True, 1), (False, 0), (None, 0), (0, 0), (4, 4), ("4", 4), (1, 1)])
def test_the_channels_last_setting_is_a_batch_size(setting, expected):
    from camserve.model import channels_last_from

    assert channels_last_from(setting) == expected


def test_a_negative_channels_last_setting_is_refused():
    from camserve.model import channels_last_from

    with pytest.raises(ValueError, match="true, false or a batch size"):
        channels_last_from(-1)


def test_a_large_jpeg_is_rendered_at_its_reduced_decode_scale_under_max_side(service):
    rng = np.random.default_rng(3)
    photo = cv2.resize(rng.integers(0, 255, (100, 125, 3), dtype=np.uint8), (1000, 800))
    jpeg = bytearray(encode(photo, "JPEG", quality=90))
    (snapped,) = service.answer([{"data": jpeg, "max_side": b"512"}])
    explanation = snapped.body["explanations"][0]
    assert (explanation["width"], explanation["height"]) == (500, 400)  # libjpeg's half scale, no resize after it
    assert snapped.body["image"] == {"width": 1000, "height": 800}
    (png,) = service.answer([{"data": bytearray(encode(photo, "PNG")), "max_side": b"512"}])
    assert (png.body["explanations"][0]["width"], png.body["explanations"][0]["height"]) == (512, 410)
