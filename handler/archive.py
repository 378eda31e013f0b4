"""Packs the service into ``resnet50.mar``: weights, labels, model-config.yaml and the runtime package.

Build-time only: this module is not shipped inside the archive.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from handler.contract import WorkBudget
from handler.model import (
    WeightsUnavailableError,
    file_weights_label,
    imagenet_labels,
    imagenet_state_dict,
    load_state_dict_file,
    random_state_dict,
)

__all__ = ["ServingConfig", "build_archive", "resolve_weights", "weights_for_cli"]

PACKAGE_DIR = Path(__file__).resolve().parent
RUNTIME_MODULES = (
    "__init__.py",
    "cam.py",
    "contract.py",
    "errors.py",
    "gradcam_handler.py",
    "imaging.py",
    "model.py",
    "pipeline.py",
)
HANDLER_FILE = PACKAGE_DIR / "gradcam_handler.py"
STATE_DICT_NAME = "resnet50_state_dict.pt"


@dataclass(frozen=True)
class ServingConfig:
    """What goes into the archive's model-config.yaml.

    The defaults come from ``scripts/bench.py`` on a two-core CPU (README, "Performance"): one worker, because a
    single worker already spreads each batch over every core with torch's intra-op threads; batches of up to 8, so
    that concurrent requests share one forward pass; a 5 ms batch delay, small next to a forward pass (about 55 ms
    per image), so that a lone request barely waits; channels_last, 1.1x faster with identical results. On a GPU
    raise the batch size.
    """

    batch_size: int = 8
    max_batch_delay_ms: int = 5
    workers: int = 1
    response_timeout_s: int = 120
    scorecam_channels: int = 64
    precision: str = "fp32"
    channels_last: bool = True
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    budget: WorkBudget = WorkBudget()

    def model_config(self, weights_label: str) -> dict[str, object]:
        return {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
            "handler": {
                "weights": weights_label,
                "scorecam_channels": self.scorecam_channels,
                "precision": self.precision,
                "channels_last": self.channels_last,
                "limits": {"max_bytes": self.max_image_bytes, "max_pixels": self.max_image_pixels},
                "budget": asdict(self.budget),
            },
        }


RANDOM_WARNING = """
################################################################################
#  WARNING: --weights random. The model is seeded random noise. Its predictions #
#  and heatmaps mean NOTHING; every response says "weights": "random".         #
#  Use --weights imagenet (download) or --weights PATH (a state_dict file).    #
################################################################################
"""


def weights_for_cli(choice: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], str]:
    """:func:`resolve_weights` for the command-line tools: a loud warning for random weights, and a clear message
    with exit status 2 when the weights cannot be had."""
    if choice == "random":
        print(RANDOM_WARNING, file=sys.stderr)
    try:
        return resolve_weights(choice, seed)
    except WeightsUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def resolve_weights(choice: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], str]:
    """``imagenet``, ``random`` or a state_dict path to (state_dict, the label responses report)."""
    if choice == "imagenet":
        return imagenet_state_dict(progress=True), "imagenet"
    if choice == "random":
        return random_state_dict(seed), "random"
    return load_state_dict_file(choice), file_weights_label(choice)


def build_archive(
    state_dict: dict[str, torch.Tensor],
    weights_label: str,
    export_dir: str | Path,
    config: ServingConfig = ServingConfig(),
    version: str = "1.0",
    model_name: str = "resnet50",
    handler_file: Path = HANDLER_FILE,
) -> Path:
    """Write ``<export_dir>/<model_name>.mar`` and return its path. ``handler_file`` is TorchServe's entry point;
    the runtime package, the shipped handler module included, travels beside it either way."""
    from model_archiver import ModelArchiver, ModelArchiverConfig  # build-time dependency only

    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mar-staging-") as staging_name:
        staging = Path(staging_name)
        extra = staging / "extra"
        (extra / "handler").mkdir(parents=True)
        for module in RUNTIME_MODULES:
            shutil.copy2(PACKAGE_DIR / module, extra / "handler" / module)
        labels = imagenet_labels()
        (extra / "index_to_name.json").write_text(json.dumps({str(i): name for i, name in enumerate(labels)}))
        torch.save(state_dict, staging / STATE_DICT_NAME)
        config_file = staging / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(config.model_config(weights_label), sort_keys=False))
        # The archiver stages files in <tempdir>/<model name>: give it this build's own tempdir, so that two builds
        # on one machine cannot collide.
        system_tempdir, tempfile.tempdir = tempfile.tempdir, str(staging)
        try:
            ModelArchiver.generate_model_archive(
                ModelArchiverConfig(
                    model_name=model_name,
                    handler=str(handler_file),
                    version=version,
                    serialized_file=str(staging / STATE_DICT_NAME),
                    extra_files=str(extra),
                    export_path=str(export_dir),
                    config_file=str(config_file),
                    force=True,
                )
            )
        finally:
            tempfile.tempdir = system_tempdir
    return export_dir / f"{model_name}.mar"
