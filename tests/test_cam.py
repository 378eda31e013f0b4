"""The CAM engine: hand-computed values on tiny nets, the split forward, and parity with pytorch-grad-cam."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from camserve.cam import (
    METHODS,
    CamEngine,
    CamRequest,
    Classes,
    Family,
    LayerNotFoundError,
    TopPredicted,
    default_layer,
    describe_layers,
    normalize_map,
    to_grid,
)
from camserve.cam.layers import (
    Layout,
)
from camserve.cam.methods.gradient import finer_seeds
from camtools.gradcam import GradCAM
from tests.conftest import ROOT
from tests.helpers import assert_matches_reference, oriented, spatial_layers

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
    cam = GradCAM(model, "features")
    cam.engine.layers(images)  # the engine's one probe of the layers, once in its life
    model.forward_calls = 0
    out = cam(images, targets=[[0, 1], [1], None])
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
    for a, b in zip(expected.maps, inside.maps, strict=True):
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
        with torch.no_grad():
            resnet50(image)
    finally:
        hook.remove()
    out = GradCAM(resnet50, "layer4.2.bn3")(image, targets=[[5]])
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
    targets = [281, 5]  # classes whose maps are not flat on these seeded weights (the parity guard checks)
    peer_model = copy.deepcopy(resnet50).requires_grad_(True)  # the peer backpropagates through every parameter
    reference = ReferenceGradCAM(model=peer_model, target_layers=[peer_model.get_submodule(layer)])(
        input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets]
    )
    out = GradCAM(resnet50, layer)(images, targets=[[t] for t in targets])
    ours = np.stack([normalize_map(m, (224, 224))[0].numpy() for m in out.maps])
    assert_matches_reference(ours, reference)
    assert all(p.grad is None for p in resnet50.parameters())


def test_batch_equals_images_one_by_one(resnet50):
    torch.manual_seed(2)
    images = torch.randn(3, 3, 224, 224)
    out = GradCAM(resnet50, "layer4")(images, targets=[[281], [1, 2], None])
    for n in range(3):
        alone = GradCAM(resnet50, "layer4")(images[n : n + 1], targets=[out.targets[n]])
        torch.testing.assert_close(out.maps[n], alone.maps[0], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(out.logits[n], alone.logits[0], atol=1e-4, rtol=1e-4)


# --- The method family: hand-computed values, the reference implementation, invariants ---

SQUARE_CLASS0 = 2.5 * X[0, 0]  # Grad-CAM of TinySquareHead, class 0 (above)


def explain_one(model, method: str, cls: int, layer: str = "features", **engine_args) -> torch.Tensor:
    return CamEngine(model, **engine_args)(X, [CamRequest(targets=Classes([cls]), layer=layer, method=method)]).maps[0][
        0
    ]


def test_hand_computed_every_gradient_method():
    x = X[0, 0]
    # TinySquareHead, class 0: G^1 = A^1 = x, G^2 = 0.
    square = TinySquareHead()
    w1 = sum(v / (2 + 10 * v) for v in (1.0, 2.0, 3.0, 4.0))  # Σ relu(g)·g²/(2g² + ΣA·g³) with g = x, ΣA = 10
    torch.testing.assert_close(explain_one(square, "gradcam++", 0), w1 * x)
    torch.testing.assert_close(explain_one(square, "xgradcam", 0), 3.0 * x)  # w_1 = Σx²/Σx = 30/10
    torch.testing.assert_close(explain_one(square, "hirescam", 0), x * x)  # Σ_k g⊙A = x⊙x
    # TinyLinearHead, class 1: G^1 = 3/4, G^2 = -1/4 everywhere; A^1 = x, A^2 = -x.
    linear = TinyLinearHead()
    torch.testing.assert_close(explain_one(linear, "hirescam", 1), x)  # 3/4·x + (-1/4)(-x)
    torch.testing.assert_close(explain_one(linear, "layercam", 1), 0.75 * x)  # relu(3/4)·x + relu(-1/4)·(-x)
    torch.testing.assert_close(explain_one(linear, "gradcam", 1), x)
    # Element-wise: relu(3/4 · x) + relu(-1/4 · -x) = 3/4 x + 1/4 x = x (x > 0); on the square head relu(x·x) = x².
    torch.testing.assert_close(explain_one(linear, "gradcam-elementwise", 1), x)
    torch.testing.assert_close(explain_one(square, "gradcam-elementwise", 0), x * x)
    # EigenGrad-CAM on the square head: g ⊙ A = (x², 0) per position; centred over positions, its first component
    # is x² − mean(x²) in the direction of channel 1, signed to correlate with the mean over channels; then ReLU.
    expected = torch.relu(x * x - (x * x).mean()).double()
    torch.testing.assert_close(explain_one(square, "eigengradcam", 0).double(), expected, atol=1e-5, rtol=1e-4)


def test_hand_computed_randomcam_uses_seeded_uniform_weights():
    x = X[0, 0]
    weights = torch.rand(2, generator=torch.Generator().manual_seed(0)) * 2 - 1  # U(-1, 1), seed 0
    expected = torch.relu(weights[0] * x + weights[1] * -x)  # TinyLinearHead's channels: x and -x
    torch.testing.assert_close(explain_one(TinyLinearHead(), "randomcam", 0), expected)
    assert torch.equal(explain_one(TinyLinearHead(), "randomcam", 1), expected)  # the same map for every class


class TinyTwoScaleFeatures(TinyLinearHead):
    """features: A^1 = x, A^2 = 2x (for EigenCAM, whose answer needs channels that do not cancel)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))


