"""The methods that torchcam 0.5 and Captum 0.9 have beside pytorch-grad-cam's: each against a hand computation on a
tiny net and against its reference implementation at two layers, the 400 where it does not apply, and Guided
Grad-CAM's ReLU override scoped to its own pass."""

from __future__ import annotations

import contextlib
import copy
import re

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from camserve.cam import CamEngine, CamRequest, Classes, normalize_map
from camserve.cam.methods import backprop, perturbation
from camserve.cam.methods.classifier import cam_applies
from tests.helpers import assert_matches_reference

pytest.importorskip("torchcam")


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.resnet18(num_classes=10).eval()


def small_cnn() -> nn.Module:
    """Two convolutions, global average pooling and a linear head: every channel of both layers scored in seconds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
        ).eval()  # fmt: skip


def image(seed: int, side: int) -> torch.Tensor:
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed))


def ours(engine: CamEngine, x: torch.Tensor, target: int, layer: str, method: str) -> torch.Tensor:
    return engine(x, [CamRequest(Classes([target]), layer, method)]).maps[0][0]


def compare(mine: list[torch.Tensor], reference: list[torch.Tensor], side: int, what: str) -> None:
    """Raw values to 1e-3 of the largest, and the normalised maps at the input's size to 1e-3."""
    for a, b in zip(mine, reference, strict=True):
        assert (a - b).abs().max() <= 1e-3 * max(float(b.abs().max()), 1e-6), what
    assert_matches_reference(
        np.stack([normalize_map(m[None], (side, side))[0].numpy() for m in mine]),
        np.stack([normalize_map(m[None], (side, side))[0].numpy() for m in reference]),
        what,
    )


class Tiny(nn.Module):
    """A 1×1 convolution, ReLU, global average pooling and a linear head: every method's value has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


# --- CAM ---


def test_hand_computed_cam_is_the_classifier_row_times_the_activations():
    model = Tiny().eval()
    x = image(1, 6)
    activation = model.relu(model.conv(x))[0]
    expected = torch.relu((model.fc.weight[2].detach().view(4, 1, 1) * activation).sum(0))
    engine = CamEngine(model, input_size=6)
    torch.testing.assert_close(ours(engine, x, 2, "relu", "cam"), expected.detach())
    grad_cam = ours(engine, x, 2, "relu", "gradcam")
    torch.testing.assert_close(grad_cam * 36, expected.detach(), rtol=1e-5, atol=1e-6)  # Grad-CAM = CAM / (h·w)


def test_cam_applies_only_where_the_layers_mean_feeds_a_linear_layer(resnet18):
    engine = CamEngine(resnet18, input_size=64)
    assert cam_applies(engine, "layer4") is None and cam_applies(engine, "layer4.1") is None
    why = cam_applies(engine, "layer3")
    assert "no linear layer of this model takes the mean of layer3's output" in why and "gradcam" in why
    with pytest.raises(ValueError, match="takes the mean of layer3"):
        engine(image(0, 64), [CamRequest(layer="layer3", method="cam")])


# --- SS-CAM and IS-CAM ---


def test_hand_computed_sscam_and_iscam():
    model = Tiny().eval()
    x = image(2, 4)
    engine = CamEngine(model, input_size=4, scorecam_channels=None)
    activation = model.relu(model.conv(x))[0].detach()
    masks = activation - activation.amin(dim=(1, 2), keepdim=True)
    masks = masks / (masks.amax(dim=(1, 2), keepdim=True) + 1e-8)  # already at the input's size: no upsampling
    with torch.no_grad():
        baseline = model(x)[0, 1]
        generator = torch.Generator().manual_seed(perturbation.NOISE_SEED)
        noisy = torch.zeros(4)
        for _ in range(perturbation.SSCAM_SAMPLES):
            noise = torch.randn(masks.shape, generator=generator) * perturbation.SSCAM_STD
            noisy += torch.stack([model(x * (masks[k] + noise[k]))[0, 1] - baseline for k in range(4)])
        integrated, coefficient = torch.zeros(4), 0.0
        for step in range(perturbation.ISCAM_SAMPLES):
            coefficient += (step + 1) / perturbation.ISCAM_SAMPLES
            integrated += torch.stack([model(coefficient * x * masks[k])[0, 1] - baseline for k in range(4)])
    for method, total, samples in (("sscam", noisy, perturbation.SSCAM_SAMPLES),
                                   ("iscam", integrated, perturbation.ISCAM_SAMPLES)):  # fmt: skip
        weights = torch.softmax(total / samples, 0)
        expected = torch.relu((weights.view(4, 1, 1) * activation).sum(0))
        torch.testing.assert_close(ours(engine, x, 1, "relu", method), expected, rtol=1e-5, atol=1e-6)


# --- Smooth Grad-CAM++ ---


def test_hand_computed_smoothgradcam_pp():
    """After the layer the net is linear: every copy's gradient is w_c / (h·w), so D2 = g², D3 = g³."""
    model = Tiny().eval()
    x = image(4, 5)
    generator = torch.Generator().manual_seed(backprop.NOISE_SEED)
    copies = [x + torch.randn(x.shape[1:], generator=generator) * backprop.SMOOTH_STD for _ in range(4)]
    with torch.no_grad():
        clean, last = model.relu(model.conv(x))[0], model.relu(model.conv(copies[-1]))[0]
    g = (model.fc.weight[0].detach() / 25).view(4, 1, 1).expand(4, 5, 5)
    alpha = g**2 / (2 * g**2 + (g**3 * clean).sum(dim=(1, 2), keepdim=True) + 1e-8)
    weights = (alpha * torch.relu(g)).sum(dim=(1, 2), keepdim=True)
    expected = torch.relu((weights * last).sum(0))
    got = ours(CamEngine(model, input_size=5), x, 0, "relu", "smoothgradcam++")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


