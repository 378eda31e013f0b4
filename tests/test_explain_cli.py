"""The offline CLI: overlays and a contact sheet from the same engine and imaging as the service."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np

from camserve.imaging import ACCEPTED_INPUTS
from tests.conftest import ROOT, encode


def test_cli_writes_overlays_and_a_labelled_contact_sheet(tmp_path, chelsea):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "cat.png").write_bytes(encode(chelsea, "PNG"))
    (inputs / "notes.txt").write_text("not an image: skipped by suffix")
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "scripts" / "explain.py"), str(inputs), "--target", "281,282"]
    command += ["--weights", "random", "--method", "layercam", "--out", str(out), "--sanity"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "WARNING: --weights random" in completed.stderr
    assert completed.stdout.count("with the map once fc are randomised") == 2  # one per explanation
    assert sorted(p.name for p in out.iterdir()) == ["cat_281_tabby.png", "cat_282_tiger_cat.png", "cat_sheet.png"]
    overlay = cv2.imread(str(out / "cat_281_tabby.png"))
    assert overlay.shape == (300, 451, 3)
    sheet = cv2.imread(str(out / "cat_sheet.png"))
    assert sheet.shape[0] == 320 + 44 and sheet.shape[1] > 3 * 451 * 320 / 300  # three tiles and their captions
    assert not np.array_equal(sheet[:320, :100], sheet[:320, -100:])  # original and overlay differ


def test_cli_reports_each_bad_file_on_one_line_after_the_others_and_fails(tmp_path, chelsea):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    good = tmp_path / "cat.png"
    good.write_bytes(encode(chelsea, "PNG"))
    missing = tmp_path / "missing.jpg"
    command = [sys.executable, str(ROOT / "scripts" / "explain.py"), str(bad), str(missing), str(good)]
    completed = subprocess.run(
        command + ["--weights", "random", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 1
    assert (tmp_path / "out" / "cat_sheet.png").is_file()  # the good file after the bad ones is still explained
    lines = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [
        f"error: {bad}: the file is not a decodable image; accepted: {ACCEPTED_INPUTS}",
        f"error: {missing}: cannot be read: No such file or directory",
    ]
    assert "Traceback" not in completed.stderr and "2 of 3 images could not be explained" in completed.stderr
    after_bar = completed.stderr[completed.stderr.rindex("explaining") :]  # the progress bar's last line
    assert all(line in after_bar for line in lines)  # printed after the bar, not into it


def test_show_response_writes_beside_its_input(tmp_path, chelsea):
    from camserve.imaging import encode_image, to_base64

    response = {
        "model": {"name": "sizes", "version": "1.0", "weights": "random", "arch": "x", "classes": 1,
                  "task": "regression"},
        "image": {"width": 4, "height": 4},
        "predictions": [{"index": 0, "label": "side", "value": 0.25}],
        "explanations": [
            {"index": 0, "label": "side", "value": 0.25, "method": "gradcam", "layer": "f", "format": "png",
             "width": 4, "height": 4, "overlay": to_base64(encode_image(chelsea[:4, :4], "png"))}
        ],
    }  # fmt: skip
    folder = tmp_path / "answers"
    folder.mkdir()
    (folder / "response.json").write_text(json.dumps(response))
    command = [sys.executable, str(ROOT / "scripts" / "show_response.py"), str(folder / "response.json")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert (folder / "overlay_0_side.png").is_file() and not (tmp_path / "overlay_0_side.png").exists()
    assert "side" in completed.stdout and "value=0.25" in completed.stdout and "p=" not in completed.stdout


def test_cli_takes_the_builds_model_flags(tmp_path, chelsea):
    """--model-file, --labels and --layer as for the build: the labels name the files, the layer changes the map."""
    image = tmp_path / "cat.png"
    image.write_bytes(encode(chelsea, "PNG"))
    labels = tmp_path / "labels.txt"
    labels.write_text("circle\nsquare\ntriangle\n")
    overlays = {}
    for layer in ("features.4", "features.2"):
        out = tmp_path / layer
        command = [sys.executable, str(ROOT / "scripts" / "explain.py"), str(image), "--target", "1"]
        command += ["--model-file", str(ROOT / "tests" / "models" / "tiny_net.py"), "--weights", "random"]
        command += ["--labels", str(labels), "--layer", layer, "--input-size", "96", "--out", str(out)]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-2000:]
        assert "square (1)" in completed.stdout and "triangle (2)" in completed.stdout  # the top-k, printed
        assert f"wrote {out / 'cat_1_square.png'}" in completed.stdout
        overlays[layer] = cv2.imread(str(out / "cat_1_square.png")).astype(int)
    assert np.abs(overlays["features.4"] - overlays["features.2"]).mean() > 1.0


def test_cli_explains_a_detectors_boxes_and_a_segmenters_segments(tmp_path, dense_models, dense_folder):
    from camtools.synthetic import SIZE, dense_scenes

    scene = next(s for s in dense_scenes(30, seed=4) if len(s.boxes) == 2)
    image = cv2.resize(scene.image, (4 * SIZE, 4 * SIZE), interpolation=cv2.INTER_NEAREST)
    (tmp_path / "scene.png").write_bytes(encode(image, "PNG"))
    colours = {colour + 1: name for colour, name in enumerate(("red", "green", "blue")) if colour in scene.boxes}
    written = {}
    for task, (prepared, _) in dense_models.items():
        out = tmp_path / task
        command = [sys.executable, str(ROOT / "scripts" / "explain.py"), str(tmp_path / "scene.png")]
        command += ["--model-file", str(prepared.model_file), "--task", task, "--input-size", str(SIZE)]
        command += ["--weights", str(dense_folder / f"shapes_{task}.pt"), "--labels"]
        command += [str(dense_folder / f"labels_{task}.txt"), "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25"]
        command += ["0.25", "--out", str(out), "--explain", "2"]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-2000:]
        written[task] = (completed.stdout, sorted(p.name for p in out.iterdir()))
    stdout, files = written["detection"]
    assert all(f"{name} score=" in stdout for name in colours.values())  # each detection, with its box
    assert sorted(files) == sorted(
        ["scene_sheet.png"] + [f"scene_detection{i}_{c}_{colours[c]}.png" for i, c in enumerate(detected(stdout))]
    )
    stdout, files = written["segmentation"]
    assert "background (0) share=" in stdout and all(f"{name} (" in stdout for name in colours.values())
    explained = [f"scene_{c}_{name}.png" for c, name in colours.items()]  # the two largest segments not background
    assert files == sorted(["scene_mask.png", "scene_sheet.png", *explained])
    mask = cv2.imread(str(tmp_path / "segmentation" / "scene_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape[:2] == (4 * SIZE, 4 * SIZE)


def detected(stdout: str) -> list[int]:
    """The classes of the detections the CLI printed, in order: ``#0 green score=0.894 at [...]``."""
    names = {"red": 1, "green": 2, "blue": 3}
    return [names[part.split()[1]] for part in stdout.split("#")[1:]]
