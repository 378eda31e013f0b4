"""Packs a validated model into ``<name>.mar``: its weights, its spec, model-config.yaml, the runtime package
``camserve`` whole, the user's model file if any, and the worker's requirements.

Build-time only: this module is not shipped inside the archive.
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

import camserve
from camserve import settings
from camserve.api import WorkBudget
from camserve.model import HF_PREFIX, MONAI_PREFIX, OPEN_CLIP_PREFIX, TIMM_PREFIX
from camserve.spec import SPEC_FILE
from camtools.models import BuildError, PreparedModel

__all__ = ["ServingConfig", "build_archive", "worker_requirements"]

RUNTIME_PACKAGE = Path(camserve.__file__).resolve().parent
HANDLER_FILE = RUNTIME_PACKAGE / "gradcam_handler.py"
STATE_DICT_NAME = "state_dict.pt"
REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"
SERVER_PROVIDED = {"torch", "torchvision", "torchserve", "torch-model-archiver", "pyyaml"}
"""What a TorchServe image already has: the archive's requirements leave these out, so that installing them never
replaces the server's own torch."""
MODEL_SOURCES = {"timm", "transformers", "safetensors", "open-clip-torch", "ftfy", "monai", "nibabel"}
"""Requirements a worker installs only when its model needs them (see :func:`model_needs`)."""


def _pins(requirements: Path = REQUIREMENTS) -> dict[str, str]:
    """Each requirement of requirements.txt by its lower-case name."""
    pins = {}
    for line in requirements.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            pins[re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()] = requirement
    return pins


def worker_requirements(needs: set[str] = frozenset(), requirements: Path = REQUIREMENTS) -> str:
    """The pinned requirements a worker needs beyond TorchServe's own (OpenCV, Pillow, NumPy, orjson, pybase64,
    simplejpeg), plus the model sources in ``needs`` (timm, transformers), from the project's requirements.txt:
    TorchServe installs them when ``install_py_dep_per_model=true`` (KServe's image)."""
    pins = _pins(requirements)
    wanted = [pin for name, pin in pins.items() if name not in SERVER_PROVIDED | MODEL_SOURCES or name in needs]
    return "\n".join(wanted) + "\n"


def model_needs(prepared: PreparedModel) -> set[str]:
    """The model sources an archive's worker must install: timm for a timm model, transformers for a Hugging Face
    one, and what the model file imports among them. A model file that imports a package the worker would not have
    is refused, naming it."""
    spec = prepared.spec
    needs = {"timm"} if spec.arch.startswith(TIMM_PREFIX) else set()
    needs |= {"transformers"} if spec.arch.startswith(HF_PREFIX) else set()
    needs |= {"open-clip-torch", "ftfy", "timm"} if spec.arch.startswith(OPEN_CLIP_PREFIX) else set()
    needs |= {"monai"} if spec.arch.startswith(MONAI_PREFIX) else set()
    needs |= {"nibabel"} if spec.volume is not None else set()
    if prepared.model_file is not None:
        available = set(sys.stdlib_module_names) | {"torch", "torchvision", "numpy", "cv2", "PIL", "camserve"}
        for name in _imports(prepared.model_file):
            if name in MODEL_SOURCES:
                needs.add(name)
            elif name not in available:
                raise BuildError(
                    f"{prepared.model_file.name} imports {name}, which an archive's worker does not install: it has "
                    f"torch, torchvision, numpy and {', '.join(sorted(MODEL_SOURCES))}; put the code in the model file"
                )
    return needs


