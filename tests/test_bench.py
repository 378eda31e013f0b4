"""The benchmark CLI runs end to end on a tiny configuration. It checks that it runs, not how fast anything is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from camserve.cam import METHODS
from tests.conftest import ROOT


@pytest.mark.slow
@pytest.mark.timing
def test_bench_cli_runs_on_a_tiny_configuration(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--arch", "resnet18", "--batch-sizes", "1,2"]
    command += ["--repeats", "1"]
    command += ["--warmup", "0", "--agreement-images", "2", "--audit-images", "8,16", "--out", str(tmp_path)]
    if shutil.which("java"):
        command += ["--concurrency", "1,2", "--requests", "2", "--soak", "2", "--batch-delays", "1,5"]
    else:
        command += ["--no-server"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    contenders = {row["contender"] for row in report["in_process"]}
    assert contenders == {
        "floor: torchvision forward",
        "engine: Grad-CAM",
        "engine: Grad-CAM + overlay encoding",
        "pytorch-grad-cam GradCAM",
    }
    assert {row["precision"] for row in report["fast_paths"]} >= {"fp32", "bf16"}
    over_budget = {"sess", "sscam", "iscam"}  # 245, 2241 and 641 passes per image: counted, not timed
    untimed = over_budget | {"legrad"}  # LeGrad: vision transformers only
    assert [row["method"] for row in report["methods"]] == [m for m in METHODS if m not in untimed]
    assert [(row["method"], row["layer"]) for row in report["sanity"]] == [
        ("gradcam", "layer4"), ("gradcam", "layer3"), ("hirescam", "layer4"), ("eigencam", "layer4")
    ]  # fmt: skip
    assert all(row["with_sanity_ratio_to_floor"] > 0 for row in report["sanity"])
    assert [(row["method"], row["layer"]) for row in report["vit"]] == [
        ("gradcam", "encoder.layers.encoder_layer_11.ln_1"), ("legrad", "encoder.layers.encoder_layer_11"),
        ("legrad", "encoder.layers.encoder_layer_8"),
    ]  # fmt: skip
    assert report["machine"]["torch"] and report["targets"]
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "| target |" in (tmp_path / "bench.md").read_text()
    assert [row["batch"] for row in report["channels_last"]] == [1, 2, 4, 8]
    assert {row["step"].split(":")[0] for row in report["response_bytes"]} == {"JSON", "base64"}
    dense = {(row["task"], row["method"]): row for row in report["dense"]}
    assert set(dense) == {(task, method) for task in ("detection", "segmentation")
                          for method in ("gradcam", "hirescam", "eigencam")}  # fmt: skip
    assert all(row["ratio_to_floor"] > 0 and row["explanations"] == 3 for row in dense.values())
    assert "Detection and segmentation" in (tmp_path / "bench.md").read_text()
    audit = report["audit"]  # 8 and 16 images: too few for a meaningful margin, enough to run the section
    assert audit["images"] == [8, 16] and all(s > 0 for s in audit["seconds"]) and audit["forward_images_per_s"] > 0
    assert audit["ratio"] == pytest.approx(audit["marginal_images_per_s"] / audit["forward_images_per_s"], abs=2e-3)
    if shutil.which("java"):
        assert [level["errors"] for level in report["service"]] == [0, 0]
        assert [(d["batch_delay_ms"], d["concurrency"]) for d in report["batch_delays"]] == [
            (1, 1),
            (1, 2),
            (5, 1),
            (5, 2),
        ]
        profile = report["profile"]
        # The forward pass and the handler are medians over the same batch lines: ordered by construction. The
        # backend (TorchServe's job log, every batch) and the client's p50 are other populations whose medians can
        # cross the handler's on a busy machine: the profile's arithmetic is checked instead of their order.
        assert 0 < profile["forward_ms"] <= profile["handler_ms"]
        assert profile["worker_protocol_ms"] == pytest.approx(profile["backend_ms"] - profile["handler_ms"])
        expected = profile["client_p50_ms"] - profile["backend_ms"] - profile["queue_ms"]
        assert profile["http_and_frontend_ms"] == pytest.approx(expected)
        assert profile["backend_ms"] > 0 and profile["client_p50_ms"] > 0 and profile["queue_ms"] >= 0
        assert profile["loaded_concurrency"] == 2 and profile["loaded_mean_batch"] >= 1
        assert [level.get("floor_batch") for level in report["service"]] == [1, 2]  # batch sizes 1,2: the largest
        assert 0 < profile["loaded_forward_ms_per_image"] < 1.15 * profile["loaded_handler_ms_per_image"]
        assert "Where a lone request's" in (tmp_path / "bench.md").read_text()
        photos = [(p["photo"], p["concurrency"]) for p in report["service_photos"]]
        assert photos == [("1080p", 1), ("1080p", 8), ("12 MP", 1)]
        assert all(p["errors"] == 0 for p in report["service_photos"])
        assert all(p["handler_ms"] > 0 and "over_floor_ms" in p for p in report["service_photos"][::2])
        loaded = report["service_photos"][1]  # where the median round's images went, from the worker's own log
        assert 0 < loaded["loaded_forward_ms_per_image"] < loaded["loaded_handler_ms_per_image"]
        assert loaded["loaded_decode_ms_per_image"] > 0 and loaded["loaded_client_cpu_ms_per_image"] > 0
        assert loaded["loaded_service_ms_per_image"] == pytest.approx(1000 / loaded["images_per_s"])
        # The machine's CPU, from the worker's, the Java frontend's and the load generator's own counters: all three
        # use some, they add up, the cores cannot be busier than they are (a tick's rounding aside), and the rate
        # that CPU allows is at least the rate measured.
        cpu = {name: loaded[f"loaded_cpu_{name}_ms_per_image"] for name in ("worker", "frontend")}
        assert min(cpu.values()) > 0
        total = sum(cpu.values()) + loaded["loaded_client_cpu_ms_per_image"]
        assert loaded["loaded_cpu_ms_per_image"] == pytest.approx(total)
        assert 0 < loaded["loaded_cores_busy"] <= 1.1
        assert loaded["loaded_cpu_bound_images_per_s"] >= loaded["images_per_s"] / 1.1
        assert "cores" in (tmp_path / "bench.md").read_text().split("photos at concurrency 8")[1]


def _report(device: str, floor_ms: dict[int, float], cam_ms: dict[int, float], service: list[dict]):
    from camtools.bench import BenchConfig, BenchReport

    rows = []
    for batch, floor in floor_ms.items():
        for contender, ms in (
            ("floor: torchvision forward", floor),
            ("engine: Grad-CAM", cam_ms[batch]),
            ("engine: Grad-CAM + overlay encoding", cam_ms[batch] * 1.5),
            ("pytorch-grad-cam GradCAM", cam_ms[batch] * 3),
        ):
            seconds = ms * batch / 1000
            rows.append({"contender": contender, "batch": batch, "seconds": seconds, "images_per_s": batch / seconds})
    config = BenchConfig(device=device, server_batch_size=32)
    from dataclasses import asdict

    return BenchReport(machine={"device": device}, config=asdict(config), in_process=rows, service=service)


def test_the_gpu_targets_are_the_issues_ratios():
    """Arithmetic on a made-up GPU report: service ÷ in-process Grad-CAM at the server's batch size, the Grad-CAM
    ratio at batch 32, and the lone request's excess over in-process Grad-CAM with overlays at batch 1."""
    from camtools.bench.report import target_rows

    report = _report(
        "cuda:0",
        floor_ms={1: 4.0, 8: 0.5, 32: 0.2},
        cam_ms={1: 5.0, 8: 0.6, 32: 0.21},
        service=[
            {"concurrency": 1, "images_per_s": 100.0, "p50_ms": 12.0},
            {"concurrency": 32, "images_per_s": 1500.0},
        ],
    )
    targets = {t["measure"]: t for t in target_rows(report)}
    service = targets["GPU: service images/s / in-process Grad-CAM images/s, batch 32"]
    assert service["value"] == pytest.approx(1500 / (1000 / 0.21)) and service["met"]
    assert targets["GPU: (forward + Grad-CAM) / forward, batch 32"]["value"] == pytest.approx(1.05)
    excess = targets["GPU: p50 at concurrency 1 - in-process batch-1 Grad-CAM + overlay encoding, ms"]
    assert excess["value"] == pytest.approx(12.0 - 7.5) and excess["met"]
    assert not any(name.startswith("CPU") for name in targets)


