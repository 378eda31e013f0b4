"""The serving constants are declared once (camserve.settings): every config and CLI that ships them agrees."""

from __future__ import annotations

import subprocess
import sys

import yaml

from camserve import settings
from camserve.api import WorkBudget
from camserve.imaging import DecodeLimits
from camtools.archive import ServingConfig
from camtools.kserve import kserve_config
from tests.conftest import ROOT


def properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def test_the_shipped_config_properties_match_the_settings():
    shipped = properties((ROOT / "config.properties").read_text())
    assert int(shipped["max_request_size"]) == settings.MAX_REQUEST_BYTES
    assert int(shipped["max_response_size"]) == settings.MAX_RESPONSE_BYTES
    assert int(shipped["default_response_timeout"]) == settings.RESPONSE_TIMEOUT_S
    assert shipped["inference_address"] == f"http://127.0.0.1:{settings.INFERENCE_PORT}"
    assert shipped["management_address"] == f"http://127.0.0.1:{settings.MANAGEMENT_PORT}"
    assert shipped["metrics_address"] == f"http://127.0.0.1:{settings.METRICS_PORT}"
    assert shipped["disable_token_authorization"] == "false"


def test_the_kserve_runtime_config_matches_the_settings():
    written = properties(kserve_config("v1", "resnet50"))
    assert int(written["max_request_size"]) == settings.MAX_REQUEST_BYTES
    assert int(written["max_response_size"]) == settings.MAX_RESPONSE_BYTES
    snapshot = yaml.safe_load(written["model_snapshot"])["models"]["resnet50"]["1.0"]
    assert snapshot["maxBatchDelay"] == settings.MAX_BATCH_DELAY_MS
    assert snapshot["responseTimeout"] == settings.RESPONSE_TIMEOUT_S


def test_the_archive_model_config_and_the_limits_default_to_the_settings():
    config = ServingConfig().model_config()
    assert (config["batchSize"], config["maxBatchDelay"], config["responseTimeout"]) == (
        settings.BATCH_SIZE,
        settings.MAX_BATCH_DELAY_MS,
        settings.RESPONSE_TIMEOUT_S,
    )
    assert config["minWorkers"] == config["maxWorkers"] == settings.WORKERS
    handler = config["handler"]
    assert handler["scorecam_channels"] == settings.SCORECAM_CHANNELS
    assert handler["channels_last"] == settings.CHANNELS_LAST_FROM
    assert handler["limits"] == {
        "max_bytes": settings.MAX_IMAGE_BYTES,
        "max_pixels": settings.MAX_IMAGE_PIXELS,
        "max_voxels": settings.MAX_VOLUME_VOXELS,
    }
    assert handler["budget"] == {
        "max_side": settings.DEFAULT_OUTPUT_SIDE,
        "max_output_pixels": settings.MAX_OUTPUT_PIXELS,
        "max_forward_passes": settings.MAX_FORWARD_PASSES,
        "max_response_bytes": settings.MAX_RESPONSE_BYTES,
        "max_output_voxels": settings.MAX_OUTPUT_VOXELS,
    }
    assert DecodeLimits().max_bytes == settings.MAX_IMAGE_BYTES
    assert WorkBudget().max_side == settings.DEFAULT_OUTPUT_SIDE


def test_the_build_cli_help_shows_the_settings():
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    text = " ".join(completed.stdout.split())
    assert f"(default: {settings.SCORECAM_CHANNELS})" in text
    assert f"milliseconds (default: {settings.MAX_BATCH_DELAY_MS})" in text
    assert f"(default: {settings.MAX_FORWARD_PASSES})" in text
