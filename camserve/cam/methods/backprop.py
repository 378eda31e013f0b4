"""Methods that run their own passes apart from the batch's shared one: Smooth Grad-CAM++ (gradients of noisy copies
of the input) and Guided Grad-CAM (guided backpropagation to the input). Each differentiates with respect to the
layer's activation or the input only, never the parameters."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.cam.capture import (
    CamOutput,
    CamRequest,
    MethodEngine,
    add_slot,
    captured_pass,
    run_by_layer,
    slot_classes,
)
from camserve.cam.layers import find_layer, forward_hooks, to_grid
from camserve.cam.methods.perturbation import NOISE_SEED
from camserve.cam.post import upsample

__all__ = ["SMOOTH_SAMPLES", "SMOOTH_STD", "guided_grad_cam", "smooth_grad_cam_pp"]

SMOOTH_SAMPLES = 4
"""Smooth Grad-CAM++'s noisy copies per image, torchcam's default."""
SMOOTH_STD = 0.3
"""The noise's standard deviation, on the normalised input, torchcam's default."""


# --- Smooth Grad-CAM++ ---


def smooth_grad_cam_pp(engine: MethodEngine, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
    """Smooth Grad-CAM++ (Omeiza et al., 2019: Grad-CAM++ with SmoothGrad's noisy copies), as torchcam's
    ``SmoothGradCAMpp`` computes it: n = 4 copies x + ε, ε ~ N(0, 0.3²) on the normalised input; with g_i the
    gradient of y_c at the layer for copy i, D2 = mean_i g_i², D3 = mean_i g_i³ and A the clean image's activations:
    α = D2 / (2·D2 + Σ_ab D3 ⊙ A + 10⁻⁸), w_k = Σ_ij α_k,ij · relu(g_n,k,ij), map = Σ_k w_k A_n,k, where g_n and A_n
    are the last copy's gradient and activations (torchcam's hooks keep the last pass's; the paper leaves them
    unspecified).

    One forward pass of the clean image and its copies together, the network before the layer without autograd,
    and one gradient call per target slot, with respect to the layer's activation only."""

    def run(layer: str, clean: Tensor, chosen: list[CamRequest]):
        count = len(chosen)
        noise = torch.stack([_noise(clean[0].shape, SMOOTH_SAMPLES, clean.device, clean.dtype) for _ in chosen], 1)
        batch = torch.cat([clean, (clean[None] + noise).flatten(0, 1)])  # clean, then copy i of each image
        layout = engine.spatial_layer(layer).layout
        began = time.perf_counter()
        with engine.autocast(images.device):
            captured = captured_pass(engine.model, batch, {layer: find_layer(engine.model, layer)}, {layer})
        forward_seconds = time.perf_counter() - began
        logits, activation = captured.outputs, captured.activations[layer]
        clean_logits = logits[:count].detach().float()
        classes = engine.resolve_targets(clean_logits, chosen)
        grid = to_grid(activation.detach(), layout).float()
        slots = max(len(targets) for targets in classes)
        maps: list[list[Tensor]] = [[] for _ in chosen]
        for slot in range(slots):
            seeds = torch.zeros_like(logits, dtype=torch.float32)
            noisy_classes = slot_classes(classes, slot, images.device).repeat(SMOOTH_SAMPLES)
            seeds[count:] = engine.seeds(logits[count:].detach(), noisy_classes)
            (gradient,) = torch.autograd.grad(
                logits, activation, grad_outputs=seeds.to(logits.dtype), retain_graph=slot < slots - 1
            )
            with torch.no_grad():
                g = to_grid(gradient, layout).float()[count:].unflatten(0, (SMOOTH_SAMPLES, count))
                second, third = g.pow(2).mean(0), g.pow(3).mean(0)
                alpha = second / (2 * second + (third * grid[:count]).sum(dim=(-2, -1), keepdim=True) + 1e-8)
                weights = (alpha * F.relu(g[-1])).sum(dim=(-2, -1), keepdim=True)
                last_copy = grid[count:].unflatten(0, (SMOOTH_SAMPLES, count))[-1]
                add_slot(maps, classes, slot, F.relu((weights * last_copy).sum(1)))
        return clean_logits, classes, [torch.stack(m) for m in maps], forward_seconds

    return run_by_layer(engine, images, requests, run)