def test_the_cpu_targets_compare_the_service_with_the_plain_forward_pass():
    from camtools.bench.report import target_rows

    report = _report(
        "cpu",
        floor_ms={1: 54.0, 8: 57.0},
        cam_ms={1: 56.0, 8: 52.0},
        service=[{"concurrency": 1, "images_per_s": 12.0, "p50_ms": 80.0}, {"concurrency": 8, "images_per_s": 18.0}],
    )
    targets = {t["measure"]: t for t in target_rows(report)}
    excess = targets["CPU: p50 at concurrency 1 - plain fp32 forward at batch 1, ms"]
    assert excess["value"] == pytest.approx(26.0) and not excess["met"]
    ratio = targets["CPU: service images/s / plain fp32 forward images/s at batch 8"]
    assert ratio["value"] == pytest.approx(18.0 / (1000 / 57.0)) and not ratio["met"]
    assert not any(name.startswith("GPU") for name in targets)


@pytest.mark.parametrize(
    ("speedups", "threshold"),
    [({1: 0.85, 2: 0.95, 4: 1.1, 8: 1.2}, 4), ({1: 1.1, 2: 1.1, 4: 1.1, 8: 1.2}, 1), ({1: 1.2, 8: 0.9}, 0)],
)
def test_channels_last_threshold_is_where_it_keeps_paying(speedups, threshold):
    from camtools.bench import channels_last_threshold

    rows = [{"batch": batch, "speedup": speedup} for batch, speedup in speedups.items()]
    assert channels_last_threshold(rows) == threshold