def test_hand_computed_eigencam():
    # X rows (v, 2v) centred: (v - 2.5)(1, 2); v₁ = (1, 2)/√5; projection = √5 (v - 2.5): symmetric, Σ p³ = 0, kept +.
    expected = torch.relu(5**0.5 * (X[0, 0] - 2.5))
    torch.testing.assert_close(explain_one(TinyTwoScaleFeatures(), "eigencam", 0), expected)


@pytest.mark.parametrize(("values", "standing_out"), [((1.0, 1.0, 1.0, 5.0), 3), ((5.0, 5.0, 5.0, 1.0), 3)])
def test_eigencam_shows_the_position_that_stands_out(values, standing_out):
    """The component's sign, by hand: rows (v, 2v) centred give the projection ±√5 (v − v̄). With v = (1, 1, 1, 5) the
    tail (+3) is the fourth position, so the map is √5·relu(v − 2): the peak where the layer fires most. With
    v = (5, 5, 5, 1) the tail is again the fourth position, now fired least: −√5 (v − 4) gives it +3√5, and the
    three alike positions 0. Correlating with the channel mean would show those three instead."""
    x = torch.tensor(values).view(1, 1, 2, 2)
    model = TinyTwoScaleFeatures()
    heat = CamEngine(model)(x, [CamRequest(targets=Classes([0]), layer="features", method="eigencam")]).maps[0][0]
    v = x[0, 0]
    centred = v - v.mean()
    expected = torch.relu(5**0.5 * centred * (1 if centred.pow(3).sum() > 0 else -1))
    torch.testing.assert_close(heat, expected)
    assert int(heat.argmax()) == standing_out and heat.flatten()[:3].abs().max() == 0


def test_hand_computed_scorecam():
    # Linear head, class 1: y_1(z) = 4·mean(z). Masks: norm(x) = (x-1)/3 and norm(-x) = (4-x)/3.
    x = X[0, 0]
    scores = torch.tensor([4 * (x * (x - 1) / 3).mean(), 4 * (x * (4 - x) / 3).mean()])
    w = torch.softmax(scores, dim=0)
    torch.testing.assert_close(explain_one(TinyLinearHead(), "scorecam", 1), torch.relu(w[0] * x - w[1] * x))


def test_scorecam_channel_cap_scores_the_most_active_channels():
    model = TinyTwoScaleFeatures()
    capped = explain_one(model, "scorecam", 1, scorecam_channels=1)  # keeps A^2 = 2x alone: weight 1
    torch.testing.assert_close(capped, 2 * X[0, 0])


@pytest.mark.parametrize("method", sorted(m.name for m in METHODS.values() if m.family is Family.GRADIENT))
def test_all_zero_gradients_give_zero_maps_for_every_method(method):
    model = TinyLinearHead()
    with torch.no_grad():
        model.head.weight.zero_()
    maps = explain_one(model, method, 0)
    assert (maps == 0).all() and torch.isfinite(normalize_map(maps[None], (8, 8))).all()


def test_gradcam_equals_cam_at_resnet50_layer4(resnet50):
    # y_c = w_c · avgpool(A) + b_c, so ∂y_c/∂A_k,ij = w_ck / 49, and Grad-CAM = ReLU(Σ_k w_ck A_k) / 49:
    # the original CAM.
    torch.manual_seed(5)
    image = torch.randn(1, 3, 224, 224)
    captured = []
    hook = resnet50.layer4.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        with torch.no_grad():
            resnet50(image)
    finally:
        hook.remove()
    cam = torch.relu(torch.einsum("k,khw->hw", resnet50.fc.weight[281], captured[0][0])) / 49
    torch.testing.assert_close(GradCAM(resnet50, "layer4")(image, [[281]]).maps[0][0], cam, atol=1e-6, rtol=1e-4)


def reference_maps(peer_model, method: str, layer: str, images, classes) -> np.ndarray:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    kind = getattr(pgc, METHODS[method].reference)
    targets = [ClassifierOutputTarget(c) for c in classes]
    return kind(model=peer_model, target_layers=[peer_model.get_submodule(layer)])(input_tensor=images, targets=targets)


@pytest.fixture(scope="module")
def peer_resnet50(resnet50):
    return copy.deepcopy(resnet50).requires_grad_(True)  # the peer backpropagates through every parameter


