"""The sanity check (``camserve.cam.sanity``): Spearman's rank correlation with the map of a copy randomised after
the layer. Checked against a hand computation, against the copy run whole, against Quantus's MPRT, on the trained
synthetic model, and through the service."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
import torchvision
from torch import nn

from camserve.cam import CamEngine, CamRequest, Classes, find_layer
from camserve.cam.sanity import Sanity, at_input, randomised_copy, rank_correlation, split_at
from camtools.synthetic import make_samples, to_batch


def figures(engine: CamEngine, images: torch.Tensor, requests: list[CamRequest], sanity: Sanity | None = None):
    sanity = sanity or Sanity(engine)
    output = engine(images, requests, keep=sanity.keep(requests))
    return output, sanity.figures(images, requests, output)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.resnet18(num_classes=10).eval().requires_grad_(False)


def test_rank_correlation_is_scipys_spearman_with_ties_and_nan_for_a_constant_map():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, (3, 50)).astype(float)  # many ties, as maps after ReLU have
    b = a + rng.normal(0, 1.5, a.shape)
    ours = rank_correlation(torch.tensor(a), torch.tensor(b)).numpy()
    expected = [scipy.stats.spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(ours, expected, atol=1e-12)
    assert torch.isnan(rank_correlation(torch.ones(1, 9), torch.arange(9.0)[None]))[0]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_gradcams_figure_against_a_hand_computation_on_a_tiny_net():
    torch.manual_seed(0)
    model = Tiny().eval().requires_grad_(False)
    x = torch.randn(1, 3, 6, 6)
    output, checked = figures(CamEngine(model, input_size=6), x, [CamRequest(Classes([2]), "features")])
    # By hand: ∂y_c/∂A_k,ij = w_ck / 36, so Grad-CAM = relu(Σ_k w_ck A_k) / 36; the copy's fc is nn.Linear's own
    # initialisation right after torch.manual_seed(43), as Quantus re-initialises a layer.
    activation = model.features(x)[0]
    torch.manual_seed(43)
    random_fc = nn.Linear(4, 3)
    maps = [torch.relu((fc.weight[2].detach().view(4, 1, 1) * activation).sum(0)) / 36 for fc in (model.fc, random_fc)]
    np.testing.assert_allclose(output.maps[0][0], maps[0], atol=1e-6)
    expected = scipy.stats.spearmanr(maps[0].flatten(), maps[1].flatten()).statistic
    (figure,) = checked[0]
    assert figure.randomised == ("fc",)
    assert abs(figure.rank_correlation - expected) < 1e-6
    assert figure.rank_correlation < 0.9  # a map that follows the classifier's weights changes with them


@pytest.mark.parametrize("layer", ["layer4", "layer4.0", "layer3", "layer3.1.conv2"])
@pytest.mark.parametrize("method", ["gradcam", "hirescam", "gradcam++", "shapleycam", "scorecam"])
def test_the_replayed_tail_gives_the_figures_of_the_copy_run_whole(resnet18, layer, method):
    """Replaying the batch's outputs up to the layer (even inside a residual block, whose shortcut reads an earlier
    output) gives the maps of the randomised copy run from the image; a method with its own passes reruns."""
    engine = CamEngine(resnet18, input_size=64, scorecam_channels=8)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    requests = [
        CamRequest(Classes([1, 2]), layer, method),
        CamRequest(layer=layer, method=method),
        CamRequest(layer=layer, method=method, aug_smooth=True),
    ]
    output, checked = figures(engine, x, requests)
    split = split_at(resnet18, layer, x[:1])
    whole = CamEngine(randomised_copy(resnet18, split.after), input_size=64, scorecam_channels=8)
    again = whole(x, [CamRequest(Classes(t), layer, method, aug_smooth=r.aug_smooth) for t, r in zip(
        output.targets, requests, strict=True)])  # fmt: skip
    for n in range(3):
        expected = rank_correlation(at_input(output.maps[n], (64, 64)), at_input(again.maps[n], (64, 64)))
        got = torch.tensor([np.nan if f.rank_correlation is None else f.rank_correlation for f in checked[n]])
        torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=0, equal_nan=True)
        assert checked[n][0].randomised == split.after


def test_only_the_model_after_the_layer_runs_again(resnet18):
    sanity = Sanity(CamEngine(resnet18, input_size=64))
    requests = [CamRequest(layer="layer4.0"), CamRequest(Classes([3]), "layer4.0", "hirescam")]
    x = torch.randn(2, 3, 64, 64)
    figures(sanity.engine, x, requests, sanity)  # builds the copy
    twin = sanity.copy_for("layer4.0").engine.model
    ran = []
    hooks = [
        find_layer(twin, name).register_forward_pre_hook(lambda *_, name=name: ran.append(name))
        for name in ("conv1", "layer1.0.conv1", "layer3.1.conv2", "layer4.0.conv1", "layer4.1.conv1", "fc")
    ]
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    try:
        figures(sanity.engine, x, requests, sanity)
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == ["conv1", "layer4.1.conv1", "fc"]  # conv1 replays its output; the layers it feeds do not run
    assert split_at(resnet18, "layer4.0", x[:1]).before == ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                                             "layer3")  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in resnet18.state_dict().items())  # the served model is untouched
    shared = dict(twin.named_parameters())
    assert shared["layer3.0.conv1.weight"] is dict(resnet18.named_parameters())["layer3.0.conv1.weight"]
    assert not torch.equal(shared["fc.weight"], resnet18.fc.weight)


@pytest.mark.parametrize(("layer", "method", "step"), [("layer4.0", "gradcam", "layer4.1.conv1"),
                                                       ("layer3", "hirescam", "layer4.0.conv1")])  # fmt: skip
def test_figures_match_quantus_mprt_at_the_step_that_randomises_the_model_after_the_layer(
    resnet18, layer, method, step
):
    """Quantus 0.6's MPRT randomises from the top down, one module at a time, each after torch.manual_seed(43); the
    step at the first module after the layer has randomised exactly what the served check randomises."""
    quantus = pytest.importorskip("quantus")
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    y = np.array([1, 3, 7])

    def explain(model, inputs, targets, **_):
        requests = [CamRequest(Classes([int(t)]), layer, method) for t in targets]
        maps = CamEngine(model, input_size=64)(torch.as_tensor(inputs), requests).maps
        return np.stack([at_input(m, (64, 64))[0].numpy() for m in maps])[:, None]

    requests = [CamRequest(Classes([int(t)]), layer, method) for t in y]
    _, checked = figures(CamEngine(resnet18, input_size=64), x, requests)
    metric = quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True, display_progressbar=False)
    scores = metric(model=resnet18, x_batch=x.numpy(), y_batch=y, a_batch=explain(resnet18, x.numpy(), y),
                    explain_func=explain, channel_first=True, device="cpu")  # fmt: skip
    ours = [np.nan if checked[n][0].rank_correlation is None else checked[n][0].rank_correlation for n in range(3)]
    assert np.isfinite(ours).sum() >= 2  # a map that ReLU leaves all zero has no ranks, here or in Quantus
    np.testing.assert_allclose(ours, scores[step], atol=1e-3)


def test_on_the_trained_synthetic_model_the_figure_tells_gradcam_from_eigencam(shapes):
    """At ``features.5`` the last convolution and the head are randomised: Grad-CAM's map no longer correlates with
    its own (Adebayo et al.'s finding), EigenCAM's cannot change. At the default layer only the linear head is
    randomised, and the figures are nearer 1 for every method, yet still tell them apart."""
    prepared, _ = shapes
    engine = CamEngine(prepared.model, input_size=64)
    samples = make_samples(16, seed=5)
    images = to_batch([s.image for s in samples])
    labels = [s.label for s in samples]
    values = {}
    for layer in ("features.5", "features.7"):
        for method in ("gradcam", "xgradcam", "eigencam", "guided-gradcam"):
            requests = [CamRequest(Classes([label]), layer, method) for label in labels]
            _, checked = figures(engine, images, requests)
            found = [checked[n][0].rank_correlation for n in range(len(labels))]
            values[layer, method] = float(np.nanmean(np.array(found, dtype=float)))  # a flat map has no figure
            assert checked[0][0].randomised == (("features.6", "head") if layer == "features.5" else ("head",))
    assert values["features.5", "eigencam"] == values["features.7", "eigencam"] == 1.0
    assert values["features.5", "gradcam"] < 0.3 and values["features.5", "xgradcam"] < 0.3, values
    assert values["features.7", "gradcam"] < 0.9, values
    # Guided Grad-CAM keeps more of its map than Grad-CAM (its guided backpropagation follows the input's edges),
    # yet its Grad-CAM factor still carries it down: on this model it does not reach EigenCAM's 1.
    for layer in ("features.5", "features.7"):
        assert values[layer, "gradcam"] + 0.05 < values[layer, "guided-gradcam"] < 1.0, values