def _noise(shape: torch.Size, samples: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """One image's ``samples`` noise tensors, from a generator seeded with :data:`NOISE_SEED`."""
    generator = torch.Generator().manual_seed(NOISE_SEED)
    noise = torch.stack([torch.randn(shape, generator=generator) for _ in range(samples)]) * SMOOTH_STD
    return noise.to(device, dtype)


# --- Guided Grad-CAM ---


class _Switch:
    """Whether guided backpropagation is on, for the hooks of :func:`guided_relus`."""

    on = False


@contextlib.contextmanager
def guided_relus(model: nn.Module, guided: _Switch) -> Iterator[None]:
    """For the duration of the block, every ``nn.ReLU`` of ``model`` passes back only positive gradients while
    ``guided.on`` is True (guided backpropagation, Springenberg et al., 2015, as Captum's ``GuidedBackprop``:
    ∂/∂x = relu(∂/∂x of the ReLU)); its input is cloned so that an in-place ReLU leaves the hooked tensor alone.
    Only forward passes run inside the block are affected: other requests' passes are not."""

    def clone_and_guide(_module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        given = inputs[0]
        if given.requires_grad:
            given.register_hook(lambda gradient: F.relu(gradient) if guided.on else None)
        return (given.clone(), *inputs[1:])

    handles = [
        module.register_forward_pre_hook(clone_and_guide) for module in model.modules() if type(module) is nn.ReLU
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def guided_grad_cam(engine: MethodEngine, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
    """Guided Grad-CAM (Selvaraju et al., ICCV 2017, section 3): Grad-CAM upsampled to the input, times guided
    backpropagation's input gradient, as Captum's ``GuidedGradCam`` computes it with bilinear upsampling:
    G = relu(Σ_k mean_ij(∂y_c/∂A_k) A_k), attribution_c = up(G) ⊙ ∂*y_c/∂x_c (∂* through every ReLU passing back
    only positive gradients), map = Σ_c |attribution_c|, the colour channels summed as Captum's
    ``visualize_image_attr`` draws it. Its guided-backpropagation factor barely depends on the model's upper layers
    (Adebayo et al., NeurIPS 2018): its sanity figure stays above Grad-CAM's (docs/methods.md, "Sanity").

    The ReLUs are guided only during this method's own pass (:func:`guided_relus`). Cost: one forward pass with
    autograd from the input, and two gradient calls per target slot, with respect to the layer's activation and the
    input. Maps come at the input's size."""
    size = tuple(images.shape[-2:])

    def run(layer: str, given: Tensor, chosen: list[CamRequest]):
        layout = engine.spatial_layer(layer).layout
        captured: list[Tensor] = []

        def keep(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
            captured.append(output)
            return output.clone()  # in-place ops downstream must not rewrite the kept activation

        guided = _Switch()
        began = time.perf_counter()
        with (
            guided_relus(engine.model, guided),
            forward_hooks([(find_layer(engine.model, layer), keep)]),
            torch.enable_grad(),
            engine.autocast(images.device),
        ):
            x = given.detach().requires_grad_(True)
            logits = engine.model(x)
        forward_seconds = time.perf_counter() - began
        classes = engine.resolve_targets(logits.detach().float(), chosen)
        slots = max(len(targets) for targets in classes)
        maps: list[list[Tensor]] = [[] for _ in chosen]
        for slot in range(slots):
            seeds = engine.seeds(logits.detach(), slot_classes(classes, slot, images.device)).to(logits.dtype)
            guided.on = False
            (layer_gradient,) = torch.autograd.grad(logits, captured[0], grad_outputs=seeds, retain_graph=True)
            guided.on = True
            (input_gradient,) = torch.autograd.grad(logits, x, grad_outputs=seeds, retain_graph=slot < slots - 1)
            with torch.no_grad():
                grid, gradient = to_grid(captured[0].detach(), layout).float(), to_grid(layer_gradient, layout).float()
                grad_cam = F.relu((gradient.mean(dim=(-2, -1), keepdim=True) * grid).sum(1, keepdim=True))
                add_slot(maps, classes, slot, (upsample(grad_cam, size) * input_gradient.float()).abs().sum(1))
        return logits.detach().float(), classes, [torch.stack(m) for m in maps], forward_seconds

    return run_by_layer(engine, images, requests, run)