@pytest.mark.parametrize("layer", ["layer4", "layer3", "layer2.1.conv2"])
@pytest.mark.parametrize(
    "method",
    [
        "gradcam++",
        "xgradcam",
        "hirescam",
        "layercam",
        "eigencam",
        "gradcam-elementwise",
        "eigengradcam",
        "randomcam",
        "fem",
        "kpcacam",
    ],  # fmt: skip
)
def test_methods_match_pytorch_grad_cam(resnet50, peer_resnet50, method, layer, monkeypatch):
    if method == "fem" and layer == "layer2.1.conv2":
        layer = "layer2.1"  # FEM of this conv's signed output is all zero on these weights: a trivial match
    torch.manual_seed(6)
    images = torch.randn(2, 3, 224, 224)
    classes = [281, 5]
    out = CamEngine(resnet50)(images, [CamRequest(targets=Classes([c]), layer=layer, method=method) for c in classes])
    ours = np.stack([normalize_map(m, (224, 224))[0].numpy() for m in out.maps])
    if method == "eigencam":
        # The SVD leaves the component's sign open; ours puts its long tail on the positive side (see eigen_cam).
        # Compare with the reference computed with that same sign.
        from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

        activations = []
        hook = resnet50.get_submodule(layer).register_forward_hook(lambda m, i, o: activations.append(o.detach()))
        try:
            with torch.no_grad():
                resnet50(images)
        finally:
            hook.remove()
        projection = torch.from_numpy(oriented(get_2d_projection(activations[0].numpy().copy())))
        reference = normalize_map(torch.relu(projection), (224, 224)).numpy()
    elif method == "eigengradcam":
        # The same sign rule, on g ⊙ A recorded by pytorch-grad-cam's own hooks.
        from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

        recorder = ActivationsAndGradients(peer_resnet50, [peer_resnet50.get_submodule(layer)], None, False)
        logits = recorder(images)
        peer_resnet50.zero_grad()
        sum(ClassifierOutputTarget(c)(row) for c, row in zip(classes, logits, strict=True)).backward()
        product = (recorder.gradients[0] * recorder.activations[0]).detach().numpy()
        recorder.release()
        projection = torch.from_numpy(oriented(get_2d_projection(product.copy())))
        reference = normalize_map(torch.relu(projection), (224, 224)).numpy()
    else:
        if method == "randomcam":  # the peer's weights are np.random's: give it ours, U(-1, 1) from seed 0

            def uniform(low, high, size):  # (images, channels)
                weights = torch.rand(size[1], generator=torch.Generator().manual_seed(0)) * 2 - 1
                return np.tile(weights.numpy(), (size[0], 1))

            monkeypatch.setattr(np.random, "uniform", uniform)
        reference = reference_maps(peer_resnet50, method, layer, images, classes)
    assert_matches_reference(ours, reference, f"{method} at {layer}")


@pytest.mark.slow
def test_scorecam_matches_pytorch_grad_cam_with_every_channel(resnet50, peer_resnet50):
    torch.manual_seed(7)
    image = torch.randn(1, 3, 224, 224)
    layer = "layer1.0.conv1"  # 64 channels: 64 forward passes on each side
    engine = CamEngine(resnet50, scorecam_channels=None)
    out = engine(image, [CamRequest(targets=Classes([281]), layer=layer, method="scorecam")])
    ours = normalize_map(out.maps[0], (224, 224)).numpy()
    assert_matches_reference(ours, reference_maps(peer_resnet50, "scorecam", layer, image, [281]), "scorecam")


def test_mixed_methods_layers_and_targets_in_one_batch(resnet50):
    torch.manual_seed(8)
    images = torch.randn(4, 3, 96, 96)
    requests = [
        CamRequest(targets=Classes([281, 3]), layer="layer4", method="gradcam"),
        CamRequest(targets=TopPredicted(3), layer="layer3", method="layercam"),
        CamRequest(targets=Classes([5]), layer="layer2.1.conv2", method="gradcam++"),
        CamRequest(layer="layer4", method="eigencam"),
    ]
    engine = CamEngine(resnet50)
    engine.layers(images)  # the engine's one probe of the layers, before counting
    calls = []
    hook = resnet50.register_forward_hook(lambda m, i, o: calls.append(1))
    grad_enabled: dict[str, bool] = {}
    probes = [
        resnet50.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: grad_enabled.__setitem__(name, torch.is_grad_enabled())
        )
        for name in ("layer1", "layer2.0", "layer3", "fc")
    ]
    try:
        out = engine(images, requests)
    finally:
        hook.remove()
        for probe in probes:
            probe.remove()
    assert len(calls) == 1  # one forward pass for the whole batch
    # The graph starts at the earliest requested layer (layer2.1.conv2): nothing before it records gradients.
    assert grad_enabled == {"layer1": False, "layer2.0": False, "layer3": True, "fc": True}
    ranked = out.logits[1].topk(3).indices.tolist()
    assert out.targets == [[281, 3], ranked, [5], [int(out.logits[3].argmax())]]
    assert [tuple(m.shape) for m in out.maps] == [(2, 3, 3), (3, 6, 6), (1, 12, 12), (1, 3, 3)]
    for n, request in enumerate(requests):
        alone = CamEngine(resnet50)(images[n : n + 1], [request])
        assert alone.targets[0] == out.targets[n]
        # float32 convolutions differ slightly between batch sizes; Grad-CAM++'s g³ terms amplify that a little.
        difference = (normalize_map(out.maps[n]) - normalize_map(alone.maps[0])).abs().max()
        assert difference < 1e-3, (request, float(difference))
    assert all(p.grad is None for p in resnet50.parameters())


