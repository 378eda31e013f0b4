"""Shared fixtures: seeded ResNet-50s, sample photos and an image-file factory. Nothing is downloaded."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from camtools.models import prepare_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def resnet50() -> torch.nn.Module:
    """torchvision's ResNet-50 as seed 0 initialises it, eval mode, frozen parameters (the engine tests' model)."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.resnet50().eval().requires_grad_(False)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """ShapesNet trained on the synthetic task (about 30 s on two cores), as the build would serve it, and its
    held-out accuracy."""
    from camtools.synthetic import trained_shapes_model

    return trained_shapes_model(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    """A tabby cat, 451x300 RGB, shipped inside scikit-image's wheel."""
    import skimage.data

    return skimage.data.chelsea()


def sample_photos() -> list[np.ndarray]:
    """Eight distinct RGB photos of different sizes from scikit-image's wheel."""
    import skimage.data as data

    gray_to_rgb = lambda image: np.repeat(image[:, :, None], 3, axis=2)  # noqa: E731
    return [
        data.chelsea(),
        data.astronaut(),
        data.coffee(),
        data.rocket(),
        data.colorwheel(),
        data.immunohistochemistry(),
        gray_to_rgb(data.camera()),
        gray_to_rgb(data.coins()),
    ]


def encode(array: np.ndarray, fmt: str = "PNG", **save_args) -> bytes:
    """An array (or PIL image) saved to bytes with Pillow."""
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def built_mar(tmp_path_factory) -> Path:
    """resnet50.mar built once per session with seeded random weights, a batch size of 8 and a 100 ms delay.

    The delay is longer than the shipped default so that concurrent test requests reliably share a batch.
    """
    from camtools.archive import ServingConfig, build_archive

    store = tmp_path_factory.mktemp("model_store")
    config = ServingConfig(batch_size=8, max_batch_delay_ms=100)
    return build_archive(prepare_model(arch="resnet50", weights="random", seed=0), store, config=config)


@pytest.fixture(scope="session")
def unpacked_mar(built_mar, tmp_path_factory) -> Path:
    """The built archive, unpacked as TorchServe unpacks it into its model directory."""
    import zipfile

    model_dir = tmp_path_factory.mktemp("model_dir")
    with zipfile.ZipFile(built_mar) as archive:
        archive.extractall(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def dense_folder(tmp_path_factory) -> Path:
    """Where ``dense_models`` saves each task's weights and labels: ``shapes_<task>.pt``, ``labels_<task>.txt``."""
    return tmp_path_factory.mktemp("dense_models")


@pytest.fixture(scope="session")
def dense_models(dense_folder) -> dict[str, tuple[object, float]]:
    """The synthetic task's detector and segmenter, trained once per session (``camtools.synthetic``): for each
    task, the prepared model and its held-out score."""
    from camtools.synthetic import trained_dense_model

    return {task: trained_dense_model(task, dense_folder) for task in ("detection", "segmentation")}


@pytest.fixture(scope="session")
def faster_rcnn(tmp_path_factory) -> tuple[object, float]:
    """The synthetic task's two-stage detector (``camtools.synthetic.FASTER_RCNN``), trained once per session (about
    35 s on two cores), prepared as the build serves it, and its held-out score."""
    from camtools.synthetic import FASTER_RCNN, trained_dense_model

    folder = tmp_path_factory.mktemp("faster_rcnn")
    return trained_dense_model("detection", folder, epochs=2, model_file=FASTER_RCNN)


@pytest.fixture(scope="session")
def new_kinds_server(tmp_path_factory):
    """One torchserve serving the newer kinds of archive beside a classifier (tests/models/tiny_net.py): a zero-shot
    CLIP and an embedder (tests/test_zero_shot.py), a 3D network and a grayscale one (tests/test_volumes.py), built
    by scripts/build_mar.py. One server for both modules: each start builds and loads a classifier too."""
    from tests.test_integration import built_and_served
    from tests.test_volumes import medical_builds
    from tests.test_zero_shot import zero_shot_builds

    folder = tmp_path_factory.mktemp("new_kinds")
    classifier = ["--model-file", str(ROOT / "tests" / "models" / "tiny_net.py"), "--weights", "random"]
    builds = zero_shot_builds(folder) + medical_builds(folder) + [[*classifier, "--model-name", "classifier"]]
    with built_and_served(builds, folder, "clip") as running:
        yield running, folder
