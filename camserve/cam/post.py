"""Post-processing of maps: the one min–max normalisation and the bilinear upsampling every method shares.

pytorch-grad-cam's post-processing is the community's reference output: ReLU, min–max, bilinear with
``align_corners=False``. Its helpers differ only in the small constant they add to the span, so that constant is a
parameter here rather than a second copy of the normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from camserve.cam.methods.activation import eigen_cam

__all__ = ["min_max", "normalise_channels", "normalize_map", "reduce_contributions", "upsample"]


def min_max(maps: Tensor, dims: tuple[int, ...] = (-2, -1), eps: float | None = None) -> Tensor:
    """Each map scaled to [0, 1] over ``dims``: (m − min m) / span.

    With ``eps`` None the span is max − min and a constant map (span 0) becomes all zero, never NaN; with ``eps``
    the span is max − min + eps, as pytorch-grad-cam's ``scale_cam_image`` (eps 10⁻⁷) and ScoreCAM's masks
    (eps 10⁻⁸) compute it, which the parity tests need to the last digit.
    """
    shifted = maps - maps.amin(dim=dims, keepdim=True)
    span = shifted.amax(dim=dims, keepdim=True)
    if eps is not None:
        return shifted / (span + eps)
    # A constant map has span 0: dividing by +inf instead turns it into zeros rather than NaN.
    return shifted / torch.where(span > 0, span, torch.inf)


def upsample(maps: Tensor, size: tuple[int, int], align_corners: bool = False) -> Tensor:
    """(N, C, h, w) maps bilinearly resized to ``size`` (``align_corners=False`` samples as OpenCV's INTER_LINEAR)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=align_corners)


def normalize_map(maps: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Upsample (T, h, w) maps bilinearly (``align_corners=False``) to ``size`` = (H, W), then min–max each to [0, 1].

    This is pytorch-grad-cam's post-processing. A constant map (all zero, say) becomes all zero, never NaN.
    """
    maps = maps.float()
    if size is not None:
        maps = upsample(maps.unsqueeze(1), size).squeeze(1)
    return min_max(maps)


def normalise_channels(maps: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Each (image, channel) map min–max normalised as pytorch-grad-cam's ``scale_cam_image`` does it,
    (m − min m) / (max(m − min m) + 10⁻⁷), then bilinearly upsampled to ``size`` if given."""
    scaled = min_max(maps.float(), eps=1e-7)
    return scaled if size is None else upsample(scaled, size)


def reduce_contributions(contributions: Tensor, eigen_smooth: bool = False) -> Tensor:
    """Maps (P, h, w) from a method's output: per-channel contributions C (P, K, h, w) are summed over channels, or
    with ``eigen_smooth`` replaced by their first principal component (pytorch-grad-cam's ``eigen_smooth``: the
    projection of C onto its top singular vector, signed as in :func:`eigen_cam`); a map passes through."""
    if contributions.dim() == 3:
        return contributions
    return eigen_cam(contributions) if eigen_smooth else contributions.sum(dim=1)
