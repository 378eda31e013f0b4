"""The shell scripts' guard rails: a clear error when Java is missing or the archive is not built."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.conftest import ROOT


def test_serve_without_java_says_how_to_get_it(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with the basic tools and no java
    bin_dir.mkdir()
    for tool in ("dirname", "sed", "head", "cat"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    completed = subprocess.run(
        [shutil.which("bash"), str(ROOT / "scripts" / "serve.sh"), "start"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
    )
    assert completed.returncode == 1
    assert "TorchServe needs Java 17" in completed.stderr
    assert "apt-get install -y openjdk-17-jre-headless" in completed.stderr


def test_the_runtime_install_holds_no_test_tools():
    """``setup.sh --runtime`` installs requirements.txt alone: serving and the build, none of the test tools."""
    runtime = {
        line.split("==")[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line
    }
    assert {"torch", "torchserve", "opencv-python-headless", "pillow-heif", "timm", "transformers"} <= runtime
    assert not runtime & {"pytest", "playwright", "ruff", "grad-cam", "tritonclient", "hypothesis", "scikit-image",
                          "torchcam", "captum", "quantus"}  # fmt: skip
    # Quantus is installed apart, without its dependencies: its opencv-python would replace the headless cv2.
    assert "--no-deps -r requirements-references.txt" in (ROOT / "scripts" / "setup.sh").read_text()
    assert "quantus==0.6.0" in (ROOT / "requirements-references.txt").read_text()
    script = (ROOT / "scripts" / "setup.sh").read_text()
    assert "--runtime) requirements=requirements.txt" in script and "pip install" in script
    completed = subprocess.run(
        [shutil.which("bash"), str(ROOT / "scripts" / "setup.sh"), "--everything"], capture_output=True, text=True
    )
    assert (
        completed.returncode == 2
        and "usage: bash scripts/setup.sh [--runtime | --kserve | --audit]" in completed.stderr
    )


def test_the_kserve_install_is_the_runtime_and_the_sdk_alone():
    """``setup.sh --kserve``: requirements.txt and kserve, pinned, in a file of its own; the archive's worker (its
    requirements.txt) never gets it, and the test install includes it."""
    lines = (ROOT / "requirements-kserve.txt").read_text().splitlines()
    pins = [line for line in lines if line and not line.startswith("#")]
    assert pins == ["-r requirements.txt", "kserve==0.21.0"]
    assert "kserve" not in (ROOT / "requirements.txt").read_text()
    assert "-r requirements-kserve.txt" in (ROOT / "requirements-dev.txt").read_text()
    assert "--kserve) requirements=requirements-kserve.txt" in (ROOT / "scripts" / "setup.sh").read_text()
    dockerfile = (ROOT / "deploy" / "kserve" / "Dockerfile").read_text()
    assert "bash scripts/setup.sh --kserve" in dockerfile and '"-m", "camserve.kserve", "--model-dir"' in dockerfile


def test_the_audit_install_is_the_runtime_ray_data_and_scikit_learn_and_never_the_workers():
    """``setup.sh --audit``: requirements.txt, ray[data], pyarrow and scikit-learn, pinned exactly, in a file of its
    own; the test install includes it; an archive's worker requirements never name Ray."""
    from camtools.archive import worker_requirements

    lines = (ROOT / "requirements-audit.txt").read_text().splitlines()
    pins = [line for line in lines if line and not line.startswith("#")]
    assert pins == ["-r requirements.txt", "ray[data]==2.60.0", "pyarrow==26.0.1", "scikit-learn==1.9.1"]
    assert "-r requirements-audit.txt" in (ROOT / "requirements-dev.txt").read_text()
    assert "--audit) requirements=requirements-audit.txt" in (ROOT / "scripts" / "setup.sh").read_text()
    for needs in (set(), {"timm"}, {"transformers"}):
        assert "ray" not in worker_requirements(needs).lower()


def test_an_installed_set_that_holds_the_asked_one_installs_nothing(tmp_path):
    """The install record names the sets installed: after the test install, --kserve, --audit and --runtime install
    nothing, and the test install after --kserve does not start over; a set not held is installed."""
    for name in ("requirements.txt", "requirements-kserve.txt", "requirements-audit.txt", "requirements-dev.txt",
                 "requirements-references.txt", "pyproject.toml"):  # fmt: skip
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    log = tmp_path / "pip.log"
    python = tmp_path / ".venv" / "bin" / "python"  # a stand-in that records each install it is asked for
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$@" >>{log}\n')
    python.chmod(0o755)

    def setup(*flags: str) -> list[str]:
        before = log.read_text().splitlines() if log.exists() else []
        completed = subprocess.run([shutil.which("bash"), str(tmp_path / "scripts" / "setup.sh"), *flags],
                                   capture_output=True, text=True, timeout=60)  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        after = log.read_text().splitlines() if log.exists() else []
        return [line.split(" -r ")[1] for line in after[len(before) :] if " -r " in line]

    assert setup("--kserve") == ["requirements-kserve.txt"]
    assert setup("--runtime") == []  # the KServe set holds the runtime's
    assert setup() == ["requirements-dev.txt", "requirements-references.txt"]
    assert setup("--kserve") == [] and setup("--audit") == [] and setup() == []
    (tmp_path / "requirements.txt").write_text((ROOT / "requirements.txt").read_text() + "# changed\n")
    assert setup("--runtime") == ["requirements.txt"]  # a changed file starts the record over
    assert setup("--audit") == ["requirements-audit.txt"]