def test_spatial_layers_leave_out_shared_and_flat_modules(resnet50):
    layers = spatial_layers(resnet50)
    assert {"conv1", "layer1", "layer2", "layer3", "layer4", "layer4.2", "layer3.5.conv2"} <= set(layers)
    assert not {"fc", "avgpool", "layer4.2.relu"} & set(layers)


def test_many_targets_on_one_image_repeat_only_the_network_after_the_layer(resnet50, monkeypatch):
    """One image's five targets cost four extra rows after layer4 (one per extra target), not a wider gradient call
    for every image; the maps equal each image explained alone."""
    torch.manual_seed(3)
    images = torch.randn(4, 3, 64, 64)
    requests = [CamRequest(targets=Classes([1, 2, 3, 4, 5]), layer="layer4")] + [CamRequest(layer="layer4")] * 3
    engine = CamEngine(resnet50)
    engine.layers(images)  # the engine's one probe of the layers, before counting
    rows: dict[str, list[int]] = {"layer3": [], "fc": []}
    probes = [
        resnet50.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: rows[name].append(len(o)))
        for name in rows
    ]
    batched = []
    original = torch.autograd.grad
    monkeypatch.setattr(
        torch.autograd, "grad", lambda *a, **k: batched.append(k.get("is_grads_batched", False)) or original(*a, **k)
    )
    try:
        out = engine(images, requests)
    finally:
        monkeypatch.undo()
        for probe in probes:
            probe.remove()
    assert rows == {"layer3": [4], "fc": [8]}  # the prefix runs once per image; the head once per pair
    assert batched == [False]  # one plain gradient call, no vmap over target slots
    assert out.logits.shape == (4, 1000) and [len(t) for t in out.targets] == [5, 1, 1, 1]
    for n, request in enumerate(requests):
        alone = CamEngine(resnet50)(images[n : n + 1], [request])
        torch.testing.assert_close(out.logits[n], alone.logits[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(normalize_map(out.maps[n]), normalize_map(alone.maps[0]), atol=1e-4, rtol=1e-4)


def test_a_layer_inside_a_residual_block_falls_back_to_gradient_slots(resnet50):
    """Repeating rows inside a bottleneck would meet its unrepeated shortcut: the engine falls back, once."""
    torch.manual_seed(4)
    images = torch.randn(2, 3, 64, 64)
    requests = [CamRequest(targets=Classes([1, 2, 3]), layer="layer3.1.conv2"), CamRequest(layer="layer3.1.conv2")]
    engine = CamEngine(resnet50)
    out = engine(images, requests)
    assert engine._unexpandable == {frozenset({"layer3.1.conv2"})}
    for n, request in enumerate(requests):
        alone = engine(images[n : n + 1], [request])
        torch.testing.assert_close(normalize_map(out.maps[n]), normalize_map(alone.maps[0]), atol=1e-4, rtol=1e-4)


def test_class_independent_methods_run_once_per_image(monkeypatch):
    """ScoreCAM's masked passes and EigenCAM's decomposition do not depend on the class: three targets cost what
    one does."""
    from dataclasses import replace as replace_record

    from camserve.cam.methods import registry

    model = TinySquareHead()
    eigen_rows = []
    record = registry.METHODS["eigencam"]
    counting = replace_record(record, combine=lambda a: eigen_rows.append(len(a)) or record.combine(a))
    monkeypatch.setitem(registry.METHODS, "eigencam", counting)
    engine = CamEngine(model, scorecam_channels=None, scorecam_batch=1)
    images = torch.cat([X, 2 * X])
    out = engine(images, [CamRequest(targets=Classes([0, 1, 0]), method="eigencam", layer="features")] * 2)
    assert eigen_rows == [2]
    assert all(torch.equal(maps[0], maps[1]) for maps in out.maps)
    model.forward_calls = 0
    out = engine(images, [CamRequest(targets=Classes([0, 1, 1]), method="scorecam", layer="features")] * 2)
    assert model.forward_calls == 1 + 2 * 2  # the batch, then 2 channels per image, once each
    for n in range(2):
        for t, c in enumerate([0, 1, 1]):
            alone = CamEngine(model, scorecam_channels=None)(
                images[n : n + 1], [CamRequest(targets=Classes([c]), method="scorecam", layer="features")]
            )
            torch.testing.assert_close(out.maps[n][t], alone.maps[0][0])


# --- Families: the default layer found from the model, token layouts, and parity with pytorch-grad-cam ---

FAMILY_DEFAULT_LAYERS = {
    "resnet50": ("layer4", "nchw"),
    "convnext_tiny": ("features.7", "nchw"),
    "efficientnet_b0": ("features.8", "nchw"),
    "mobilenet_v3_small": ("features.12", "nchw"),
    "densenet121": ("features.norm5", "nchw"),
    "regnet_y_400mf": ("trunk_output.block4", "nchw"),
    "vgg11": ("features.20", "nchw"),
    "vit_b_16": ("encoder.layers.encoder_layer_11.ln_1", "cls_tokens"),
    "swin_t": ("features.7.1.norm1", "nhwc"),
}


@pytest.mark.parametrize("arch", FAMILY_DEFAULT_LAYERS)
def test_the_default_layer_is_found_from_the_model(arch):
    import torchvision

    model = torchvision.models.get_model(arch).eval()
    layers = describe_layers(model, 224)
    layer, layout = FAMILY_DEFAULT_LAYERS[arch]
    assert default_layer(model, 224, layers) == layer
    assert layers[layer].layout == layout


def test_token_layouts_become_grids():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # class token + a 2x2 grid, 3 channels
    grid = to_grid(tokens, "cls_tokens")
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[1, 2, 1, 0], tokens[1, 1 + 2 * 1 + 0, 2])  # row 1, column 0, channel 2
    nhwc = torch.randn(2, 4, 4, 6)
    assert torch.equal(to_grid(nhwc, "nhwc"), nhwc.permute(0, 3, 1, 2))
    assert torch.equal(to_grid(tokens[:, 1:], "tokens"), grid)
    registers = torch.cat([tokens[:, :1], tokens[:, :1], tokens[:, :1], tokens[:, 1:]], dim=1)  # 3 prefix tokens
    assert torch.equal(to_grid(registers, "prefix_tokens:3"), grid)


def test_a_layout_is_a_typed_value_checked_once():
    assert Layout("prefix_tokens:4").prefix == 4 and Layout("cls_tokens").prefix == 1 and Layout("nchw").prefix is None
    assert Layout("fpn").pyramid and not Layout("nhwc").pyramid
    assert Layout("tokens") == "tokens"  # the spec's string, as it is stored
    for wrong in ("nwhc", "prefix_tokens:", "prefix_tokens:x", "FPN"):
        with pytest.raises(ValueError, match="layout must be one of"):
            Layout(wrong)


def vit_reshape(tensor: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's documented ViT reshape transform: drop the class token, tokens to a 14x14 grid."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), 14, 14, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def swin_reshape(tensor: torch.Tensor) -> torch.Tensor:
    """torchvision's Swin keeps NHWC maps: pytorch-grad-cam needs them NCHW."""
    return tensor.permute(0, 3, 1, 2)


PARITY_MODELS = [*FAMILY_DEFAULT_LAYERS, "tiny_net"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", PARITY_MODELS)
def test_gradcam_matches_pytorch_grad_cam_at_each_familys_default_layer(arch, monkeypatch):
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camtools.models import prepare_model

    if arch == "tiny_net":  # a --model-file network of the user's own
        prepared = prepare_model(model_file=ROOT / "tests" / "models" / "tiny_net.py", weights="random", seed=0)
    else:
        prepared = prepare_model(arch=arch, weights="random", seed=0)
    model, spec = prepared.model, prepared.spec
    torch.manual_seed(7)
    images = torch.randn(2, 3, spec.input_size, spec.input_size)
    targets = [1, 2]
    reshape = {"cls_tokens": vit_reshape, "nhwc": swin_reshape}.get(spec.layers[spec.default_layer])
    if arch == "densenet121":
        # DenseNet's forward applies F.relu(inplace=True) to features.norm5's output. pytorch-grad-cam keeps that
        # very tensor, so the ReLU rewrites its saved activations (ours are a clone: the module's true output).
        # With that ReLU out of place, both compute Grad-CAM of the same activation.
        relu = torch.nn.functional.relu
        monkeypatch.setattr(torch.nn.functional, "relu", lambda x, inplace=False: relu(x))
    peer_model = copy.deepcopy(model).requires_grad_(True)
    reference = ReferenceGradCAM(
        model=peer_model, target_layers=[peer_model.get_submodule(spec.default_layer)], reshape_transform=reshape
    )(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets])
    out = CamEngine(model, input_size=spec.input_size)(images, [CamRequest(targets=Classes([t])) for t in targets])
    ours = np.stack([normalize_map(m, (spec.input_size,) * 2)[0].numpy() for m in out.maps])
    assert_matches_reference(ours, reference, arch)


def test_hand_computed_fem():
    # TinyLinearHead's channels are x and -x. x: fifteen 1s and one 10: mean 1.5625, population std 2.1786, so only
    # the 10 is above mean + 2 std: w_1 = 1/16. -x: nothing is above its threshold 2.79: w_2 = 0. map = x / 16.
    x = torch.ones(1, 1, 4, 4)
    x[0, 0, 1, 2] = 10.0
    out = CamEngine(TinyLinearHead())(x, [CamRequest(targets=Classes([0]), layer="features", method="fem")])
    torch.testing.assert_close(out.maps[0][0], x[0, 0] / 16)


def test_hand_computed_shapleycam_subtracts_half_the_hessian_vector_product():
    # TinySquareHead, class 0: y_0 = ½ Σ (A^1)², so g^1 = A^1 = x, H·A = A^1 = x on channel 1, g^2 = 0.
    # weights: mean(g − ½ H·A) = mean(x/2) = 1.25 on channel 1, 0 on channel 2: map = 1.25·x (Grad-CAM gives 2.5·x).
    x = X[0, 0]
    torch.testing.assert_close(explain_one(TinySquareHead(), "shapleycam", 0), 1.25 * x)
    torch.testing.assert_close(explain_one(TinySquareHead(), "gradcam", 0), 2.5 * x)
    # TinyLinearHead is linear after the layer: no curvature, ShapleyCAM is Grad-CAM.
    torch.testing.assert_close(
        explain_one(TinyLinearHead(), "shapleycam", 1), explain_one(TinyLinearHead(), "gradcam", 1)
    )


def test_hand_computed_finercam_contrasts_the_nearest_classes():
    # TinyLinearHead on X: logits (-2.5, 10), W = [[1, 2], [3, -1]]. Class 1's only look-alike is class 0: the target is
    # y_1 − y_0, whose gradient per position is (W_1 − W_0)/4 = (2, -3)/4 on (A^1, A^2).
    # Grad-CAM of it: x/2 + (-3/4)·(-x) = 1.25·x, where plain Grad-CAM of y_1 gives x.
    torch.testing.assert_close(explain_one(TinyLinearHead(), "finercam", 1), 1.25 * X[0, 0])
    seeds = finer_seeds(torch.tensor([[1.0, 2.0, 2.5, 9.0, 1.9]]), torch.tensor([2]))
    # Look-alikes of class 2 (2.5): 2.0, 1.9 and 1.0 (classes 1, 4, 0); class 3 is not one. ∂/∂y_2 = 1 exactly.
    assert seeds[0, 3] == 0.0 and seeds[0, 2] == pytest.approx(1.0)


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_finercam_and_shapleycam_match_pytorch_grad_cam(resnet50, peer_resnet50, layer):
    from pytorch_grad_cam import FinerCAM, ShapleyCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(9)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        classes = resnet50(images).argmax(dim=1).tolist()  # pytorch-grad-cam's Finer-CAM is NaN far from the top
    target = peer_resnet50.get_submodule(layer)
    engine = CamEngine(resnet50)
    for method in ("finercam", "shapleycam"):
        out = engine(images, [CamRequest(targets=Classes([c]), layer=layer, method=method) for c in classes])
        ours = np.stack([normalize_map(m, (224, 224))[0].numpy() for m in out.maps])
        if method == "finercam":
            finer = FinerCAM(peer_resnet50, [target])
            reference = np.concatenate([finer(images[n : n + 1], target_idx=c) for n, c in enumerate(classes)])
        else:
            reference = ShapleyCAM(peer_resnet50, [target])(images, [ClassifierOutputTarget(c) for c in classes])
        assert_matches_reference(ours, reference, f"{method} at {layer}")


@pytest.mark.slow
def test_shapleycam_matches_pytorch_grad_cam_where_the_network_is_curved():
    """ConvNeXt's GELU and LayerNorm after features.6 make the Hessian non-zero: ShapleyCAM differs from Grad-CAM,
    and still matches the reference; also with several targets per image (the per-slot second derivative)."""
    from pytorch_grad_cam import ShapleyCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camtools.models import prepare_model

    model = prepare_model(arch="convnext_tiny", weights="random", seed=0).model
    torch.manual_seed(10)
    images = torch.randn(2, 3, 224, 224)
    layer = "features.6"
    engine = CamEngine(model)
    out = engine(images, [CamRequest(targets=Classes([1, 2]), layer=layer, method="shapleycam")] * 2)
    gradcam = engine(images, [CamRequest(targets=Classes([1, 2]), layer=layer, method="gradcam")] * 2)
    ours = np.stack([normalize_map(m, (224, 224)).numpy() for m in out.maps])
    difference = max(float((a - b).abs().max()) for a, b in zip(out.maps, gradcam.maps, strict=True))
    assert difference > 0.1 * max(float(b.abs().max()) for b in gradcam.maps)  # the curvature term is not negligible
    peer = copy.deepcopy(model).requires_grad_(True)
    for slot, c in enumerate([1, 2]):
        reference = ShapleyCAM(peer, [peer.get_submodule(layer)])(images, [ClassifierOutputTarget(c)] * 2)
        assert_matches_reference(ours[:, slot], reference, f"shapleycam at convnext_tiny features.6, slot {slot}")


@pytest.mark.slow
def test_shapleycam_runs_through_a_vit_attention_kernel():
    """Fused attention has no second derivative on the CPU; the engine runs ShapleyCAM's pass on the math kernel."""
    from camtools.models import prepare_model

    prepared = prepare_model(arch="vit_b_16", weights="random", seed=0)
    out = CamEngine(prepared.model)(
        torch.randn(1, 3, 224, 224), [CamRequest(targets=Classes([3]), method="shapleycam")]
    )
    assert out.maps[0].shape == (1, 14, 14) and torch.isfinite(out.maps[0]).all() and out.maps[0].max() > 0


def test_hand_computed_ablationcam():
    # TinyLinearHead, class 1: y_1 = 3·mean(A^1) − mean(A^2) = 10 on X. The layer's minimum is -4, so ablating
    # sets a channel to -4 − 1e7 everywhere: without A^1, y_1 = 3(-4 − 1e7) + 2.5; without A^2, y_1 = 7.5 + 4 + 1e7.
    # w_k = (10 − y_1 without k) / 10, map = w_1·x + w_2·(−x) = x·(w_1 − w_2).
    w1 = (10 - (3 * (-4 - 1e7) + 2.5)) / 10
    w2 = (10 - (7.5 + 4 + 1e7)) / 10
    torch.testing.assert_close(explain_one(TinyLinearHead(), "ablationcam", 1), X[0, 0] * (w1 - w2), rtol=1e-5, atol=0)


@pytest.mark.parametrize("layer", ["features.4", "features.2"])
def test_ablationcam_matches_pytorch_grad_cam_with_every_channel(layer):
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camserve.model import model_class_from_file

    torch.manual_seed(11)
    model = model_class_from_file(ROOT / "tests" / "models" / "tiny_net.py")().eval()
    images = torch.randn(2, 3, 64, 64)
    classes = [0, 2]
    engine = CamEngine(model.requires_grad_(False), scorecam_channels=None, input_size=64)
    out = engine(images, [CamRequest(targets=Classes([c]), layer=layer, method="ablationcam") for c in classes])
    ours = np.stack([normalize_map(m, (64, 64))[0].numpy() for m in out.maps])
    peer = copy.deepcopy(model).requires_grad_(True)
    reference = AblationCAM(peer, [peer.get_submodule(layer)])(images, [ClassifierOutputTarget(c) for c in classes])
    assert_matches_reference(ours, reference, f"ablationcam at {layer}")


# --- Smoothing: eigen_smooth and aug_smooth, as pytorch-grad-cam does them ---


@pytest.mark.parametrize("method", ["gradcam", "layercam", "hirescam"])
def test_eigen_smooth_matches_pytorch_grad_cam(resnet50, peer_resnet50, method, monkeypatch):
    import pytorch_grad_cam as pgc
    import pytorch_grad_cam.base_cam as base_cam
    import pytorch_grad_cam.hirescam as hirescam_module
    import pytorch_grad_cam.layer_cam as layercam_module
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    original = base_cam.get_2d_projection

    def signed(contributions):  # the SVD leaves the sign open: take ours (the long tail positive)
        return oriented(original(contributions)).astype(np.float32)

    for module in (base_cam, hirescam_module, layercam_module):
        monkeypatch.setattr(module, "get_2d_projection", signed, raising=False)
    torch.manual_seed(12)
    images = torch.randn(2, 3, 224, 224)
    classes = [281, 5]
    for layer in ("layer4", "layer3"):
        requests = [CamRequest(targets=Classes([c]), layer=layer, method=method, eigen_smooth=True) for c in classes]
        out = CamEngine(resnet50)(images, requests)
        ours = np.stack([normalize_map(m, (224, 224))[0].numpy() for m in out.maps])
        kind = {"gradcam": pgc.GradCAM, "layercam": pgc.LayerCAM, "hirescam": pgc.HiResCAM}[method]
        cam = kind(model=peer_resnet50, target_layers=[peer_resnet50.get_submodule(layer)])
        reference = cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in classes], eigen_smooth=True)
        assert_matches_reference(ours, reference, f"{method} eigen_smooth at {layer}")
        plain = CamEngine(resnet50)(images, [replace(r, eigen_smooth=False) for r in requests])
        assert not torch.allclose(plain.maps[0], out.maps[0])  # the option changes the map


