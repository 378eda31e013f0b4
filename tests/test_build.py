"""The build: every --weights choice, your own classes, labels and model file, and bad builds that exit non-zero with
a message that names the problem and the fix, writing no archive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torchvision

from camtools.archive import RUNTIME_PACKAGE, worker_requirements
from camtools.models import BuildError, prepare_model, read_labels
from tests.conftest import ROOT

BUILD = [sys.executable, str(ROOT / "scripts" / "build_mar.py")]
TINY_NET = ROOT / "tests" / "models" / "tiny_net.py"


def run_build(*arguments: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run([*BUILD, *arguments], capture_output=True, text=True, timeout=300, env=environment)


def seeded(arch: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, **kwargs)


@pytest.fixture(scope="module")
def two_class_checkpoint(tmp_path_factory):
    """A fine-tuned-style 2-class ResNet-50 as training scripts save it: under "state_dict", DataParallel's
    ``module.`` prefix on every key; with its labels file."""
    folder = tmp_path_factory.mktemp("finetuned")
    state = {f"module.{k}": v for k, v in seeded("resnet50", num_classes=2).state_dict().items()}
    torch.save({"epoch": 7, "state_dict": state}, folder / "pets.pt")
    (folder / "labels.txt").write_text("cat\ndog\n")
    return folder


@pytest.mark.parametrize(
    ("arch", "trained_on"), [("convnext_tiny", "ImageNet-1K"), ("fasterrcnn_mobilenet_v3_large_320_fpn", "COCO")]
)
def test_pretrained_weights_offline_fail_naming_them_and_the_other_two_choices(tmp_path, arch, trained_on):
    # An unreachable proxy and an empty cache: torchvision's download must fail here, whatever the network.
    unreachable = "http://127.0.0.1:9"
    completed = run_build(
        "--arch", arch, "--weights", "imagenet", "--export-path", str(tmp_path),
        TORCH_HOME=str(tmp_path / "cache"), https_proxy=unreachable, HTTPS_PROXY=unreachable,
    )  # fmt: skip
    assert completed.returncode == 2
    assert f"could not download the {trained_on} weights of {arch}" in completed.stderr
    assert "--weights PATH" in completed.stderr and "--weights random" in completed.stderr
    assert trained_on == "ImageNet-1K" or "ImageNet" not in completed.stderr  # a detector's are COCO's
    assert not list(tmp_path.glob("*.mar"))


def test_a_missing_weights_file_is_a_clear_error(tmp_path):
    completed = run_build("--weights", str(tmp_path / "missing.pt"), "--export-path", str(tmp_path))
    assert completed.returncode == 2 and "no weights file" in completed.stderr


def test_random_weights_come_with_a_loud_warning(tmp_path):
    completed = run_build("--weights", "random", "--export-path", str(tmp_path))
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "WARNING: --weights random" in completed.stderr and "mean NOTHING" in completed.stderr
    assert "DETECTOR" not in completed.stderr
    assert (tmp_path / "resnet50.mar").is_file()
    # The arguments are checked first: a build that fails says why, with no warning before it.
    refused = run_build("--weights", "random", "--arch", "resnet18", "--task", "detection", "--export-path",
                        str(tmp_path))  # fmt: skip
    assert refused.returncode == 2 and "WARNING" not in refused.stderr, refused.stderr
    assert refused.stderr.startswith("error: ")


def test_a_random_detector_is_told_that_it_finds_no_box_at_the_default_threshold(tmp_path):
    completed = run_build("--weights", "random", "--arch", "fasterrcnn_mobilenet_v3_large_320_fpn", "--export-path",
                          str(tmp_path))  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "A DETECTOR on random weights scores no box" in completed.stderr and "score_threshold=0" in completed.stderr


def test_a_fine_tuned_two_class_resnet50_builds_with_its_labels(tmp_path, two_class_checkpoint):
    completed = run_build(
        "--weights", str(two_class_checkpoint / "pets.pt"), "--labels", str(two_class_checkpoint / "labels.txt"),
        "--model-name", "pets", "--export-path", str(tmp_path), "--batch-size", "4",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "2 classes" in completed.stdout and "/predictions/pets" in completed.stdout
    with zipfile.ZipFile(tmp_path / "pets.mar") as archive:
        spec = json.loads(archive.read("model_spec.json"))
        config = archive.read("model-config.yaml").decode()
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        names = set(archive.namelist())
        requirements = archive.read("requirements.txt").decode()
    assert spec["arch"] == "resnet50" and spec["labels"] == ["cat", "dog"] and spec["default_layer"] == "layer4"
    assert spec["arch_kwargs"] == {"num_classes": 2} and spec["weights"].startswith("file:")
    assert spec["input_size"] == 224 and spec["layers"]["layer4"] == "nchw" and "fc" not in spec["layers"]
    assert "batchSize: 4" in config
    assert manifest["model"]["modelName"] == "pets" and manifest["model"]["handler"] == "gradcam_handler.py"
    assert manifest["model"]["requirementsFile"] == "requirements.txt"
    # The runtime package ships whole, and nothing of the build tools does.
    package = {f"camserve/{p.name}" for p in RUNTIME_PACKAGE.glob("*.py")}
    assert package <= names and not any(name.startswith("camtools") for name in names)
    assert "opencv-python-headless==" in requirements and "torch" not in requirements.split("opencv")[0]


def test_worker_requirements_leave_out_what_the_server_has():
    lines = worker_requirements().splitlines()
    names = {line.split("==")[0] for line in lines}
    assert {"opencv-python-headless", "pillow", "numpy"} <= names
    assert not names & {"torch", "torchvision", "torchserve", "torch-model-archiver", "pyyaml"}


def test_any_head_size_is_read_from_the_tensors():
    for arch, classes in (("convnext_tiny", 37), ("vit_b_16", 5)):
        state = seeded(arch, num_classes=classes).state_dict()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("camtools.models.read_checkpoint", lambda path, state=state: state)
            patch.setattr("camtools.models._file_label", lambda path: "file:test")
            prepared = prepare_model(arch=arch, weights="weights.pt")
        assert prepared.spec.num_classes == classes and prepared.spec.labels[0] == "class_0"
        assert prepared.spec.arch_kwargs["num_classes"] == classes


def test_bad_builds_name_the_problem_and_the_fix(tmp_path, two_class_checkpoint):
    resnet18 = tmp_path / "resnet18.pt"
    torch.save(seeded("resnet18").state_dict(), resnet18)
    whole = tmp_path / "whole.pt"
    torch.save(seeded("resnet18"), whole)  # a pickled model, not a state_dict
    three = tmp_path / "three.txt"
    three.write_text("cat\ndog\nbird\n")
    pets = str(two_class_checkpoint / "pets.pt")
    cases = [
        (["--weights", str(resnet18)], ["do not fit --arch resnet50", "missing keys", "--arch resnet18"]),
        (["--weights", pets, "--labels", str(three)], ["3 labels for 2 classes"]),
        (["--weights", str(whole)], ["not a plain state_dict", "torch.save(model.state_dict()"]),
        (["--weights", pets, "--layer", "fc"], ["layer fc gives no spatial map", "layer4"]),
        (["--weights", pets, "--layer", "layer9"], ["layer layer9 is not a module of the model"]),
        (["--arch", "resnet51", "--weights", "random"], ["not a torchvision classification model", "resnet50"]),
        (["--model-file", str(ROOT / "tests" / "models" / "two_modules.py"), "--weights", "random"],
         ["exactly one nn.Module subclass", "Backbone, Classifier"]),
        (["--model-file", str(TINY_NET), "--weights", "imagenet"], ["--weights imagenet needs --arch"]),
        (["--arch", "resnet50", "--model-file", str(TINY_NET)], ["not both"]),
        (["--arch", "resnet18", "--weights", "random", "--layer", "layer4.1.conv2", "--compile"],
         ["--compile cannot compile the network before layer4.1.conv2", "2 values cross"]),
    ]  # fmt: skip
    with ThreadPoolExecutor(max_workers=3) as pool:  # each build is its own process: they overlap their imports
        builds = list(pool.map(lambda case: run_build(*case[0], "--export-path", str(tmp_path / "store")), cases))
    for (arguments, phrases), completed in zip(cases, builds, strict=True):
        assert completed.returncode == 2, (arguments, completed.stderr[-1500:])
        for phrase in phrases:
            assert phrase in completed.stderr, (arguments, phrase, completed.stderr[-1500:])
        assert "Traceback" not in completed.stderr
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").glob("*.mar"))


def test_a_model_file_network_builds_and_ships_its_file(tmp_path):
    weights = tmp_path / "tiny.pt"
    torch.manual_seed(1)
    from camserve.model import model_class_from_file

    torch.save(model_class_from_file(TINY_NET)().state_dict(), weights)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["circle", "square", "triangle"]))
    completed = run_build(
        "--model-file", str(TINY_NET), "--weights", str(weights), "--labels", str(labels),
        "--input-size", "64", "--export-path", str(tmp_path),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    with zipfile.ZipFile(tmp_path / "tinynet.mar") as archive:
        spec = json.loads(archive.read("model_spec.json"))
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        assert archive.read("tiny_net.py") == TINY_NET.read_bytes()
    assert manifest["model"]["modelFile"] == "tiny_net.py" and spec["model_file"] == "tiny_net.py"
    assert spec["arch"] == "TinyNet" and spec["labels"] == ["circle", "square", "triangle"]
    assert spec["default_layer"] == "features.4" and spec["input_size"] == 64


@pytest.mark.parametrize(
    "content, suffix",
    [
        ('["cat", "dog"]', ".json"),
        ('{"1": "dog", "0": "cat"}', ".json"),
        ('{"0": ["n02121808", "cat"], "1": ["n02084071", "dog"]}', ".json"),
        ("cat\ndog\n\n", ".txt"),
    ],
)
def test_labels_in_every_accepted_format(tmp_path, content, suffix):
    path = tmp_path / f"labels{suffix}"
    path.write_text(content)
    assert read_labels(path) == ["cat", "dog"]


def test_labels_with_a_gap_in_the_indices_are_refused(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text('{"0": "cat", "2": "dog"}')
    with pytest.raises(BuildError, match="class indices 0 to 1"):
        read_labels(path)


def test_the_torchserve_dockerfile_installs_each_archives_own_requirements(built_mar):
    """No container builder runs here: the image's install step is run as written against a built archive."""
    import re
    import subprocess
    import sys

    dockerfile = (ROOT / "deploy" / "torchserve" / "Dockerfile").read_text()
    assert "FROM pytorch/torchserve:0.12.0-cpu" in dockerfile and "USER model-server" in dockerfile
    command = re.search(r'python -c "(import sys, zipfile;[^"]+)"', dockerfile).group(1)
    completed = subprocess.run([sys.executable, "-c", command, str(built_mar)], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == worker_requirements().strip()
    assert "pillow-heif==" in completed.stdout and "torch==" not in completed.stdout


def test_an_unknown_architecture_says_what_there_is():
    from camtools.models import BuildError, prepare_model

    with pytest.raises(BuildError) as caught:
        prepare_model(arch="timm:not_a_model", weights="random", progress=False)
    message = str(caught.value)
    assert "is not a timm model: no name is close." in message and "timm.list_models('*not_*')" in message
    with pytest.raises(BuildError) as caught:
        prepare_model(arch="resnet18", weights="random", task="detection", progress=False)
    message = str(caught.value)
    assert "it is a classification model, built with --task multiclass" in message
    assert "fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2, fcos_resnet50_fpn" in message  # the list itself
