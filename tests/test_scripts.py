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