def test_the_cpu_targets_prefer_the_forward_pass_timed_right_before_the_level():
    """A shared machine drifts over a run: the floor timed in the same minute as the level is the one compared."""
    from camtools.bench.report import target_rows

    report = _report(
        "cpu",
        floor_ms={1: 54.0, 8: 57.0},
        cam_ms={1: 56.0, 8: 52.0},
        service=[
            {"concurrency": 1, "images_per_s": 12.0, "p50_ms": 80.0, "floor_batch": 1, "floor_ms_per_image": 60.0},
            {"concurrency": 8, "images_per_s": 18.0, "floor_batch": 8, "floor_ms_per_image": 50.0},
        ],
    )
    targets = {t["measure"]: t for t in target_rows(report)}
    assert targets["CPU: p50 at concurrency 1 - plain fp32 forward at batch 1, ms"]["value"] == pytest.approx(20.0)
    ratio = targets["CPU: service images/s / plain fp32 forward images/s at batch 8"]["value"]
    assert ratio == pytest.approx(18.0 / 20.0)


def test_the_photo_targets_are_the_excess_over_the_forward_pass():
    """Arithmetic on a made-up report: each photo's time in the worker over the plain forward pass at batch 1,
    against 40 ms for 1080p and 60 ms for 12 MP."""
    import torch

    from camtools.bench import machine_info
    from camtools.bench.inprocess import PHOTO_TARGETS_MS
    from camtools.bench.report import photo_lines, target_rows

    report = _report("cpu", floor_ms={1: 60.0, 8: 50.0}, cam_ms={1: 61.0, 8: 50.5}, service=[])
    report.machine = machine_info(torch.device("cpu")) | {"weights": "random"}
    report.photos = [
        {"photo": "1080p", "width": 1920, "height": 1080, "jpeg_bytes": 1, "prepare_ms": 20.0, "forward_ms": 60.0,
         "cam_ms": 2.0, "encode_ms": 12.0, "total_ms": 95.0, "floor_ms": 60.0, "over_floor_ms": 35.0,
         "target_over_floor_ms": PHOTO_TARGETS_MS["1080p"]},
        {"photo": "12 MP", "width": 4032, "height": 3024, "jpeg_bytes": 1, "prepare_ms": 90.0, "forward_ms": 60.0,
         "cam_ms": 2.0, "encode_ms": 40.0, "total_ms": 195.0, "floor_ms": 60.0, "over_floor_ms": 135.0,
         "target_over_floor_ms": PHOTO_TARGETS_MS["12 MP"]},
    ]  # fmt: skip
    targets = {t["measure"]: t for t in target_rows(report)}
    hd = targets["1080p JPEG in the worker (no HTTP) - plain forward at batch 1, ms"]
    twelve = targets["12 MP JPEG in the worker (no HTTP) - plain forward at batch 1, ms"]
    assert (hd["value"], hd["target"], hd["met"]) == (35.0, "<= 40", True)
    assert (twelve["value"], twelve["target"], twelve["met"]) == (135.0, "<= 60", False)
    assert "| 12 MP (4032x3024) | 1 | 90.0 | 60.0 | 2.0 | 40.0 | 195.0 | 60.0 | 135.0 |" in photo_lines(report.photos)


