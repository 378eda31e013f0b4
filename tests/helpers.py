"""Test-only helpers shared by several test modules: the layers a
model can explain, and a TorchServe context that records what the handler sets per request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext

from camserve.cam import describe_layers
from tests.conftest import ROOT


def spatial_layers(model: nn.Module, image_size: int = 224) -> list[str]:
    """The submodules that a CAM can explain: those that run once per forward pass and give a spatial map."""
    return [name for name, info in describe_layers(model, image_size).items() if info.layout]


class RecordingMetrics(MetricsCacheYamlImpl):
    """TorchServe's own metrics cache (it refuses metrics that metrics.yaml does not declare), recording each value
    the handler adds: ``values[name]`` lists them in order."""

    def __init__(self) -> None:
        super().__init__(config_file_path=str(ROOT / "metrics.yaml"))
        self.initialize_cache()
        self.values: dict[str, list[float]] = {}

    def add_counter(self, name, value, *args, **kwargs):
        self.values.setdefault(name, []).append(value)
        return super().add_counter(name, value, *args, **kwargs)

    def add_time(self, name, value, *args, **kwargs):
        self.values.setdefault(name, []).append(value)
        return super().add_time(name, value, *args, **kwargs)

    def add_metric(self, name, value, *args, **kwargs):
        self.values.setdefault(name, []).append(value)
        return super().add_metric(name, value, *args, **kwargs)


class RecordingContext(MockContext):
    """MockContext plus the per-request response calls the handler makes, with TorchServe's own metrics cache
    reading the shipped metrics.yaml (MockContext's older MetricsStore lacks metric types)."""

    def __init__(self, model_dir) -> None:
        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        super().__init__(
            model_pt_file=manifest["model"]["serializedFile"],
            model_dir=str(model_dir),
            model_file=None,
            gpu_id=None,
            model_name="resnet50",
            model_yaml_config_file=manifest["model"]["configFile"],
        )
        self.manifest = manifest
        self.model_name = "resnet50"
        self.metrics = RecordingMetrics()
        self.metrics.model_name = "resnet50"
        self.metrics.set_request_ids({0: "request-0"})
        self.statuses: dict[int, tuple[int, str]] = {}
        self.content_types: dict[int, str] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value


def oriented(projection: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's (N, h, w) principal-component projections (``get_2d_projection``, whose sign the SVD routine
    picks) given the sign that ours takes (``camserve.cam.methods.activation.orient_tail``): each map's third moment
    positive. The reference's maps with our sign, so that parity holds up to the sign alone."""
    projection = np.asarray(projection, dtype=np.float64)
    third = (projection.reshape(len(projection), -1) ** 3).sum(axis=1)
    return np.where(third < 0, -1.0, 1.0)[:, None, None] * projection


def assert_matches_reference(ours, reference, what: str = "", tolerance: float = 1e-3) -> float:
    """Our normalised maps equal the reference implementation's to ``tolerance``, and the comparison is not trivial:
    all-zero (or constant) maps on both sides would match whatever the code does, so at least one map must span
    most of [0, 1]. Prints and returns the largest difference."""
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    spans = np.ptp(ours.reshape(-1, *ours.shape[-2:]), axis=(1, 2))
    reference_spans = np.ptp(reference.reshape(-1, *reference.shape[-2:]), axis=(1, 2))
    assert spans.max() > 0.5 and reference_spans.max() > 0.5, f"{what}: every map is flat: it would match trivially"
    difference = float(np.abs(ours - reference).max())
    flat = int((spans <= 0.5).sum())
    print(f"parity {what}: {difference:.1e}" + (f" ({flat} of {len(spans)} maps flat on both sides)" if flat else ""))
    assert difference < tolerance, (what, difference)
    return difference


def save_hf_models(folder: Path) -> tuple[Path, Path]:
    """A tiny Hugging Face ViT (multi-label, three labels, its image processor) and ResNet, as save_pretrained
    writes them."""
    from transformers import (
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    torch.manual_seed(0)
    vit = ViTConfig(
        image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3, id2label={0: "cat", 1: "dog", 2: "bird"},
        label2id={"cat": 0, "dog": 1, "bird": 2}, problem_type="multi_label_classification",
    )  # fmt: skip
    ViTForImageClassification(vit).save_pretrained(folder / "vit")
    processor = ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(folder / "vit")
    resnet = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=4)
    ResNetForImageClassification(resnet).save_pretrained(folder / "resnet")
    return folder / "vit", folder / "resnet"


def service_for(prepared, threads: int = 2):
    """The explanation service of a prepared model (``camtools.models.prepare_model``), on the CPU, in process."""
    from camserve.cam import CamEngine
    from camserve.pipeline import ExplanationService

    spec = prepared.spec
    engine = CamEngine(prepared.model, input_size=spec.input_size, default_layer=spec.default_layer)
    return ExplanationService(engine=engine, spec=spec, device=torch.device("cpu"), threads=threads)


def refusal(service, data: bytes, **fields) -> dict:
    """The body of the 4xx that ``service`` answers to ``data`` with these multipart ``fields``."""
    (answer,) = service.answer([{"data": bytearray(data), **{k: bytearray(v) for k, v in fields.items()}}])
    assert 400 <= answer.status < 500, answer.body
    return answer.body