def test_aug_smooth_matches_pytorch_grad_cam_and_costs_six_passes(resnet50, peer_resnet50):
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(13)
    images = torch.randn(2, 3, 224, 224)
    classes = [281, 5]
    engine = CamEngine(resnet50)
    requests = [CamRequest(targets=Classes([c]), layer="layer3", aug_smooth=True) for c in classes]
    out = engine(images, requests)
    ours = np.stack([m[0].numpy() for m in out.maps])  # already at the input's size: the mean of normalised maps
    cam = pgc.GradCAM(model=peer_resnet50, target_layers=[peer_resnet50.get_submodule("layer3")])
    reference = cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in classes], aug_smooth=True)
    assert ours.shape == reference.shape and reference.max() > 0.5
    assert_matches_reference(ours, reference, "gradcam aug_smooth at layer3")
    plain = engine(images, [replace(r, aug_smooth=False) for r in requests])
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-3, rtol=1e-3)  # the original image's logits
    assert engine.forward_passes(requests[0]) == 6 and engine.forward_passes(CamRequest(aug_smooth=True)) == 7
    # Without a class, the original image's top class is explained, whatever the copies predict.
    (top,) = engine(images[:1], [CamRequest(aug_smooth=True)]).targets
    assert top == [int(plain.logits[0].argmax())]