def test_the_served_photo_targets_are_end_to_end_excess_and_throughput():
    """Arithmetic on a made-up report: through TorchServe, each photo's client p50 over the plain forward pass at
    batch 1 (40 ms for 1080p, 100 ms for 12 MP), and 1080p images/s at concurrency 8 over the forward pass's at
    batch 8 (at least 0.8)."""
    import torch

    from camtools.bench import machine_info
    from camtools.bench.report import service_photo_lines, target_rows

    report = _report("cpu", floor_ms={1: 60.0, 8: 50.0}, cam_ms={1: 61.0, 8: 50.5}, service=[])
    report.machine = machine_info(torch.device("cpu")) | {"weights": "random"}
    lone = {
        "concurrency": 1,
        "width": 1920,
        "height": 1080,
        "jpeg_bytes": 1,
        "p50_ms": 110.0,
        "floor_ms": 60.0,
        "over_floor_ms": 50.0,
        "target_over_floor_ms": 40.0,
        "client_p50_ms": 110.0,
        "handler_ms": 95.0,
    }
    report.service_photos = [
        {"photo": "1080p", **lone},
        {"photo": "1080p", "concurrency": 8, "width": 1920, "height": 1080, "jpeg_bytes": 1, "images_per_s": 16.0,
         "p50_ms": 480.0, "floor_ms": 50.0, "ratio_to_floor": 0.8, "target_ratio": 0.8,
         "round_ratios": [0.7, 0.8, 0.95], "loaded_service_ms_per_image": 62.5, "loaded_handler_ms_per_image": 50.0,
         "loaded_decode_ms_per_image": 6.0, "loaded_forward_ms_per_image": 30.0, "loaded_cam_ms_per_image": 1.0,
         "loaded_encode_ms_per_image": 13.0, "loaded_outside_handler_ms_per_image": 12.5,
         "loaded_client_cpu_ms_per_image": 4.0, "loaded_concurrency": 8, "loaded_mean_batch": 7.5,
         "loaded_cpu_worker_ms_per_image": 100.0, "loaded_cpu_frontend_ms_per_image": 21.0,
         "loaded_cpu_ms_per_image": 125.0, "loaded_cores": 2, "loaded_cores_busy": 0.995,
         "loaded_cpu_bound_images_per_s": 16.0},
        {"photo": "12 MP", **lone, "width": 4032, "height": 3024, "over_floor_ms": 90.0, "target_over_floor_ms": 100.0},
    ]  # fmt: skip
    targets = {t["measure"]: t for t in target_rows(report)}
    hd = targets["1080p JPEG through TorchServe, p50 at concurrency 1 - plain forward at batch 1, ms"]
    twelve = targets["12 MP JPEG through TorchServe, p50 at concurrency 1 - plain forward at batch 1, ms"]
    loaded = targets["1080p JPEGs at concurrency 8: images/s / plain forward at batch 8"]
    assert (hd["value"], hd["met"], twelve["value"], twelve["met"]) == (50.0, False, 90.0, True)
    assert (loaded["value"], loaded["target"], loaded["met"]) == (0.8, ">= 0.8", True)
    lines = "\n".join(service_photo_lines(report.service_photos))
    assert "1080p photos at concurrency 8: 16.0 images/s" in lines and "20.0 images/s (ratio 0.80)" in lines
    assert "the median of 3 rounds, each against the forward pass timed right before it " in lines
    assert "(ratios 0.70, 0.80, 0.95)" in lines
    assert (
        "Per image in that round: 62.5 ms of service time = handler 50.0 ms (decode 6.0, forward 30.0, cam 1.0, encode "
        "13.0) + 12.5 ms outside it (TorchServe, and the load generator on the same cores: 4.0 ms of CPU); concurrency"
        " 8, batches of 7.5; CPU per image 125.0 ms (worker 100.0, TorchServe's frontend 21.0, load generator 4.0), the"
        " 2 cores 100% busy: with every core busy, at most 16.0 images/s, 0.80× the plain forward pass timed before it."
        in lines
    )