# --- Guided Grad-CAM ---


def test_hand_computed_guided_gradcam():
    """y = w_c · mean(relu(W x + b)): Grad-CAM at the ReLU is relu(Σ_k w_ck A_k) / (h·w); guided backpropagation
    passes back relu(w_ck / (h·w)) where the ReLU was open, through W to the input."""
    model = Tiny().eval()
    x = image(5, 4)
    with torch.no_grad():
        z = model.conv(x)[0]
    w = model.fc.weight[1].detach()
    grad_cam = torch.relu((w.view(4, 1, 1) * torch.relu(z)).sum(0)) / 16
    guided = torch.relu(w / 16).view(4, 1, 1) * (z > 0)
    input_gradient = torch.einsum("kc,khw->chw", model.conv.weight[:, :, 0, 0].detach(), guided)
    expected = (grad_cam * input_gradient).abs().sum(0)
    got = ours(CamEngine(model, input_size=4), x, 1, "relu", "guided-gradcam")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


def test_guided_relus_last_only_for_the_methods_own_pass(resnet18):
    """A batch that mixes Guided Grad-CAM with Grad-CAM and Smooth Grad-CAM++ gives each the map it gives alone,
    and leaves no hook on any ReLU."""
    engine = CamEngine(resnet18, input_size=64)
    x = torch.cat([image(0, 64), image(1, 64), image(2, 64)])
    requests = [
        CamRequest(Classes([3, 4]), "layer4", "guided-gradcam"),
        CamRequest(Classes([5]), "layer3", "gradcam"),
        CamRequest(Classes([6]), "layer4", "smoothgradcam++"),
    ]
    together = engine(x, requests)
    for n, request in enumerate(requests):
        alone = engine(x[n : n + 1], [request])
        torch.testing.assert_close(together.maps[n], alone.maps[0], rtol=1e-4, atol=1e-6)
    assert together.maps[0].shape == (2, 64, 64) and together.targets[0] == [3, 4]
    relus = [m for m in resnet18.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m._forward_pre_hooks or m._backward_hooks for m in relus)
    assert all(p.grad is None for p in resnet18.parameters())


# --- LeGrad ---


def tiny_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32,
                                  num_classes=5).eval()  # fmt: skip
        nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: every score would be flat
    return model