@pytest.mark.parametrize("layer", ["layer3", "layer2.1.conv2"])
def test_refinecam_matches_pytorch_grad_cam_over_the_layer_and_the_default_layer(resnet50, peer_resnet50, layer):
    from pytorch_grad_cam import RefineCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(14)
    images = torch.randn(2, 3, 224, 224)
    classes = [281, 5]
    engine = CamEngine(resnet50)
    out = engine(images, [CamRequest(targets=Classes([c]), layer=layer, method="refinecam") for c in classes])
    ours = np.stack([normalize_map(m, (224, 224))[0].numpy() for m in out.maps])
    layers = [peer_resnet50.get_submodule(name) for name in (layer, "layer4")]
    reference = RefineCAM(peer_resnet50, layers)(images, [ClassifierOutputTarget(c) for c in classes])
    assert_matches_reference(ours, reference, f"refinecam at {layer}")
    assert engine.forward_passes(CamRequest(method="refinecam")) == 2
    # A plain request beside it in the batch is unchanged.
    mixed = engine(
        images, [CamRequest(targets=Classes([281]), layer=layer, method="refinecam"), CamRequest(targets=Classes([7]))]
    )
    alone = engine(images[1:], [CamRequest(targets=Classes([7]))])
    torch.testing.assert_close(mixed.maps[1], alone.maps[0], atol=1e-5, rtol=1e-4)