def test_the_image_work_section_times_every_codec_and_keeps_the_overlay(monkeypatch):
    """The image-work section on a small camera-like photo: every step's contenders timed, the service's own first;
    its totals; and the overlay it ships within JPEG's own noise of the one served before."""
    from types import SimpleNamespace

    import torch

    from camtools.bench import imagework
    from camtools.bench.context import BenchConfig, BenchContext, make_timer

    monkeypatch.setattr(imagework, "PHOTOS", {"1080p": (480, 270)})
    monkeypatch.setattr(imagework, "MAX_SIDES", (2048, 240))
    config = BenchConfig(repeats=1, warmup=0)
    spec = SimpleNamespace(input_size=224)  # all the section reads of the model's spec
    ctx = BenchContext(config, torch.device("cpu"), make_timer(torch.device("cpu")), None, spec, [])
    rows = imagework.image_work(ctx)
    timed = [row for row in rows if row["step"] != "fidelity"]
    assert {row["step"] for row in timed} == {
        "decode", "resize to the model's 224", "map at the overlay's size", "colours and blend", "encode", "base64"
    }  # fmt: skip
    decoders = [row["contender"] for row in timed if row["step"] == "decode" and row["max_side"] == 2048]
    assert decoders == ["simplejpeg", "Pillow", "OpenCV", "torchvision (full size)"] * 2  # camera-like, then smooth
    assert {(row["photo"], row["max_side"]) for row in rows} == {("1080p", 2048), ("1080p", 240), (imagework.SMOOTH,
                                                                 2048)}  # fmt: skip
    assert not any(row.get("device") for row in rows)  # a CPU run times the host's steps alone
    assert all(row["ships"] == (row["contender"] in {"simplejpeg", "torch antialiased bilinear", "uint8 lookup",
               "pybase64", "uint8 levels, 16-bit fixed point"}) for row in timed)  # fmt: skip
    fidelity = {row["max_side"]: row for row in rows if row["step"] == "fidelity" and row["photo"] == "1080p"}
    assert fidelity[2048]["output"] == "480x270" and fidelity[240]["output"] == "240x135"  # 1/2 scale, no resize
    for row in fidelity.values():
        assert row["psnr_against_before_db"] > row["jpeg_noise_psnr_db"] - 3.0 > 30
    totals = imagework.image_work_totals(rows)
    ships = sum(row["ms"] for row in timed if row["ships"] and row["max_side"] == 240)
    assert totals[("1080p", 240)]["ships"] == pytest.approx(ships)
    served_before = {"decode": "Pillow", "resize to the model's 224": "OpenCV area", "encode": "OpenCV",
                     "map at the overlay's size": "float map, min-max in place",
                     "colours and blend": "float arrays", "base64": "pybase64"}  # fmt: skip
    small = [row for row in timed if row["max_side"] == 240]
    before = sum(row["ms"] for row in small if served_before[row["step"]] == row["contender"])
    assert totals[("1080p", 240)]["before"] == pytest.approx(before)
    lines = "\n".join(imagework.image_work_lines(rows))
    assert "| 1080p | 240 | decode | simplejpeg * |" in lines
    smooth = next(row for row in rows if row["photo"] == imagework.SMOOTH)["jpeg_bytes"]
    camera = next(row for row in rows if row["photo"] == "1080p")["jpeg_bytes"]
    assert smooth < camera / 1.2  # the noise is what the camera-like photo's codecs pay for
    assert f"- {imagework.SMOOTH} at max_side 2048 ({smooth} bytes, overlay 480x270): " in lines


