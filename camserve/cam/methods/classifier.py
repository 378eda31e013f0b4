"""Classifier-weight methods: the layer's activations weighed by the model's own linear classifier, read once per
model, for the explained class: no gradient and no extra pass."""

from __future__ import annotations

from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from camserve.cam.capture import MethodEngine
from camserve.cam.layers import find_layer, forward_hooks, to_grid
from camserve.cam.methods.perturbation import Scoring

__all__ = ["cam", "cam_applies", "classifier_after"]

_FOUND: WeakKeyDictionary[nn.Module, Tensor | str] = WeakKeyDictionary()
"""Per explained module: its classifier's weights (classes, K), or why CAM does not apply there."""


def classifier_after(engine: MethodEngine, layer: str) -> Tensor | str:
    """The weights (classes, K) of the linear layer that takes the spatial mean of ``layer``'s output as its input,
    as CAM needs it; or, when no linear layer does, why not. Found once per layer module, from one forward pass of a
    seeded random image: the first ``nn.Linear`` whose input equals that mean."""
    module = find_layer(engine.model, layer)
    if module in _FOUND:
        return _FOUND[module]
    layout = engine.spatial_layer(layer).layout
    device = next(engine.model.parameters()).device
    image = engine.sample(random=True)
    outputs: list[Tensor] = []
    inputs: list[tuple[nn.Linear, Tensor]] = []

    def keep_output(_module: nn.Module, _inputs: object, output: Tensor) -> None:
        outputs.append(output)

    def keep_input(linear: nn.Linear):
        return lambda _module, given, _output: inputs.append((linear, given[0]))

    linears = [m for m in engine.model.modules() if isinstance(m, nn.Linear)]
    hooks = [(module, keep_output), *((linear, keep_input(linear)) for linear in linears)]
    with forward_hooks(hooks), torch.no_grad():
        engine.model(image.to(device))
    found: Tensor | str = (
        f"CAM weighs the layer's channels by a linear classifier that takes their mean over positions (Zhou et al.'s "
        f"global average pooling, then the fully connected layer); no linear layer of this model takes the mean of "
        f"{layer}'s output: explain the layer right before the pooling, or use gradcam, which equals CAM there"
    )
    if outputs and layout is not None:
        pooled = to_grid(outputs[0].float(), layout).mean(dim=(-2, -1)).flatten()
        for linear, given in inputs:
            given = given.float().flatten()
            if given.shape == pooled.shape and torch.allclose(given, pooled, rtol=1e-4, atol=1e-5):
                found = linear.weight.detach().reshape(linear.out_features, -1)
                break
    _FOUND[module] = found
    return found


def cam_applies(engine: MethodEngine, layer: str) -> str | None:
    """None where CAM applies at ``layer``; else why not."""
    found = classifier_after(engine, layer)
    return found if isinstance(found, str) else None


def cam(engine: MethodEngine, work: Scoring) -> Tensor:
    """CAM (Zhou et al., CVPR 2016, "Learning Deep Features for Discriminative Localization"): with w_c the row of
    the linear classifier that follows global average pooling, map = Σ_k w_c,k A_k (the bias left out), as
    torchcam's ``CAM``. No gradient and no extra pass; Grad-CAM equals it up to the factor 1/(h·w) at such a layer.
    It applies only where the layer's mean over positions feeds a linear layer directly."""
    weights = _FOUND.get(work.module)
    if weights is None:
        layer = next(name for name, module in engine.model.named_modules() if module is work.module)
        weights = classifier_after(engine, layer)
    if isinstance(weights, str):
        raise ValueError(weights)
    chosen = weights.to(work.activations.device, work.activations.dtype)[work.classes]
    return chosen[:, :, None, None] * work.activations[work.pair_to_image]