def test_fullgrad_matches_pytorch_grad_cam(resnet50, peer_resnet50):
    from pytorch_grad_cam import FullGrad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(15)
    images = torch.randn(2, 3, 224, 224)
    engine = CamEngine(resnet50)
    out = engine(
        images,
        [CamRequest(targets=Classes([281, 3]), method="fullgrad"), CamRequest(targets=Classes([7]), method="fullgrad")],
    )
    reference = {
        c: FullGrad(peer_resnet50, [])(images, [ClassifierOutputTarget(c)] * 2) for c in (281, 3, 7)
    }  # the peer ignores target_layers: every bias layer is used
    for n, targets in enumerate(out.targets):
        for t, c in enumerate(targets):
            ours = normalize_map(out.maps[n][t : t + 1], (224, 224))[0].numpy()
            assert_matches_reference(ours, reference[c][n], f"fullgrad, image {n}, class {c}")
    assert all(p.grad is None for p in resnet50.parameters())
    # Beside other methods in one batch, each keeps its own answer.
    mixed = engine(images, [CamRequest(targets=Classes([7]), method="fullgrad"), CamRequest(targets=Classes([7]))])
    torch.testing.assert_close(mixed.maps[1], engine(images[1:], [CamRequest(targets=Classes([7]))]).maps[0])