def test_the_device_steps_draw_the_shipped_overlay_in_torch():
    """The image work in torch that a CUDA run times on the device (torchvision's nvJPEG codecs there), run here
    on the CPU: its decode, levels and blend against the service's own, its JPEGs within JPEG's own noise of the
    shipped overlay, and its rows in the section's totals and report."""
    from types import SimpleNamespace

    import numpy as np
    import simplejpeg
    import torch

    from camserve.imaging import encode_image, load_rgb, open_image, snap_to_decode_scale
    from camserve.overlays import levels_at, render_overlay
    from camtools.bench import imagework
    from camtools.bench.context import BenchConfig, BenchContext, make_timer

    cam = np.random.default_rng(1).random((7, 7)).astype(np.float32)
    body = imagework.camera_photo((480, 270))
    opened = open_image(body)
    rgb = load_rgb(opened, at_least=(480, 270))
    steps = imagework.device_steps(body, (480, 270), 224, cam, torch.device("cpu"), 3)
    decoded = steps["decode"]()
    assert decoded.shape == (3, 3, 270, 480) and torch.equal(decoded[2].permute(1, 2, 0), torch.from_numpy(rgb))
    assert steps["resize to the model's 224"]().shape == (3, 3, 224, 224)
    levels = steps["map at the overlay's size"]()
    assert np.abs(levels[0].numpy().astype(int) - levels_at(cam, (270, 480))).max() <= 1
    shipped = render_overlay(rgb, levels_at(cam, (270, 480)), 0.5, "jet")
    drawn = steps["colours and blend"]()[1].permute(1, 2, 0).numpy()
    assert np.abs(drawn.astype(int) - shipped).max() <= 3 and np.abs(drawn.astype(int) - rgb).max() > 50
    jpegs = steps["encode"]()
    assert len(jpegs) == 3 and simplejpeg.decode_jpeg(jpegs[0].numpy().tobytes()).shape == (270, 480, 3)

    half = imagework.device_steps(body, snap_to_decode_scale(opened, (240, 135)), 224, cam, torch.device("cpu"), 1)
    reduced = half["decode"]()[0].permute(1, 2, 0).numpy().astype(int)  # decoded in full, resized on the device
    assert reduced.shape == (135, 240, 3) and np.abs(reduced - load_rgb(opened, at_least=(240, 135))).mean() < 6

    ctx = BenchContext(BenchConfig(repeats=1, warmup=0), torch.device("cpu"), make_timer(torch.device("cpu")), None,
                       SimpleNamespace(input_size=224), [])  # fmt: skip
    rows = imagework._device_rows(ctx, "1080p", 2048, body, (480, 270), cam, encode_image(shipped, "jpeg"))
    timed = [row for row in rows if row.get("device")]
    assert [row["step"] for row in timed] == list(steps) and all(row["ms"] > 0 for row in timed)
    assert {row["contender"] for row in rows} == {f"torch on cpu, batch {imagework.DEVICE_BATCH}"}
    (fidelity,) = [row for row in rows if row["step"] == "device fidelity"]
    assert fidelity["psnr_against_shipped_db"] > 35
    host = [{"photo": "1080p", "max_side": 2048, "step": "decode", "contender": "simplejpeg", "ms": 2.0,
             "ships": True},
            {"photo": "1080p", "max_side": 2048, "jpeg_bytes": len(body), "step": "fidelity", "output": "480x270",
             "psnr_against_before_db": 45.0, "jpeg_noise_psnr_db": 40.0}]  # fmt: skip
    totals = imagework.image_work_totals(host + rows)[("1080p", 2048)]
    assert totals["ships"] == 2.0 and totals["device"] == pytest.approx(sum(row["ms"] for row in timed))
    line = next(line for line in imagework.image_work_lines(host + rows) if "the same steps torch on cpu" in line)
    assert f"{totals['device']:.1f} ms per image" in line and "PSNR against the shipped one" in line


