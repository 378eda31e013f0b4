"""Gradient methods: each weighs the layer's activations A (P, K, h, w) by the gradients g = ∂y/∂A of the
explained scalar, and returns each channel's contribution (P, K, h, w), whose sum over channels is the map before
the final ReLU (or, for EigenGrad-CAM, the map (P, h, w) itself)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from camserve.cam.methods.activation import eigen_cam

__all__ = [
    "eigen_grad_cam",
    "finer_seeds",
    "grad_cam",
    "grad_cam_elementwise",
    "grad_cam_plus_plus",
    "hires_cam",
    "layer_cam",
    "minus_half_hvp",
    "x_grad_cam",
]


def grad_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017): α_k = (1/Z) Σ_ij ∂y_c/∂A_k,ij, map = Σ_k α_k A_k."""
    return gradients.mean(dim=(-2, -1), keepdim=True) * activations


def grad_cam_plus_plus(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al., WACV 2018), eq. 19 with the exponential's derivatives, g = ∂y_c/∂A_k,ij:
    α_k,ij = g² / (2·g² + Σ_ab A_k,ab · g³) (0 where g = 0), w_k = Σ_ij relu(g_k,ij) · α_k,ij, map = Σ_k w_k A_k.

    Not torchcam's Σ relu(g)³, which departs from the paper.
    """
    g2 = gradients.pow(2)
    g3 = g2 * gradients
    activation_sums = activations.sum(dim=(-2, -1), keepdim=True)
    alpha = g2 / (2 * g2 + activation_sums * g3 + 1e-6)
    alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
    weights = (F.relu(gradients) * alpha).sum(dim=(-2, -1), keepdim=True)
    return weights * activations


def x_grad_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al., BMVC 2020): w_k = Σ_ij (g_k,ij · A_k,ij) / Σ_ij A_k,ij, map = Σ_k w_k A_k."""
    activation_sums = activations.sum(dim=(-2, -1), keepdim=True)
    weights = (gradients * activations / (activation_sums + 1e-7)).sum(dim=(-2, -1), keepdim=True)
    return weights * activations


def hires_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """HiResCAM (Draelos & Carin, 2020): map = Σ_k g_k ⊙ A_k, the element-wise product, no spatial averaging."""
    return gradients * activations


def layer_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """LayerCAM (Jiang et al., TIP 2021): map = Σ_k relu(g_k) ⊙ A_k."""
    return F.relu(gradients) * activations


def grad_cam_elementwise(activations: Tensor, gradients: Tensor) -> Tensor:
    """Element-wise Grad-CAM (pytorch-grad-cam's ``GradCAMElementWise``): map = Σ_k relu(g_k ⊙ A_k), each position's
    own gradient times activation, negative evidence dropped before the channels are summed."""
    return F.relu(gradients * activations)


def eigen_grad_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """EigenGrad-CAM (pytorch-grad-cam's ``EigenGradCAM``, after Muhammad & Yeasin 2020): the first principal
    component of g ⊙ A, computed and signed as in :func:`eigen_cam`; unlike EigenCAM it depends on the class."""
    return eigen_cam(gradients * activations)


def finer_seeds(logits: Tensor, classes: Tensor, alpha: float = 1.0, comparisons: int = 3) -> Tensor:
    """Finer-CAM's target (Zhang et al., CVPR 2025, pytorch-grad-cam's ``FinerCAM`` over ``GradCAM``), as the gradient
    of that target with respect to the logits, one row per explanation.

    For class c, the ``comparisons`` classes whose logits are nearest to y_c are the look-alikes s_1…s_3; with
    p = softmax(y), the target is Σ_k p_{s_k}·(y_c − α·y_{s_k}) / Σ_k p_{s_k}: what sets c apart from the classes it
    is confused with. The map is then Grad-CAM of that target. Returns ∂target/∂y, (P, classes).
    """
    with torch.enable_grad():
        y = logits.detach().float().requires_grad_(True)
        rows = torch.arange(len(y), device=y.device)
        distance = (y.detach() - y.detach()[rows, classes][:, None]).abs()
        distance[rows, classes] = -1.0  # the class itself comes first; its look-alikes follow
        similar = distance.argsort(dim=1, stable=True)[:, 1 : 1 + min(comparisons, y.shape[1] - 1)]
        # p_s / Σ p_s over the look-alikes is the softmax of their logits alone: the same value without the 0/0
        # that p_s underflowing to 0 gives far from the top class (pytorch-grad-cam returns NaN maps there).
        look_alikes = y.gather(1, similar)
        weights = look_alikes.softmax(dim=1)
        target = (weights * (y[rows, classes][:, None] - alpha * look_alikes)).sum(dim=1)
        return torch.autograd.grad(target.sum(), y)[0]


def minus_half_hvp(gradient: Tensor, activation: Tensor) -> Tensor:
    """ShapleyCAM's gradient (Cai et al., 2025: the Shapley-value view of CAM): g − ½·Σ_ab A_ab ∂g/∂A_ab, for a
    gradient built with ``create_graph=True``; H = 0 where g does not depend on A (a piecewise-linear rest)."""
    if not gradient.requires_grad:
        return gradient.detach()
    (hvp,) = torch.autograd.grad(
        gradient, activation, grad_outputs=activation.detach(), retain_graph=True, allow_unused=True
    )
    return gradient.detach() if hvp is None else (gradient - 0.5 * hvp).detach()
