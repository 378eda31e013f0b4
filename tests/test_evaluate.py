"""Which method for my model: the synthetic task trains a model that really localises, and the faithfulness
measures tell Grad-CAM from the random baseline on it; the CLI on a folder of class subfolders."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from camserve.cam import CamEngine, CamRequest, Classes
from camserve.cam.sanity import Sanity
from camtools.evaluate import (
    LabelledImage,
    cascade,
    cascade_blocks,
    cascade_markdown,
    evaluate,
    load_labelled_images,
    markdown,
)
from camtools.synthetic import CLASSES, make_samples, to_batch
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


def test_the_cascade_randomises_block_by_block_and_its_first_step_below_the_layer_is_the_served_figure(shapes):
    prepared, _ = shapes
    assert cascade_blocks(prepared.model) == ["head", "features.6", "features.3", "features.0"]
    images = [LabelledImage(str(i), s.image, s.label) for i, s in enumerate(make_samples(12, seed=8))]
    steps = cascade(prepared.model, prepared.spec, images, ["gradcam", "eigencam"], layer="features.5")
    value = {(step.method, step.block): step.correlation for step in steps}
    # Down to features.6, the model after features.5 is random: the served check's figure, averaged.
    engine = CamEngine(prepared.model, input_size=64)
    sanity = Sanity(engine)
    batch = torch.stack([to_batch([item.image])[0] for item in images])
    requests = [CamRequest(Classes([item.label]), "features.5", "gradcam") for item in images]
    output = engine(batch, requests, keep=sanity.keep(requests))
    served = sanity.figures(batch, requests, output)
    found = [served[n][0].rank_correlation for n in range(len(images))]
    assert abs(value["gradcam", "features.6"] - np.nanmean(np.array(found, dtype=float))) < 1e-5
    assert value["eigencam", "head"] == value["eigencam", "features.6"] == 1.0  # nothing it reads is random yet
    assert value["eigencam", "features.3"] < 1.0  # now its own activations are
    assert value["gradcam", "features.6"] < 0.3
    assert "| `gradcam` |" in cascade_markdown(steps) and "→ `features.0`" in cascade_markdown(steps)


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
    command += ["--layers", "features.2", "--steps", "4", "--out", str(tmp_path / "out"), "--cascade", "--road"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    table = (tmp_path / "out" / "faithfulness.md").read_text()
    for method in ("gradcam", "randomcam"):
        for layer in ("features.4", "features.2"):
            assert f"| `{method}` | `{layer}` |" in table
    assert (tmp_path / "out" / "faithfulness.png").stat().st_size > 10_000
    assert "| `randomcam` |" in (tmp_path / "out" / "sanity.md").read_text()
    assert "ROAD ↑ |" in table
    assert (tmp_path / "out" / "sanity.png").stat().st_size > 10_000
    assert "evaluating" in completed.stderr  # the progress bar


def test_labelled_images_from_a_csv_with_boxes(tmp_path):
    sample = make_samples(1, seed=3)[0]
    (tmp_path / "a.png").write_bytes(encode(sample.image, "PNG"))
    (tmp_path / "boxes.csv").write_text(
        f"file,class,x0,y0,x1,y1\na.png,{CLASSES[sample.label]},{','.join(map(str, sample.box))}\n"
    )
    (item,) = load_labelled_images(tmp_path / "boxes.csv", CLASSES)
    assert item.label == sample.label and item.box == sample.box and item.image.shape == (64, 64, 3)
