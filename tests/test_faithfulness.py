"""Faithfulness metrics: hand-computed on a tiny model, Average Drop against pytorch-grad-cam."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from camserve.faithfulness import faithfulness, forward_passes


def sum_model(z: torch.Tensor) -> torch.Tensor:
    """logits = [Σ z, 0]: p_0(z) = σ(Σ z), so every step's probability is a closed form."""
    total = z.sum(dim=(1, 2, 3))
    return torch.stack([total, torch.zeros_like(total)], dim=1)


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def test_deletion_insertion_drop_hand_computed():
    # A 6x6 one-channel input whose map ranks the pixels in reading order, backwards: the last pixel first.
    x = torch.arange(36, dtype=torch.float32).view(1, 1, 6, 6) / 36.0
    m = torch.arange(36, dtype=torch.float32).view(1, 6, 6) / 35.0
    steps = 4  # k_i = round(i * 36 / 4) = 0, 9, 18, 27, 36 pixels
    values = x.flatten().tolist()
    blurred = gaussian_blur(x, kernel_size=11, sigma=5.0).flatten().tolist()
    p = [sigmoid(sum(values[: 36 - k])) for k in (0, 9, 18, 27, 36)]  # deleting the top k = the last k pixels
    deletion = ((p[0] + p[4]) / 2 + p[1] + p[2] + p[3]) / 4
    q = [sigmoid(sum(blurred[: 36 - k]) + sum(values[36 - k :])) for k in (0, 9, 18, 27, 36)]
    insertion = ((q[0] + q[4]) / 2 + q[1] + q[2] + q[3]) / 4
    p_x = sigmoid(sum(values))
    weighted = sigmoid(sum(v * w for v, w in zip(values, (m.flatten()).tolist(), strict=True)))
    (result,) = faithfulness(sum_model, x, m, torch.tensor([0]), torch.tensor([p_x]), steps=steps)
    assert result.deletion == pytest.approx(deletion, abs=1e-6)
    assert result.insertion == pytest.approx(insertion, abs=1e-6)
    assert result.drop == pytest.approx(max(0.0, p_x - weighted) / p_x, abs=1e-6)
    assert result.increase is (weighted > p_x) and result.steps == 4
    assert forward_passes(16) == 33


def test_ties_in_the_map_keep_pixel_order_and_every_batch_size_agrees():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 8, 8)
    m = torch.rand(3, 8, 8).round(decimals=1)  # many ties: the stable argsort decides
    p_x = sum_model(x).softmax(dim=1)[:, 1]
    one = faithfulness(sum_model, x, m, torch.tensor([1, 1, 1]), p_x, steps=8, batch=1)
    many = faithfulness(sum_model, x, m, torch.tensor([1, 1, 1]), p_x, steps=8, batch=1000)
    assert one == many


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))


def test_drop_matches_pytorch_grad_cam():
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    torch.manual_seed(1)
    model = SmallNet().eval()
    x = torch.randn(4, 3, 32, 32)
    maps = torch.rand(4, 32, 32)
    classes = [0, 3, 4, 1]
    with torch.no_grad():
        p_x = model(x).softmax(dim=1)[torch.arange(4), torch.tensor(classes)]
    change = CamMultImageConfidenceChange()(
        x, maps.numpy(), [ClassifierOutputSoftmaxTarget(c) for c in classes], model
    )  # p(x·m) − p(x)
    ours = faithfulness(model, x, maps, torch.tensor(classes), p_x, steps=4)
    expected = np.maximum(0.0, -np.asarray(change).ravel()) / p_x.numpy()
    assert np.abs(np.array([r.drop for r in ours]) - expected).max() < 1e-4
    assert [r.increase for r in ours] == [bool(c > 0) for c in np.asarray(change).ravel()]
