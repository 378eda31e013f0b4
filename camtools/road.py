"""ROAD, RemOve And Debias (Rong et al., ICML 2022): remove the pixels a map ranks most (or least) relevant, fill
them by noisy linear imputation from their neighbours so that the image stays in-distribution, and see how the
class's score moves. As pytorch-grad-cam's ``ROADCombined`` computes it, at its default percentiles; for the
"which method" report (``scripts/evaluate.py``), not served: see :func:`road_combined` for its cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import spsolve
from torch import Tensor

__all__ = ["NEIGHBOURS", "PERCENTILES", "ROAD_NOISE", "impute", "road_combined", "road_masks"]

NEIGHBOURS = (
    ((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
    ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
)  # fmt: skip
"""The imputation's stencil: each removed pixel is the weighted mean of its 8 neighbours (Rong et al.'s weights)."""
PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
"""``ROADCombined``'s default percentiles."""
ROAD_NOISE = 0.01
"""The imputation noise's standard deviation, on the normalised input."""


def impute(image: Tensor, keep: np.ndarray, generator: torch.Generator, noise: float = ROAD_NOISE) -> Tensor:
    """``image`` (C, H, W) with the pixels where ``keep`` (H, W) is False replaced by noisy linear imputation: each
    one equals the weighted mean of its in-image neighbours (:data:`NEIGHBOURS`), the kept ones given, solved as one
    sparse linear system for all channels; then N(0, noise²) is added to the imputed pixels."""
    channels, height, width = image.shape
    flat_keep = keep.reshape(-1)
    missing = np.flatnonzero(~flat_keep)
    if len(missing) == 0:
        return image.clone()
    if len(missing) == flat_keep.size:  # nothing to impute from: the system is singular, with the zero solution
        return noise * torch.randn(image.reshape(channels, -1).shape, generator=generator).reshape_as(image)
    values = image.reshape(channels, -1).double().numpy()
    index_of = np.full(height * width, -1)
    index_of[missing] = np.arange(len(missing))
    rows, columns = divmod(missing, width)
    diagonal = np.ones(len(missing))
    right = np.zeros((len(missing), channels))
    entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for (dy, dx), weight in NEIGHBOURS:
        y, x = rows + dy, columns + dx
        inside = (y >= 0) & (x >= 0) & (y < height) & (x < width)
        diagonal[~inside] -= weight
        equations = np.flatnonzero(inside)
        neighbour = y[inside] * width + x[inside]
        known = flat_keep[neighbour]
        right[equations[known]] -= weight * values[:, neighbour[known]].T
        unknown = equations[~known]
        entries.append((unknown, index_of[neighbour[~known]], np.full(len(unknown), weight)))
    size = len(missing)
    entries.append((np.arange(size), np.arange(size), -diagonal))
    system = coo_matrix(
        (np.concatenate([e[2] for e in entries]), (np.concatenate([e[0] for e in entries]), np.concatenate(
            [e[1] for e in entries]))), shape=(size, size),
    ).tocsc()  # fmt: skip
    solved = torch.tensor(spsolve(system, right), dtype=torch.float32).reshape(size, channels).t()
    filled = image.reshape(channels, -1).clone()
    filled[:, missing] = solved + noise * torch.randn(solved.shape, generator=generator)
    return filled.reshape_as(image)


def road_masks(cam: np.ndarray, percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """The pixels MoRF and LeRF keep at ``percentile``: MoRF keeps those below the map's percentile (removing the
    most relevant), LeRF those below the percentile of 1 − map (removing the least relevant), as pytorch-grad-cam.
    Where the map is flat up to the percentile (a ReLU'd map, zero on most pixels), no pixel is below it and
    every pixel is removed: :func:`impute` then gives the zero image plus noise, the solution the reference's
    singular system has."""
    return tuple(values < np.float32(np.percentile(values, percentile)) for values in (cam, 1 - cam))


def road_combined(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    cams: np.ndarray,
    classes: Sequence[int],
    percentiles: Sequence[float] = PERCENTILES,
    seed: int = 0,
    scores: Callable[[Tensor], Tensor] = lambda outputs: outputs.float().softmax(dim=1),
) -> np.ndarray:
    """ROAD for each image: (mean_p LeRF_p − mean_p MoRF_p) / 2, where MoRF_p (LeRF_p) is the class's score after
    removing and imputing the pixels that the map ranks above (below) its p-th percentile, minus the score before
    (``model`` maps a batch of inputs to its outputs, ``scores`` turns those into (N, classes) scores: the softmax
    of pytorch-grad-cam's ``ClassifierOutputSoftmaxTarget`` by default, a task's own scores in the report, as
    :func:`camserve.faithfulness.faithfulness` takes them). Higher is better:
    removing what the map points at costs the score, removing what it ignores does not. A flat map ranks nothing:
    its ROAD is 0.

    ``cams`` (N, H, W) are the maps at the input's size, normalised. Each image's imputation noise comes from a
    generator seeded with ``seed``, drawn in the reference's order (LeRF's percentiles, then MoRF's). Cost per
    explanation: 2 × 9 sparse solves of up to H·W unknowns (about a second at 224 pixels on one core) and 2 × 9
    forward passes, batched: far over a served request's budget."""
    results = []
    with torch.no_grad():
        before = scores(model(images)).float()
    for n, (image, cam, target) in enumerate(zip(images.cpu(), cams, classes, strict=True)):
        if np.ptp(cam) == 0:
            results.append(0.0)
            continue
        generator = torch.Generator().manual_seed(seed)
        masks = [road_masks(cam, p) for p in percentiles]
        perturbed = [impute(image, lerf, generator) for _, lerf in masks]
        perturbed += [impute(image, morf, generator) for morf, _ in masks]
        with torch.no_grad():
            after = scores(model(torch.stack(perturbed).to(images.device))).float()[:, target]
        change = (after - before[n, target]).cpu().numpy()
        lerf, morf = change[: len(percentiles)].mean(), change[len(percentiles) :].mean()
        results.append(float((lerf - morf) / 2))
    return np.array(results)