def _imports(path: Path) -> set[str]:
    """The top-level packages a Python file imports (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@dataclass(frozen=True)
class ServingConfig:
    """What goes into the archive's model-config.yaml.

    The defaults are :mod:`camserve.settings`', measured with ``scripts/bench.py`` (docs/performance.md). On a GPU
    raise the batch size and measure the delay there.
    """

    batch_size: int = settings.BATCH_SIZE
    max_batch_delay_ms: int = settings.MAX_BATCH_DELAY_MS
    workers: int = settings.WORKERS
    response_timeout_s: int = settings.RESPONSE_TIMEOUT_S
    scorecam_channels: int = settings.SCORECAM_CHANNELS
    precision: str = settings.PRECISION
    channels_last: int = settings.CHANNELS_LAST_FROM
    """The smallest batch that runs channels_last (1: every batch, 0: none); see
    :func:`camserve.model.channels_last_from`."""
    compile: bool = settings.COMPILE
    """The network before the default layer compiled when the worker starts (CPU; :mod:`camserve.cam.compiled`)."""
    max_image_bytes: int = settings.MAX_IMAGE_BYTES
    max_image_pixels: int = settings.MAX_IMAGE_PIXELS
    max_volume_voxels: int = settings.MAX_VOLUME_VOXELS
    budget: WorkBudget = WorkBudget()

    def model_config(self) -> dict[str, object]:
        return {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
            "startupTimeout": settings.COMPILE_STARTUP_TIMEOUT_S if self.compile else settings.STARTUP_TIMEOUT_S,
            "handler": {
                "scorecam_channels": self.scorecam_channels,
                "precision": self.precision,
                "channels_last": self.channels_last,
                "compile": self.compile,
                "limits": {
                    "max_bytes": self.max_image_bytes,
                    "max_pixels": self.max_image_pixels,
                    "max_voxels": self.max_volume_voxels,
                },
                "budget": asdict(self.budget),
            },
        }


def check_served(prepared: PreparedModel, config: ServingConfig = ServingConfig()) -> dict[str, object]:
    """The task's sample input (seeded noise: a 160x120 PNG photo, a NIfTI volume) through the whole served path,
    as the worker will run it: the service with the archive's budget decodes it, explains it and renders the answer.
    Returns the answer, or raises a :class:`~camtools.models.BuildError` with the service's own message."""
    from camserve.cam import CamEngine
    from camserve.pipeline import ExplanationService

    spec = prepared.spec
    if config.compile:  # the split only: the compile itself runs when the worker starts
        from camserve.cam.compiled import CompileRefused, split_at

        try:
            split_at(prepared.model, spec.default_layer)
        except CompileRefused as error:
            raise BuildError(f"--compile cannot compile the network before {spec.default_layer}: {error}") from None
    engine = CamEngine(prepared.model, input_size=spec.input_size, default_layer=spec.default_layer)
    service = ExplanationService(engine, spec, torch.device("cpu"), budget=config.budget, threads=1)
    result = service.warm_up()
    if result.status != 200 or not isinstance(result.body.get("explanations"), list):
        raise BuildError(f"a synthetic image through the served path got {result.status}: {result.body}")
    return result.body


def build_archive(
    prepared: PreparedModel,
    export_dir: str | Path,
    config: ServingConfig = ServingConfig(),
    handler_file: Path = HANDLER_FILE,
) -> Path:
    """Write ``<export_dir>/<spec name>.mar`` and return its path. ``handler_file`` is TorchServe's entry point; the
    runtime package, the shipped handler module included, travels beside it either way."""
    from model_archiver import ModelArchiver, ModelArchiverConfig  # build-time dependency only

    spec = prepared.spec
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mar-staging-") as staging_name:
        staging = Path(staging_name)
        extra = staging / "extra"
        extra.mkdir()
        shutil.copytree(RUNTIME_PACKAGE, extra / "camserve", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        spec.save(extra / SPEC_FILE)
        if prepared.hf_config is not None:  # the worker builds a Hugging Face model from its config
            (extra / spec.hf_config).mkdir()
            shutil.copy2(prepared.hf_config, extra / spec.hf_config / "config.json")
            for side_file in prepared.hf_files:  # a CLIP or SigLIP model's tokenizer
                shutil.copy2(side_file, extra / spec.hf_config / side_file.name)
        torch.save(prepared.state_dict, staging / STATE_DICT_NAME)
        config_file = staging / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(config.model_config(), sort_keys=False))
        requirements = staging / "requirements.txt"
        requirements.write_text(worker_requirements(model_needs(prepared)))
        # The archiver stages files in <tempdir>/<model name>: give it this build's own tempdir, so that two builds
        # on one machine cannot collide.
        system_tempdir, tempfile.tempdir = tempfile.tempdir, str(staging)
        try:
            ModelArchiver.generate_model_archive(
                ModelArchiverConfig(
                    model_name=spec.name,
                    handler=str(handler_file),
                    version=spec.version,
                    serialized_file=str(staging / STATE_DICT_NAME),
                    model_file=str(prepared.model_file) if prepared.model_file else None,
                    extra_files=str(extra),
                    export_path=str(export_dir),
                    config_file=str(config_file),
                    requirements_file=str(requirements),
                    force=True,
                )
            )
        finally:
            tempfile.tempdir = system_tempdir
    return export_dir / f"{spec.name}.mar"