def test_the_detector_target_is_three_hirescam_detections_over_its_forward_pass():
    from camtools.bench.report import target_rows

    report = _report("cpu", floor_ms={1: 60.0, 8: 50.0}, cam_ms={1: 61.0, 8: 50.5}, service=[])
    row = {"task": "detection", "arch": "frcnn", "explanations": 3, "input": "451x300", "ms": 190.0, "floor_ms": 100.0}
    report.dense = [
        row | {"method": "hirescam", "ratio_to_floor": 1.9},
        row | {"method": "eigencam", "ratio_to_floor": 3.0},
        row | {"task": "segmentation", "method": "hirescam", "ratio_to_floor": 3.8},
    ]
    (target,) = [t for t in target_rows(report) if t["measure"].startswith("detector")]
    assert (target["measure"], target["value"], target["target"], target["met"]) == (
        "detector: 3 HiResCAM detections / its plain forward pass",
        1.9,
        "<= 2.5",
        True,
    )


def test_the_serving_cpu_is_read_from_each_process_and_summed_over_workers():
    """``serving_pids`` finds the frontend as the workers' parent; ``process_cpu_s`` counts a process's own CPU, all
    its threads, and sums over several workers; ``cpu_use`` turns seconds into ms per image and the ceiling."""
    import os
    import threading
    import time
    from types import SimpleNamespace

    from camtools.bench.service import cpu_use, process_cpu_s, serving_pids

    me = os.getpid()
    found = serving_pids(SimpleNamespace(worker_pids=lambda: [me, me]))
    assert found == {"worker": [me, me], "frontend": [os.getppid()]}

    def spin(seconds: float) -> None:
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    before, clock = process_cpu_s([me]), time.process_time()
    spinner = threading.Thread(target=spin, args=(0.3,))
    spinner.start()
    spinner.join()
    used, measured = process_cpu_s([me]) - before, time.process_time() - clock
    assert used == pytest.approx(measured, abs=0.03) and used >= 0.25  # another thread's CPU counts, in 10 ms ticks
    assert process_cpu_s([me, me]) == pytest.approx(2 * process_cpu_s([me]), abs=0.03)

    use = cpu_use({"worker": 1.5, "frontend": 0.25}, client=0.25, wall=1.25, count=20)
    cores = len(os.sched_getaffinity(0))
    assert use["loaded_cpu_worker_ms_per_image"] == 75.0 and use["loaded_cpu_frontend_ms_per_image"] == 12.5
    assert use["loaded_cpu_ms_per_image"] == 100.0
    assert use["loaded_cores_busy"] == pytest.approx(2.0 / (cores * 1.25))
    assert use["loaded_cpu_bound_images_per_s"] == pytest.approx(cores * 10.0)