def test_hand_computed_legrad_on_the_last_block():
    """The last block recomputed by hand with its attention probabilities P as the leaf: s = heads(ln(mean of the
    block's tokens)); the map is relu(∂s_c/∂P) averaged over heads and queries, the class token's key dropped."""
    model = tiny_vit()
    x = image(7, 32)
    block = model.encoder.layers.encoder_layer_2
    tokens = []
    hook = block.register_forward_pre_hook(lambda module, inputs: tokens.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    attention, heads, embed = block.self_attention, 2, 16
    h = block.ln_1(tokens[0])
    q, k, v = torch.nn.functional.linear(h, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    split = lambda t: t.reshape(1, 17, heads, embed // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    probabilities = torch.softmax(q @ k.transpose(-2, -1) / (embed // heads) ** 0.5, dim=-1).detach().requires_grad_()
    mixed = attention.out_proj((probabilities @ v).transpose(1, 2).reshape(1, 17, embed))
    y = tokens[0] + mixed
    y = y + block.mlp(block.ln_2(y))
    score = model.heads(model.encoder.ln(y.mean(dim=1)))[0, 4]
    (gradient,) = torch.autograd.grad(score, probabilities)
    expected = gradient.relu().mean(dim=(1, 2))[0, 1:].reshape(4, 4)
    got = ours(CamEngine(model, input_size=32), x, 4, "encoder.layers.encoder_layer_2", "legrad")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_legrad_applies_only_to_attention_blocks(resnet18):
    from camserve.cam.methods.attention import legrad_applies

    assert "this model has no such head" in legrad_applies(CamEngine(resnet18, input_size=64), "layer4")
    vit = CamEngine(tiny_vit(), input_size=32)
    assert legrad_applies(vit, "encoder.layers.encoder_layer_0.mlp") is None  # its block: blocks 0 to 2
    assert "is not in such a block" in legrad_applies(vit, "conv_proj")


# --- Parity: each method against its reference, at two layers ---


def torchcam_cam(peer, x, target, layer):
    from torchcam.methods import CAM

    with CAM(peer, layer, "fc", input_shape=tuple(x.shape[1:])) as extractor, torch.no_grad():
        peer(x)
        return extractor(target, normalized=False)[0][0].relu()  # torchcam leaves CAM's ReLU out


def torchcam_seeded(kind: str):
    """A torchcam method whose noise (if any) comes from the global generator: seeded as ours is."""

    def reference(peer, x, target, layer):
        import torchcam.methods

        with getattr(torchcam.methods, kind)(peer, layer, input_shape=tuple(x.shape[1:])) as extractor:
            with torch.no_grad() if kind != "SmoothGradCAMpp" else contextlib.nullcontext():
                peer(x)
            torch.manual_seed(backprop.NOISE_SEED if kind == "SmoothGradCAMpp" else perturbation.NOISE_SEED)
            return extractor(target, normalized=False)[0][0]

    return reference


def captum_guided_gradcam(peer, x, target, layer):
    from captum.attr import GuidedGradCam

    attribution = GuidedGradCam(peer, peer.get_submodule(layer)).attribute(
        x.clone().requires_grad_(True), target=target, interpolate_mode="bilinear"
    )
    return attribution.detach().abs().sum(1)[0]  # as Captum's visualisation draws it: |attribution|, summed


def torchcam_legrad(peer, x, target, layer):
    from torchcam.methods import LeGrad

    first = int(re.search(r"encoder_layer_(\d+)", layer).group(1))
    blocks = [f"encoder.layers.encoder_layer_{n}" for n in range(first, 3)]
    with LeGrad(peer, blocks) as extractor:
        peer(x)
        return extractor(target, normalized=False)[0][0]


PARITY = {
    # method: (model, its input side, engine settings, two layers, the reference)
    "cam": ("resnet18", 128, {}, ("layer4", "layer4.1"), torchcam_cam),
    "sscam": ("small_cnn", 32, {"scorecam_channels": None}, ("4", "1"), torchcam_seeded("SSCAM")),
    "iscam": ("small_cnn", 32, {"scorecam_channels": None}, ("4", "1"), torchcam_seeded("ISCAM")),
    "smoothgradcam++": ("resnet18", 128, {}, ("layer4", "layer3"), torchcam_seeded("SmoothGradCAMpp")),
    "guided-gradcam": ("resnet18", 128, {}, ("layer4", "layer3"), captum_guided_gradcam),
    # LeGrad reads the blocks from the layer's to the last: blocks 1 and 2, then block 2 alone.
    "legrad": ("tiny_vit", 32, {}, ("encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_2.ln_1"),
               torchcam_legrad),
}  # fmt: skip


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("method", list(PARITY))
def test_matches_its_reference_implementation(resnet18, method, index):
    name, side, settings, layers, reference_of = PARITY[method]
    model = {"resnet18": lambda: resnet18, "small_cnn": small_cnn, "tiny_vit": tiny_vit}[name]()
    engine, peer = CamEngine(model, input_size=side, **settings), copy.deepcopy(model)
    layer = layers[index]
    mine, reference = [], []
    for seed, target in enumerate((3, 1)):
        x = image(seed, side)
        mine.append(ours(engine, x, target, layer, method))
        reference.append(reference_of(peer, x, target, layer))
    compare(mine, reference, side, f"{method} at {layer}")
