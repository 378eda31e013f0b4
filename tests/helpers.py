"""Test-only helpers shared by several test modules: the layers a
model can explain, and a TorchServe context that records what the handler sets per request."""

from __future__ import annotations

import json

from torch import nn
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext

from camserve.cam import describe_layers
from tests.conftest import ROOT


def spatial_layers(model: nn.Module, image_size: int = 224) -> list[str]:
    """The submodules that a CAM can explain: those that run once per forward pass and give a spatial map."""
    return [name for name, info in describe_layers(model, image_size).items() if info.layout]


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
        self.metrics = MetricsCacheYamlImpl(config_file_path=str(ROOT / "metrics.yaml"))
        self.metrics.initialize_cache()
        self.metrics.model_name = "resnet50"
        self.metrics.set_request_ids({0: "request-0"})
        self.statuses: dict[int, tuple[int, str]] = {}
        self.content_types: dict[int, str] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value
