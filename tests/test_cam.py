"""The CAM engine: hand-computed values on tiny nets, the split forward, and parity with pytorch-grad-cam."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from handler.cam import GradCAM, LayerNotFoundError, normalize_map

X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)


class TinyLinearHead(nn.Module):
    """features: A^1 = x, A^2 = -x (a 1x1 conv). head: global average pool, then logits = W · pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 2, kernel_size=1, bias=False)
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.head.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class TinySquareHead(nn.Module):
    """features as above; logits y_0 = ½ Σ (A^1)², y_1 = Σ A^1 · A^2. Non-linear, so Grad-CAM differs from CAM."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 2, kernel_size=1, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        self.forward_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_calls += 1
        a = self.features(x)
        return torch.stack([0.5 * (a[:, 0] ** 2).sum(dim=(1, 2)), (a[:, 0] * a[:, 1]).sum(dim=(1, 2))], dim=1)


def test_linear_head_hand_computed():
    # ∂y_c/∂A^k_ij = W_ck / 4, so α^c = W_c / 4.
    # c=1: ReLU(3/4·x − 1/4·(−x)) = x.   c=0: ReLU(1/4·x + 2/4·(−x)) = ReLU(−x/4) = 0.
    out = GradCAM(TinyLinearHead(), "features")(X, targets=[[1, 0]])
    torch.testing.assert_close(out.maps[0][0], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(out.maps[0][1], torch.zeros(2, 2))
    torch.testing.assert_close(out.logits, torch.tensor([[2.5 - 5.0, 7.5 + 2.5]]))


def test_nonlinear_head_hand_computed():
    # y_0 = ½ Σ x²: ∂y_0/∂A^1 = A^1 = x, α_1 = mean(x) = 2.5, α_2 = 0: map = 2.5·x.
    # y_1 = Σ A^1·A^2: ∂/∂A^1 = A^2 = −x (α_1 = −2.5), ∂/∂A^2 = A^1 = x (α_2 = 2.5): ReLU(−2.5x − 2.5x) = 0.
    out = GradCAM(TinySquareHead(), "features")(X, targets=[[0, 1]])
    torch.testing.assert_close(out.maps[0][0], 2.5 * X[0, 0])
    torch.testing.assert_close(out.maps[0][1], torch.zeros(2, 2))


def test_default_target_is_top1_prediction():
    out = GradCAM(TinyLinearHead(), "features")(X)
    assert out.targets == [[1]]  # logits (−2.5, 10)


def test_normalize_map_hand_computed():
    # m(r, c) = 2r + c; bilinear 2→4 with align_corners=False samples r, c at 0, ¼, ¾, 1.
    up = normalize_map(torch.tensor([[[0.0, 1.0], [2.0, 3.0]]]), size=(4, 4))
    steps = torch.tensor([0.0, 0.25, 0.75, 1.0])
    torch.testing.assert_close(up[0], (2 * steps[:, None] + steps[None, :]) / 3)


def test_normalize_map_keeps_all_zero_maps_zero():
    out = normalize_map(torch.zeros(2, 7, 7), size=(32, 48))
    assert out.shape == (2, 32, 48)
    assert torch.isfinite(out).all() and (out == 0).all()


def test_all_zero_gradients_give_zero_maps():
    model = TinyLinearHead()
    with torch.no_grad():
        model.head.weight.zero_()
    out = GradCAM(model, "features")(X, targets=[[0]])
    assert (out.maps[0] == 0).all()
    assert (normalize_map(out.maps[0], (8, 8)) == 0).all()


def test_several_targets_share_one_forward_pass():
    model = TinySquareHead()
    images = torch.cat([X, 2 * X, -X])
    out = GradCAM(model, "features")(images, targets=[[0, 1], [1], None])
    assert model.forward_calls == 1
    for n, classes in enumerate(out.targets):
        for t, c in enumerate(classes):
            alone = GradCAM(model, "features")(images[n : n + 1], targets=[[c]])
            torch.testing.assert_close(out.maps[n][t], alone.maps[0][0])


def test_prefix_runs_without_autograd_and_suffix_with_it(resnet50):
    grad_enabled: dict[str, bool] = {}
    hooks = [
        resnet50.get_submodule(name).register_forward_hook(
            lambda module, i, o, name=name: grad_enabled.__setitem__(name, torch.is_grad_enabled())
        )
        for name in ("layer1", "layer3", "fc")
    ]
    try:
        GradCAM(resnet50, "layer4")(torch.randn(1, 3, 64, 64), targets=[[1]])
    finally:
        for hook in hooks:
            hook.remove()
    assert grad_enabled == {"layer1": False, "layer3": False, "fc": True}
    assert torch.is_grad_enabled()  # pytest runs with grad enabled; the call must leave it so


def test_no_parameter_gradients_even_for_trainable_models():
    model = TinySquareHead()  # parameters require grad here
    GradCAM(model, "features")(X, targets=[[0]])
    assert all(p.grad is None for p in model.parameters())


def test_works_under_inference_mode(resnet50):
    images = torch.randn(2, 3, 64, 64)
    expected = GradCAM(resnet50, "layer4")(images, targets=[[3], [4]])
    with torch.inference_mode():
        inside = GradCAM(resnet50, "layer4")(images, targets=[[3], [4]])
    for a, b in zip(expected.maps, inside.maps):
        torch.testing.assert_close(a, b)


def test_hooks_removed_after_an_exception():
    model = TinyLinearHead()
    with pytest.raises(RuntimeError):
        GradCAM(model, "features")(torch.randn(1, 3, 2, 2))  # wrong channel count: the conv raises
    assert not model.features._forward_hooks
    assert torch.is_grad_enabled()


def test_unknown_layer_lists_valid_names():
    with pytest.raises(LayerNotFoundError, match="features"):
        GradCAM(TinyLinearHead(), "layer9")


def test_in_place_ops_after_the_layer_do_not_corrupt_the_activation(resnet50):
    # layer4.2.bn3's output is followed by ``out += identity``; the map must use the bn3 output alone.
    image = torch.randn(1, 3, 64, 64)
    captured = []
    hook = resnet50.layer4[2].bn3.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    try:
        out = GradCAM(resnet50, "layer4.2.bn3")(image, targets=[[5]])
    finally:
        hook.remove()
    activation = captured[0]
    suffix = lambda a: resnet50.fc(torch.relu(a + identity).mean(dim=(2, 3)))  # noqa: E731
    with torch.no_grad():
        x = resnet50.maxpool(resnet50.relu(resnet50.bn1(resnet50.conv1(image))))
        identity = resnet50.layer4[:2](resnet50.layer3(resnet50.layer2(resnet50.layer1(x))))
    a = activation.requires_grad_(True)
    (gradient,) = torch.autograd.grad(suffix(a)[0, 5], a)
    expected = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1))
    torch.testing.assert_close(out.maps[0], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layer", ["layer4", "layer3", "layer2.1.conv2"])
def test_matches_pytorch_grad_cam_on_resnet50(resnet50, layer):
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224)
    targets = [281, 7]
    peer_model = copy.deepcopy(resnet50).requires_grad_(True)  # the peer backpropagates through every parameter
    reference = ReferenceGradCAM(model=peer_model, target_layers=[peer_model.get_submodule(layer)])(
        input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets]
    )
    out = GradCAM(resnet50, layer)(images, targets=[[t] for t in targets])
    ours = np.stack([normalize_map(m, (224, 224))[0].numpy() for m in out.maps])
    assert np.abs(ours - reference).max() < 1e-3
    assert all(p.grad is None for p in resnet50.parameters())


def test_batch_equals_images_one_by_one(resnet50):
    torch.manual_seed(2)
    images = torch.randn(3, 3, 224, 224)
    out = GradCAM(resnet50, "layer4")(images, targets=[[281], [1, 2], None])
    for n in range(3):
        alone = GradCAM(resnet50, "layer4")(images[n : n + 1], targets=[out.targets[n]])
        torch.testing.assert_close(out.maps[n], alone.maps[0], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(out.logits[n], alone.logits[0], atol=1e-4, rtol=1e-4)
