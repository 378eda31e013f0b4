"""Activation-only methods: each reads the layer's activations A (P, K, h, w) alone, so one map serves every class
of an image, and returns each channel's contribution (P, K, h, w) or the map (P, h, w) itself."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["eigen_cam", "fem", "kpca_cam", "orient_tail", "random_cam"]


def random_cam(activations: Tensor, seed: int = 0) -> Tensor:
    """RandomCAM, a baseline (pytorch-grad-cam's ``RandomCAM``): map = Σ_k w_k A_k with w_k ~ U(−1, 1), drawn from a
    generator seeded with ``seed``, the same weights for every image. An explanation that no faithfulness measure
    can tell from this one explains nothing."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    weights = torch.rand(activations.shape[1], generator=generator) * 2 - 1
    return weights.to(activations.device, activations.dtype).view(1, -1, 1, 1) * activations


def fem(activations: Tensor, k: float = 2.0) -> Tensor:
    """FEM, the Feature Explanation Method (Fuad et al., IPTA 2020), as pytorch-grad-cam computes it: with μ_k and σ_k
    channel k's mean and (population) standard deviation over positions, w_k = mean_ij [A_k,ij > μ_k + k·σ_k], the
    share of positions where the channel fires exceptionally, and map = Σ_k w_k A_k. No gradients."""
    mean = activations.mean(dim=(2, 3), keepdim=True)
    std = activations.std(dim=(2, 3), keepdim=True, correction=0)
    weights = (activations > mean + k * std).to(activations.dtype).mean(dim=(2, 3), keepdim=True)
    return weights * activations


def kpca_cam(activations: Tensor) -> Tensor:
    """KPCA-CAM (Karmani et al., 2024): EigenCAM with kernel PCA, as pytorch-grad-cam computes it with scikit-learn's
    ``KernelPCA(n_components=1, kernel="sigmoid")``. With X the (h·w, K) activations centred over positions,
    K_ab = tanh(x_a·x_b / K + 1), centred in feature space (K − 1K − K1 + 1K1, 1 = 1/n), and (λ, α) its top
    eigenpair: map = α·√λ, its sign fixed so that α's largest-magnitude entry is positive (scikit-learn's
    ``svd_flip``). No gradients."""
    flat = activations.double().flatten(2).transpose(1, 2)
    flat = flat - flat.mean(dim=1, keepdim=True)
    positions, channels = flat.shape[1:]
    kernel = torch.tanh(flat @ flat.transpose(1, 2) / channels + 1.0)
    ones = torch.full((positions, positions), 1.0 / positions, dtype=kernel.dtype, device=kernel.device)
    centred = kernel - ones @ kernel - kernel @ ones + ones @ kernel @ ones
    values, vectors = torch.linalg.eigh(centred)
    alpha, value = vectors[:, :, -1], values[:, -1].clamp_min(0)
    largest = alpha.gather(1, alpha.abs().argmax(dim=1, keepdim=True))
    projection = torch.sign(largest) * alpha * value.sqrt()[:, None]
    return projection.view(activations.shape[0], *activations.shape[2:]).float()


def eigen_cam(activations: Tensor) -> Tensor:
    """EigenCAM (Muhammad & Yeasin, IJCNN 2020): the activations' first principal component, no gradients.

    With X the (h·w, K) activations of one image, centred over positions, and v₁ its first right singular vector:
    map = s · X v₁. The map does not depend on the class. An SVD fixes v₁ only up to its sign, so s = ±1 is chosen
    to make the projection's third moment Σ (X v₁)³ positive: its long tail, the few positions that stand far out
    from the rest, lands on the positive side, which survives the ReLU. A localised object is such a tail; the
    background it stands out from is the many positions near the mean. (Correlating the map with the channel mean
    instead lit the clutter on a trained Faster R-CNN: the textured background fires more than a flat-coloured
    object. pytorch-grad-cam leaves the sign to the SVD routine; the maps agree up to that sign.)
    """
    flat = activations.double().flatten(2).transpose(1, 2)
    centred = flat - flat.mean(dim=1, keepdim=True)
    positions, channels = centred.shape[1:]
    # X v₁ = σ₁ u₁: take the top eigenvector of the smaller Gram matrix, X Xᵀ or Xᵀ X, rather than a full SVD.
    if positions <= channels:
        values, vectors = torch.linalg.eigh(centred @ centred.transpose(1, 2))
        projection = vectors[:, :, -1] * values[:, -1:].clamp_min(0).sqrt()
    else:
        _, vectors = torch.linalg.eigh(centred.transpose(1, 2) @ centred)
        projection = (centred @ vectors[:, :, -1:]).squeeze(-1)
    return (orient_tail(projection) * projection).view(activations.shape[0], *activations.shape[2:]).float()


def orient_tail(projections: Tensor) -> Tensor:
    """(P, 1) signs ±1 that make each row of the (P, n) ``projections`` have a positive third moment, Σ p³ ≥ 0: the
    sign :func:`eigen_cam` gives a principal component."""
    return torch.where(projections.pow(3).sum(dim=1, keepdim=True) < 0, -1.0, 1.0).to(projections.dtype)
