"""Which method for my model: the synthetic task trains a model that really localises, and the faithfulness
measures tell Grad-CAM from the random baseline on it; the CLI on a folder of class subfolders."""

from __future__ import annotations

import subprocess
import sys

import pytest

from camtools.evaluate import LabelledImage, evaluate, load_labelled_images, markdown
from camtools.synthetic import CLASSES, make_samples
from tests.conftest import ROOT, encode


@pytest.mark.slow
def test_the_synthetic_task_trains_a_model_that_localises_and_faithfulness_tells_random_from_gradcam(shapes):
    prepared, accuracy = shapes
    assert accuracy >= 0.95
    images = [LabelledImage(str(i), s.image, s.label, s.box) for i, s in enumerate(make_samples(48, seed=77))]
    scores = {s.method: s.summary() for s in evaluate(prepared.model, prepared.spec, images, ["gradcam", "randomcam"])}
    gradcam, random = scores["gradcam"], scores["randomcam"]
    assert gradcam["pointing"] >= 0.9 > random["pointing"]  # Grad-CAM's maximum lands on the shape
    assert gradcam["deletion"] < random["deletion"] - 0.3  # deleting what Grad-CAM points at kills the prediction
    assert gradcam["drop"] < random["drop"] - 0.3
    # Insertion saturates on this task (the blurred colour alone still tells the class), for both methods alike:
    # a broken insertion curve (deletion's, or an unblurred start) would fall far below 0.9.
    assert gradcam["insertion"] >= 0.9 and random["insertion"] >= 0.9
    assert abs(gradcam["insertion"] - random["insertion"]) < 0.1
    table = markdown(list(evaluate(prepared.model, prepared.spec, images[:4], ["gradcam"])))
    assert "| `gradcam` | `features.7` |" in table


def test_evaluate_cli_on_a_folder_of_class_subfolders(tmp_path, chelsea):
    for label, name in enumerate(("circle", "square", "triangle")):
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True)
        sample = make_samples(1, seed=label)[0].image
        (folder / "one.png").write_bytes(encode(sample, "PNG"))
    labels = tmp_path / "labels.txt"
    labels.write_text("circle\nsquare\ntriangle\n")
    command = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(tmp_path / "images")]
    command += ["--model-file", str(ROOT / "tests" / "models" / "tiny_net.py"), "--weights", "random"]
    command += ["--labels", str(labels), "--input-size", "64", "--methods", "gradcam", "randomcam"]
    command += ["--layers", "features.2", "--steps", "4", "--out", str(tmp_path / "out")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    table = (tmp_path / "out" / "faithfulness.md").read_text()
    for method in ("gradcam", "randomcam"):
        for layer in ("features.4", "features.2"):
            assert f"| `{method}` | `{layer}` |" in table
    assert (tmp_path / "out" / "faithfulness.png").stat().st_size > 10_000
    assert "evaluating" in completed.stderr  # the progress bar


def test_labelled_images_from_a_csv_with_boxes(tmp_path):
    sample = make_samples(1, seed=3)[0]
    (tmp_path / "a.png").write_bytes(encode(sample.image, "PNG"))
    (tmp_path / "boxes.csv").write_text(
        f"file,class,x0,y0,x1,y1\na.png,{CLASSES[sample.label]},{','.join(map(str, sample.box))}\n"
    )
    (item,) = load_labelled_images(tmp_path / "boxes.csv", CLASSES)
    assert item.label == sample.label and item.box == sample.box and item.image.shape == (64, 64, 3)