@pytest.mark.parametrize("layer", ["features.4", "features.2"])
def test_sess_matches_pytorch_grad_cam(layer):
    from pytorch_grad_cam import SESS
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camserve.model import model_class_from_file

    torch.manual_seed(16)
    model = model_class_from_file(ROOT / "tests" / "models" / "tiny_net.py")().eval()
    images = torch.randn(2, 3, 64, 64)
    classes = [0, 2]
    engine = CamEngine(model.requires_grad_(False), input_size=64)
    out = engine(images, [CamRequest(targets=Classes([c]), layer=layer, method="sess") for c in classes])
    ours = np.stack([normalize_map(m, (64, 64))[0].numpy() for m in out.maps])
    peer = copy.deepcopy(model).requires_grad_(True)
    reference = SESS(peer, [peer.get_submodule(layer)])(images, [ClassifierOutputTarget(c) for c in classes])
    assert_matches_reference(ours, reference, f"sess at {layer}")
    assert engine.forward_passes(CamRequest(method="sess")) == 2 * 122 + 1


def test_scorecam_channels_is_a_positive_cap_or_none_for_every_channel():
    with pytest.raises(ValueError, match="scorecam_channels must be at least 1, or None for every channel"):
        CamEngine(TinyLinearHead(), scorecam_channels=0)
    every = explain_one(TinyTwoScaleFeatures(), "scorecam", 1, scorecam_channels=None)
    assert not torch.equal(every, explain_one(TinyTwoScaleFeatures(), "scorecam", 1, scorecam_channels=1))


def test_a_model_without_a_spatial_layer_says_so():
    from camserve.cam import NoSpatialLayerError

    with pytest.raises(NoSpatialLayerError, match="no layer that gives a spatial map"):
        default_layer(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)), image_size=4)
