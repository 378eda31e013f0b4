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
def test_bench_cli_runs_on_a_tiny_configuration(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--batch-sizes", "1,2", "--repeats", "1"]
    command += ["--warmup", "0", "--agreement-images", "2", "--out", str(tmp_path)]
    if shutil.which("java"):
        command += ["--concurrency", "1,2", "--requests", "2", "--soak", "2"]
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
    assert [row["method"] for row in report["methods"]] == [m for m in METHODS if m != "sess"]  # sess: counted only
    assert report["machine"]["torch"] and report["targets"]
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "| target |" in (tmp_path / "bench.md").read_text()
    if shutil.which("java"):
        assert [level["errors"] for level in report["service"]] == [0, 0]


def test_the_readme_quotes_the_benchmark_runs_from_one_generated_block():
    """Every benchmark figure the README gives comes from docs/bench/*.json through one generated block."""
    from camtools.benchmark import FIGURES_END, FIGURES_START, readme_figures

    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(FIGURES_START), readme.index(FIGURES_END) + len(FIGURES_END)
    assert readme[start:end] == readme_figures(ROOT), "rerun: python scripts/bench.py --readme-figures"


def test_the_readmes_method_costs_come_from_the_methods_run():
    from camtools.benchmark import COSTS_END, COSTS_START, readme_method_costs

    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(COSTS_START), readme.index(COSTS_END) + len(COSTS_END)
    assert readme[start:end] == readme_method_costs(ROOT), "rerun: python scripts/bench.py --readme-figures"
    assert all(f"| `{method}` |" in readme[start:end] for method in METHODS if method != "sess")
