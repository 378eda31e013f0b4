"""Composite methods: maps built from other methods' maps (RefineCAM, SESS) and FullGrad, which differentiates
the whole network. SESS and FullGrad run apart from the batch's shared forward pass; RefineCAM adds rows to it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from camserve.cam.capture import CamOutput, CamRequest, MethodEngine, add_slot, slot_classes
from camserve.cam.layers import forward_hooks
from camserve.cam.post import normalise_channels, normalize_map, upsample
from camserve.cam.targets import Classes

__all__ = ["SESS_SCALES", "full_grad", "refine", "sess", "sess_windows"]


def refine(part_maps: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
    """RefineCAM (pytorch-grad-cam's ``RefineCAM`` over ``GradCAMPlusPlus``): the product of Grad-CAM++ maps of
    several layers, each min–max normalised at the input's size, which denoises an early layer's map with a deep
    one; here the request's layer and the model's default layer: map = norm(up(GradCAM++_layer)) ⊙
    norm(up(GradCAM++_default)).

    Both parts are rows of the batch's one forward pass, so it costs 2 forward passes."""
    refined = normalize_map(part_maps[0], size)
    for part in part_maps[1:]:
        refined = refined * normalize_map(part, size)
    return refined


# --- FullGrad ---


def _effective_bias(layer: nn.Module) -> Tensor:
    """A layer's bias as FullGrad sees it: a convolution's own; a BatchNorm's β − μ·γ/√(σ² + ε) in eval mode."""
    if isinstance(layer, nn.BatchNorm2d):
        return layer.bias - layer.running_mean * layer.weight / torch.sqrt(layer.running_var + layer.eps)
    return layer.bias


def full_grad(engine: MethodEngine, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
    """FullGrad (Srinivas & Fleuret, NeurIPS 2019), as pytorch-grad-cam computes it: the input gradient and every
    bias gradient, each channel normalised and upsampled to the input, summed: map = Σ_c norm(|x_c · ∂y/∂x_c|) +
    Σ_layers Σ_k up(norm(|b_k · ∂y/∂z_k|)).

    The sum runs over every ``Conv2d`` and ``BatchNorm2d`` with a bias (a BatchNorm's effective bias is
    β − μ·γ/√(σ² + ε)), where z is the layer's output and norm(m) = (m − min m) / (max m + 10⁻⁷). It needs the
    whole network differentiated, from the input on: these images get their own forward pass with autograd,
    and one gradient call per target slot. Gradients are taken with respect to the input and the layers'
    outputs, never the parameters. The request's layer does not apply. Maps come at the input's size."""
    size = tuple(images.shape[-2:])
    layers = [
        module
        for module in engine.model.modules()
        if type(module) in (nn.Conv2d, nn.BatchNorm2d) and module.bias is not None
    ]
    outputs: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
        outputs.append(output)
        return output.clone()  # in-place ops downstream (ReLU) must not rewrite the kept output

    started = time.perf_counter()
    with forward_hooks([(layer, keep) for layer in layers]), torch.enable_grad():
        x = images.detach().requires_grad_(True)
        logits = engine.model(x)
    forward_seconds = time.perf_counter() - started
    biases = [_effective_bias(layer).detach() for layer in layers]
    classes = engine.resolve_targets(logits.detach(), requests)
    counts = [len(chosen) for chosen in classes]
    maps: list[list[Tensor]] = [[] for _ in requests]
    for slot in range(max(counts)):
        seeds = engine.seeds(logits.detach(), slot_classes(classes, slot, x.device))
        last = slot == max(counts) - 1
        gradients = torch.autograd.grad(logits, [x, *outputs], grad_outputs=seeds, retain_graph=not last)
        with torch.no_grad():
            # Upsampling is linear: summing a layer's normalised channels first, then upsampling once, gives
            # Σ_k up(norm(·)) exactly, at a fraction of the cost (ResNet-50 has 26 000 bias channels).
            total = normalise_channels((gradients[0] * x).abs(), size).sum(dim=1)
            for bias, gradient in zip(biases, gradients[1:], strict=True):
                summed = normalise_channels((bias.view(1, -1, 1, 1) * gradient).abs()).sum(dim=1, keepdim=True)
                total += upsample(summed, size)[:, 0]
        add_slot(maps, classes, slot, total.float())
    return CamOutput(
        logits=logits.detach().float(),
        targets=classes,
        maps=[torch.stack(m) for m in maps],
        seconds={"forward": forward_seconds},
    )


# --- SESS ---

SESS_SCALES = 12
"""SESS's number of scales, as pytorch-grad-cam's default."""


def _window_starts(length: int, window: int) -> list[int]:
    """SESS's window positions along one side: every ``window`` pixels, the last one shifted back inside."""
    starts = []
    for start in range(0, length, window):
        if start + window >= length:
            starts.append(max(length - window, 0))
            break
        starts.append(start)
    return starts


def sess_windows(side: int) -> int:
    """How many windows SESS explains for one square image of ``side`` pixels."""
    step = round(side * 2 / 7)
    return sum(len(_window_starts(side + step * i, side)) ** 2 for i in range(SESS_SCALES))


def sess(engine: MethodEngine, images: Tensor, requests: Sequence[CamRequest], inner: str) -> CamOutput:
    """SESS (Tursun et al., 2022: Saliency Enhancing with Scaling and Sliding), as pytorch-grad-cam's ``SESS``
    over ``GradCAM`` (``inner``) computes it with its defaults. The image (side S) is resized so that its shorter
    side is each of 12 scales S, S + r, …, S + 11r (r = round(2S/7)); S×S windows slide over each with stride S
    (the last one shifted back inside). Each window's score is the class's score (softmax probability; the head's
    ``scores``), clipped at 0,
    divided by the best window's; each window's Grad-CAM, upsampled and normalised at the window's size, times its
    score, is pasted where the window was and resized back to the image; the fused map is the mean over the windows
    that are positive at each pixel, then a Gaussian blur (11×11, σ = 5). The classes are the whole image's.

    Cost: for every window one forward pass to score it and one forward and gradient pass to explain it, 122
    windows per image at the defaults, so 2·122 + 1 passes. Maps come at the input's size."""
    started = time.perf_counter()
    logits = engine.logits(images).float()
    forward_seconds = time.perf_counter() - started
    targets = engine.resolve_targets(logits, requests)
    maps = [
        torch.stack([_sess_map(engine, image, request, c, inner) for c in chosen])
        for image, request, chosen in zip(images, requests, targets, strict=True)
    ]
    return CamOutput(logits=logits, targets=targets, maps=maps, seconds={"forward": forward_seconds})


def _sess_map(engine: MethodEngine, image: Tensor, request: CamRequest, target: int, inner: str, batch: int = 32):
    """One image's SESS map for one class (see :func:`sess`); the windows' Grad-CAM keeps the request's layer and
    ``eigen_smooth``."""
    from torchvision.transforms.functional import gaussian_blur, resize

    height, width = image.shape[-2:]
    window = min(height, width)
    step = round(window * 2 / 7)
    patches, places = [], []
    for scale in (window + step * i for i in range(SESS_SCALES)):
        scaled = resize(image[None], scale)
        scaled_height, scaled_width = scaled.shape[-2:]
        for y in _window_starts(scaled_height, window):
            for x in _window_starts(scaled_width, window):
                patches.append(scaled[0, :, y : y + window, x : x + window])
                places.append((x, y, scaled_width, scaled_height))
    patches = torch.stack(patches)
    scores = torch.cat(
        [engine.head.scores(engine.logits(patches[i : i + batch]))[:, target] for i in range(0, len(patches), batch)]
    )
    scores = scores.clamp_min(0)
    best = scores.max()
    weights = scores / best if best > 0 else torch.ones_like(scores)
    total = torch.zeros(height, width, device=image.device)
    counts = torch.zeros(height, width, device=image.device)
    window_request = replace(request, targets=Classes([target]), method=inner, aug_smooth=False)
    for start in range(0, len(patches), batch):
        chunk = patches[start : start + batch]
        output = engine.explain_shared(chunk, [window_request] * len(chunk))
        for offset, cam in enumerate(output.maps):
            index = start + offset
            scaled = normalize_map(cam, (window, window))[0] * weights[index]
            x, y, scaled_width, scaled_height = places[index]
            canvas = torch.zeros(scaled_height, scaled_width, device=image.device)
            canvas[y : y + window, x : x + window] = scaled
            pasted = upsample(canvas[None, None], (height, width))[0, 0]
            positive = pasted > 0
            total = total + torch.where(positive, pasted, torch.zeros_like(pasted))
            counts = counts + positive
    fused = torch.where(counts > 0, total / counts.clamp_min(1), torch.zeros_like(total))
    return gaussian_blur(fused[None, None], kernel_size=11, sigma=5.0)[0, 0]
