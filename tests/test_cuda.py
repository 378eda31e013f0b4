"""The same engine and handler on a CUDA device; skipped where there is none (CI has none: run scripts/gpu_check.sh)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from camserve.cam import normalize_map
from camtools.gradcam import GradCAM
from tests.conftest import encode
from tests.helpers import RecordingContext, assert_matches_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_resnet50(resnet50):
    return copy.deepcopy(resnet50).to("cuda:0")


def test_matches_pytorch_grad_cam_on_cuda(cuda_resnet50):
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(3)
    images = torch.randn(2, 3, 224, 224, device="cuda:0")
    peer_model = copy.deepcopy(cuda_resnet50).requires_grad_(True)
    reference = ReferenceGradCAM(model=peer_model, target_layers=[peer_model.layer4])(
        input_tensor=images, targets=[ClassifierOutputTarget(281), ClassifierOutputTarget(7)]
    )
    out = GradCAM(cuda_resnet50, "layer4")(images, targets=[[281], [7]])
    ours = np.stack([normalize_map(m, (224, 224))[0].cpu().numpy() for m in out.maps])
    assert_matches_reference(ours, reference, "cuda")
    assert all(p.grad is None for p in cuda_resnet50.parameters())


def test_cuda_agrees_with_cpu(resnet50, cuda_resnet50):
    torch.manual_seed(4)
    images = torch.randn(4, 3, 224, 224)
    on_cpu = GradCAM(resnet50, "layer4")(images, targets=[[281], [1, 2], None, [5]])
    on_gpu = GradCAM(cuda_resnet50, "layer4")(images.cuda(), targets=[[281], [1, 2], None, [5]])
    assert on_gpu.targets == on_cpu.targets
    for cpu_maps, gpu_maps in zip(on_cpu.maps, on_gpu.maps, strict=True):
        a, b = normalize_map(cpu_maps, (224, 224)), normalize_map(gpu_maps, (224, 224)).cpu()
        assert (a - b).abs().max() < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_precisions_run_on_cuda(cuda_resnet50, dtype):
    images = torch.randn(2, 3, 224, 224, device="cuda:0")
    out = GradCAM(cuda_resnet50, "layer4", autocast_dtype=dtype)(images, targets=[[281], [7]])
    assert out.logits.dtype == torch.float32
    assert all(torch.isfinite(m).all() for m in out.maps)


def test_handler_serves_on_the_gpu_that_torchserve_assigns(unpacked_mar, chelsea):
    import sys

    sys.path.insert(0, str(unpacked_mar))
    try:
        from gradcam_handler import GradCamHandler

        context = RecordingContext(unpacked_mar)
        context.system_properties["gpu_id"] = "0"
        handler = GradCamHandler()
        handler.initialize(context)
        assert handler.device == torch.device("cuda:0")
        assert next(handler.model.parameters()).device == torch.device("cuda:0")
        rows = [{"body": bytearray(encode(chelsea, "JPEG"))}, {"body": bytearray(b"no image")}]
        responses = [json.loads(body) for body in handler.handle(rows, context)]
    finally:
        sys.path.remove(str(unpacked_mar))
    assert context.statuses == {1: (400, "Bad Request")}
    assert responses[0]["image"] == {"width": 451, "height": 300}
    assert len(responses[0]["explanations"]) == 1
