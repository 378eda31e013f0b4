"""ROAD (``camtools.road``): the noisy linear imputation by hand, pytorch-grad-cam's ``ROADCombined`` to 1e-3 (on a
smooth map, a map that ReLU left zero on most pixels, and a flat map, where the reference solves singular systems),
on the trained synthetic model, where it tells Grad-CAM from the random baseline, and the report's ROAD end to end
against the reference on a model with more classes than the image has colour channels."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from camtools.evaluate import LabelledImage, evaluate
from camtools.road import NEIGHBOURS, impute, road_combined
from camtools.synthetic import make_samples


def test_a_removed_pixel_is_the_weighted_mean_of_its_neighbours():
    image = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 3, 3) ** 1.5
    keep = np.ones((3, 3), dtype=bool)
    keep[1, 1] = False
    filled = impute(image, keep, torch.Generator().manual_seed(0), noise=0.0)
    expected = sum(weight * image[:, 1 + dy, 1 + dx] for (dy, dx), weight in NEIGHBOURS)
    torch.testing.assert_close(filled[:, 1, 1], expected)
    assert torch.equal(filled[:, keep], image[:, keep])
    # Two neighbours removed together: each is the weighted mean of the other's imputed value and its known ones.
    keep[1, 2] = False
    filled = impute(image, keep, torch.Generator().manual_seed(0), noise=0.0)
    for y, x in ((1, 1), (1, 2)):
        inside = [((dy, dx), w) for (dy, dx), w in NEIGHBOURS if 0 <= y + dy < 3 and 0 <= x + dx < 3]
        mean = sum(w * filled[:, y + dy, x + dx] for (dy, dx), w in inside) / sum(w for _, w in inside)
        torch.testing.assert_close(filled[:, y, x], mean)


def maps(side: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    smooth = rng.normal(size=(1, side, side)).cumsum(1).cumsum(2)
    sparse = np.clip(rng.normal(size=(1, side, side)), 0, None)  # ReLU'd: zero on half the pixels
    found = {"smooth": smooth - smooth.min(), "mostly zero": sparse, "flat": np.full((1, side, side), 0.5)}
    return {name: np.float32(cam / max(cam.max(), 1e-9)) for name, cam in found.items()}


@pytest.mark.parametrize("name", ["smooth", "mostly zero", "flat"])
def test_road_matches_pytorch_grad_cams_road_combined(name):
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Linear(128, 5)).eval()  # fmt: skip
    x = torch.randn(1, 3, 40, 40)
    cam = maps(40)[name]
    torch.manual_seed(3)  # the reference draws its imputation noise from the global generator; ours from seed 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's singular solves on the flat map
        reference = ROADCombined()(x, cam, [ClassifierOutputSoftmaxTarget(2)], model)
    ours = road_combined(model, x, cam, [2], seed=3)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, reference, atol=1e-3)
    if name == "flat":
        assert ours[0] == 0.0  # a flat map ranks nothing: MoRF and LeRF remove the same pixels
    else:
        np.testing.assert_allclose(ours, reference, atol=1e-6)  # the same imputations, the same noise


def test_road_tells_gradcam_from_the_random_baseline_on_the_trained_model(shapes):
    prepared, _ = shapes
    images = [LabelledImage(str(i), s.image, s.label) for i, s in enumerate(make_samples(16, seed=21))]
    scores = evaluate(prepared.model, prepared.spec, images, ["gradcam", "randomcam"], steps=4, road=True)
    road = {score.method: score.summary()["road"] for score in scores}
    # Removing what Grad-CAM points at costs the class far more than removing the rest; the random map's ranking
    # points at the clutter as often as not, so its ROAD is near or below 0.
    print(f"ROAD on trained ShapesNet: {road}")
    assert road["gradcam"] > 0.2 and road["gradcam"] > road["randomcam"] + 0.3, road


def test_the_reports_road_is_pytorch_grad_cams_on_a_model_with_more_classes_than_colours():
    """The report runs ROAD on the model: class 281 of a 1000-class ResNet-18 (seeded weights) scores the same as
    pytorch-grad-cam's ``ROADCombined`` on the same image, map and seed. Scoring the perturbed images themselves
    (their softmax over 3 colour channels) cannot reach class 281 at all."""
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    from skimage.data import chelsea

    from camserve.cam import CamEngine, CamRequest, Classes, normalize_map
    from camserve.model import images_to_batch
    from camtools.models import prepare_model

    prepared = prepare_model(arch="resnet18", weights="random", seed=0, progress=False)
    model, spec = prepared.model, prepared.spec
    side, target = spec.input_size, 281
    image = LabelledImage("chelsea", chelsea(), target)
    (score,) = evaluate(model, spec, [image], ["gradcam"], steps=4, road=True)
    batch = images_to_batch([image.image], spec)
    engine = CamEngine(model, input_size=side, default_layer=spec.default_layer)
    cam = normalize_map(engine(batch, [CamRequest(Classes([target]))]).maps[0], (side, side)).numpy()
    torch.manual_seed(0)  # the report's seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ROADCombined()(batch, cam, [ClassifierOutputSoftmaxTarget(target)], model)
    ours = score.summary()["road"]
    print(f"report ROAD, class {target}: ours {ours:.6e}, pytorch-grad-cam {float(reference[0]):.6e}")
    # Random weights spread the softmax over 1000 classes, so the figure is small: compare it relatively too.
    assert ours != 0 and ours == pytest.approx(float(reference[0]), rel=1e-4, abs=1e-9)
    # Faithfulness in the same report reads the model's class 281 too: deletion starts at p(x).
    assert 0 < score.summary()["deletion"] < 1
