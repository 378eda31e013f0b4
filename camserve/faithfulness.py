"""How faithful an explanation is, measured with the model itself: deletion and insertion (RISE), Average Drop and
Increase. Pure torch, no gradients: perturbed copies of the input go through the network in large batches.

With x the normalised model input (H×W), m the map upsampled to H×W (in [0, 1]), c the explained class,
p(z) = softmax(model(z))[c], pixels ranked by m, descending (``torch.argsort(m.flatten(), descending=True,
stable=True)``), S steps and k_i = round(i·H·W/S):

- **deletion** (Petsiuk et al., RISE, BMVC 2018): z_i is x with its top k_i pixels set to 0 in normalised space
  (the dataset's mean colour), i = 0…S; AUC = ((p(z_0) + p(z_S))/2 + Σ_{i=1..S−1} p(z_i)) / S. Lower is more
  faithful: removing what the map points at should destroy the prediction first.
- **insertion**: z_i is a blurred x (``gaussian_blur(x, kernel_size=11, sigma=5)``) with the top k_i pixels of x put
  back; the same AUC. Higher is more faithful.
- **drop** (Average Drop, Chattopadhay et al., WACV 2018): max(0, p(x) − p(x·m)) / p(x), where x·m is the
  normalised input times the map, as pytorch-grad-cam's ``CamMultImageConfidenceChange`` builds it.
- **increase**: p(x·m) > p(x).

Cost: 2S + 1 forward passes per explanation on top of the one that explained it (deletion's z_0 and insertion's
z_S are x itself), so 2S + 2 in all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

__all__ = ["Faithfulness", "faithfulness", "forward_passes"]


@dataclass(frozen=True)
class Faithfulness:
    deletion: float
    insertion: float
    drop: float
    increase: bool
    steps: int


def forward_passes(steps: int) -> int:
    """The forward passes one explanation's faithfulness costs beyond the pass that explained it."""
    return 2 * steps + 1


def _auc(probabilities: Tensor) -> Tensor:
    """((p_0 + p_S)/2 + Σ_{i=1..S−1} p_i) / S for each row of (P, S + 1) probabilities."""
    steps = probabilities.shape[1] - 1
    return ((probabilities[:, 0] + probabilities[:, -1]) / 2 + probabilities[:, 1:-1].sum(dim=1)) / steps


def faithfulness(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor,
    probabilities: Tensor,
    steps: int = 16,
    batch: int = 64,
    scores: Callable[[Tensor], Tensor] = lambda logits: logits.softmax(dim=1),
    measure: Callable[[object, Tensor], Tensor] | None = None,
    fill: Tensor | float = 0.0,
) -> list[Faithfulness]:
    """The metrics above for P explanations.

    ``inputs`` (P, C, H, W) are the normalised model inputs, ``maps`` (P, H, W) the maps at that size in [0, 1],
    ``classes`` (P,) the explained classes and ``probabilities`` (P,) p(x), already known from the forward pass
    that explained them. ``scores`` turns the model's outputs into per-class scores p: the softmax here, the task's
    own (``camserve.tasks``) in the service, where a regression model's score is its output itself (then drop is
    max(0, y(x) − y(x·m)) / |y(x)|, and the AUCs are in the output's units). The perturbed inputs are made
    ``batch`` at a time, so memory stays bounded.

    A model whose output is not one score per class gives ``measure(outputs, explanations)`` instead, p for each
    perturbed input from the model's outputs and the explanation (row of ``inputs``) it perturbs: a segment's mean
    probability, a detection's matched score. ``fill`` is what deletion puts in place of a pixel: 0 in normalised
    space, or a (C,) colour for a model that normalises its input itself (a detector: its transform's mean).
    """
    count = len(inputs)
    perturbations = _Perturbations(inputs, maps, steps, fill)
    # Work items: (explanation, kind, step); kind 0 deletion (steps 1..S), 1 insertion (steps 0..S-1), 2 x·m.
    items = [(p, 0, i) for p in range(count) for i in range(1, steps + 1)]
    items += [(p, 1, i) for p in range(count) for i in range(steps)]
    items += [(p, 2, 0) for p in range(count)]
    measured = torch.empty(len(items), device=inputs.device)
    with torch.no_grad():
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            rows = torch.tensor([p for p, _, _ in chunk], device=inputs.device)
            outputs = model(perturbations.of(chunk, rows))
            if measure is not None:
                measured[start : start + len(chunk)] = measure(outputs, rows).float()
            else:
                measured[start : start + len(chunk)] = scores(outputs.float())[torch.arange(len(chunk)), classes[rows]]
    p_x = probabilities.float().to(inputs.device)
    deletion = torch.cat([p_x[:, None], measured[: count * steps].view(count, steps)], dim=1)
    offset = count * steps
    insertion = torch.cat([measured[offset : offset + count * steps].view(count, steps), p_x[:, None]], dim=1)
    weighted = measured[2 * offset :]
    drop = (p_x - weighted).clamp_min(0) / p_x.abs().clamp_min(1e-12)
    deletion_auc, insertion_auc = _auc(deletion).tolist(), _auc(insertion).tolist()
    return [
        Faithfulness(round(d, 6), round(i, 6), round(float(r), 6), bool(w > p), steps)
        for d, i, r, w, p in zip(
            deletion_auc, insertion_auc, drop.tolist(), weighted.tolist(), p_x.tolist(), strict=True
        )
    ]


class _Perturbations:
    """The perturbed inputs of P explanations: the top pixels of each map deleted (set to ``fill``) or inserted
    (into the blurred input) at each step, and the input weighed by the map."""

    def __init__(self, inputs: Tensor, maps: Tensor, steps: int, fill: Tensor | float) -> None:
        count, _, height, width = inputs.shape
        pixels = height * width
        order = torch.argsort(maps.reshape(count, pixels), dim=1, descending=True, stable=True)
        self.rank = torch.empty_like(order)
        self.rank.scatter_(1, order, torch.arange(pixels, device=order.device).expand(count, pixels))
        self.kept = torch.tensor([round(i * pixels / steps) for i in range(steps + 1)], device=inputs.device)
        self.blurred = gaussian_blur(inputs, kernel_size=11, sigma=5.0)
        self.inputs, self.maps, self.fill, self.size = inputs, maps, fill, (height, width)

    def of(self, chunk: list[tuple[int, int, int]], rows: Tensor) -> Tensor:
        """The inputs of the work items ``chunk`` ((explanation, kind, step)), whose explanations are ``rows``."""
        device = self.inputs.device
        kinds = torch.tensor([k for _, k, _ in chunk], device=device).view(-1, 1, 1, 1)
        step = torch.tensor([i for _, _, i in chunk], device=device)
        top = (self.rank[rows] < self.kept[step].unsqueeze(1)).view(-1, 1, *self.size)
        x = self.inputs[rows]
        deleted = torch.where(top, torch.as_tensor(self.fill, dtype=x.dtype, device=device).view(1, -1, 1, 1), x)
        inserted = torch.where(top, x, self.blurred[rows])
        weighted = x * self.maps[rows].unsqueeze(1).to(x.dtype)
        return torch.where(kinds == 0, deleted, torch.where(kinds == 1, inserted, weighted))
