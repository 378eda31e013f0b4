"""The build CLI: the three --weights choices, and a clear message when the ImageNet weights cannot be had."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import torch

from handler.model import random_state_dict
from tests.conftest import ROOT

BUILD = [sys.executable, str(ROOT / "scripts" / "build_mar.py")]


def run_build(*arguments: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run([*BUILD, *arguments], capture_output=True, text=True, timeout=300, env=environment)


def test_imagenet_offline_fails_naming_the_other_two_choices(tmp_path):
    # An unreachable proxy and an empty cache: torchvision's download must fail here, whatever the network.
    unreachable = "http://127.0.0.1:9"
    completed = run_build(
        "--weights", "imagenet", "--export-path", str(tmp_path),
        TORCH_HOME=str(tmp_path / "cache"), https_proxy=unreachable, HTTPS_PROXY=unreachable,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "could not download the ImageNet weights" in completed.stderr
    assert "--weights PATH" in completed.stderr and "--weights random" in completed.stderr
    assert not list(tmp_path.glob("*.mar"))


def test_a_missing_weights_file_is_a_clear_error(tmp_path):
    completed = run_build("--weights", str(tmp_path / "missing.pt"), "--export-path", str(tmp_path))
    assert completed.returncode == 2 and "no weights file" in completed.stderr


def test_file_weights_are_named_by_their_hash(tmp_path):
    weights = tmp_path / "resnet50.pt"
    torch.save(random_state_dict(seed=3), weights)
    completed = run_build("--weights", str(weights), "--export-path", str(tmp_path / "store"), "--batch-size", "4")
    assert completed.returncode == 0, completed.stderr[-2000:]
    with zipfile.ZipFile(tmp_path / "store" / "resnet50.mar") as archive:
        config = archive.read("model-config.yaml").decode()
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert "weights: file:" in config and "batchSize: 4" in config
    assert manifest["model"]["modelName"] == "resnet50" and manifest["model"]["handler"] == "gradcam_handler.py"


def test_random_weights_come_with_a_loud_warning(tmp_path):
    completed = run_build("--weights", "random", "--export-path", str(tmp_path))
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "WARNING: --weights random" in completed.stderr and "mean NOTHING" in completed.stderr
    assert (tmp_path / "resnet50.mar").is_file()
