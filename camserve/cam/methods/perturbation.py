"""Perturbation methods: each scores the layer's channels with extra forward passes of the network, one per scored
channel, and weighs the activations by those scores. Their passes do not depend on the class: they run once per
image, and every target of that image is scored from their outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from camserve.cam.capture import MethodEngine
from camserve.cam.layers import forward_hooks, to_grid
from camserve.cam.post import min_max, upsample

__all__ = [
    "ISCAM_SAMPLES",
    "SSCAM_SAMPLES",
    "SSCAM_STD",
    "Scoring",
    "ablation_cam",
    "channels_to_score",
    "integrated_score_cam",
    "score_cam",
    "smoothed_score_cam",
]

SSCAM_SAMPLES, SSCAM_STD = 35, 2.0
"""Smoothed Score-CAM's noisy masks per channel and their noise's standard deviation, torchcam's defaults."""
ISCAM_SAMPLES = 10
"""Integrated Score-CAM's integration steps per channel, torchcam's default."""
NOISE_SEED = 0
"""Each image's mask noise comes from a generator seeded with this: the same request gets the same map."""


@dataclass(frozen=True)
class Scoring:
    """What a perturbation method reads for one group of (image, target) pairs at one layer."""

    module: nn.Module
    layout: str
    images: Tensor
    """One row per distinct image of the group."""
    activations: Tensor
    """The layer's grids (images, K, h, w)."""
    raw: Tensor
    """The layer's outputs as the network made them (tokens, NHWC), one row per image."""
    logits: Tensor
    """(images, classes)."""
    pair_to_image: Tensor
    """For each pair, its row in the tensors above."""
    classes: Tensor
    """For each pair, the explained class."""


def channels_to_score(engine: MethodEngine, activation: Tensor) -> Tensor:
    """The channels a perturbation method scores: every one, or the engine's ``scorecam_channels`` with the highest
    mean activation (sorted), the rest getting weight 0."""
    channels = activation.shape[0]
    if engine.scorecam_channels and channels > engine.scorecam_channels:
        return activation.mean(dim=(1, 2)).topk(engine.scorecam_channels).indices.sort().values
    return torch.arange(channels, device=activation.device)


def scored_channels(engine: MethodEngine, channels: int) -> int:
    """How many channels of a layer with ``channels`` channels a perturbation method scores, one pass each."""
    return min(channels, engine.scorecam_channels) if engine.scorecam_channels else channels


def score_cam(engine: MethodEngine, work: Scoring) -> Tensor:
    """Score-CAM (Wang et al., CVPRW 2020): each channel, upsampled and min–max normalised, masks the input, and the
    class's logit on the masked input scores it: M_k = norm(up(A_k)), s_k = y_c(x ⊙ M_k), w = softmax(s),
    map = Σ_k w_k A_k.

    As in pytorch-grad-cam, the masks are upsampled with ``align_corners=True`` and normalised with a span of
    max − min + 10⁻⁸. Cost: one forward pass per scored channel, batched ``scorecam_batch`` at a time; at most
    ``scorecam_channels`` channels are scored (those with the highest mean activation), the rest get weight 0.
    """
    masked_logits, selections = [], []
    for image, activation in zip(work.images, work.activations, strict=True):
        chosen = channels_to_score(engine, activation)
        selected = activation[chosen]
        masks = min_max(upsample(selected[None], tuple(image.shape[-2:]), align_corners=True)[0], eps=1e-8)
        scores = []
        for start in range(0, len(masks), engine.scorecam_batch):
            masked = image[None] * masks[start : start + engine.scorecam_batch, None]
            with engine.autocast(image.device):
                scores.append(engine.model(masked).float())
        masked_logits.append(torch.cat(scores))
        selections.append(selected)
    maps = []
    for image_row, target in zip(work.pair_to_image.tolist(), work.classes.tolist(), strict=True):
        masked = masked_logits[image_row]
        weights = torch.softmax(engine.objective(masked, target), dim=0)
        maps.append(weights[:, None, None] * selections[image_row])
    return torch.stack(maps)


def _torchcam_masks(activation: Tensor, size: tuple[int, int]) -> Tensor:
    """torchcam's Score-CAM masks for one image's (K, h, w) activations: each channel min–max normalised (its
    minimum subtracted, then divided by its maximum + 10⁻⁸), upsampled bilinearly to ``size``."""
    masks = activation.float().clone()
    masks -= masks.amin(dim=(-2, -1), keepdim=True)
    masks /= masks.amax(dim=(-2, -1), keepdim=True) + 1e-8
    return upsample(masks[None], size)[0]


def _smoothed_scores(engine: MethodEngine, work: Scoring, masked_inputs) -> Tensor:
    """For each pair: its channels' weights, softmax over the scored channels of mean_i (y_c(masked_i) − y_c(x)),
    where ``masked_inputs(image_row, image, masks, chosen)`` yields the masked batches of each sample i; the
    channels left unscored get 0. Returns (pairs, K)."""
    sums, chosen_of = [], []
    for row, (image, activation) in enumerate(zip(work.images, work.activations, strict=True)):
        chosen = channels_to_score(engine, activation)
        masks = _torchcam_masks(activation, tuple(image.shape[-2:]))
        outputs = []
        for masked in masked_inputs(row, image, masks, chosen):
            for start in range(0, len(masked), engine.scorecam_batch):
                with engine.autocast(image.device):
                    outputs.append(engine.model(masked[start : start + engine.scorecam_batch]).float())
        samples = torch.cat(outputs).unflatten(0, (-1, len(chosen)))  # (samples, scored channels, outputs)
        sums.append(samples)
        chosen_of.append(chosen)
    weights = torch.zeros(len(work.classes), work.activations.shape[1], device=work.activations.device)
    for pair, (row, target) in enumerate(zip(work.pair_to_image.tolist(), work.classes.tolist(), strict=True)):
        scores = engine.objective(sums[row].flatten(0, 1), target).view(sums[row].shape[:2])
        baseline = engine.objective(work.logits[row : row + 1], target)[0]
        weights[pair, chosen_of[row]] = torch.softmax((scores - baseline).mean(0), dim=0)
    return weights


def smoothed_score_cam(engine: MethodEngine, work: Scoring) -> Tensor:
    """SS-CAM, Smoothed Score-CAM (Wang et al., 2020), as torchcam's ``SSCAM``: each channel's mask M_k =
    up(norm(A_k)) (norm: minus its minimum, over its maximum), plus noise δ ~ N(0, 2²) drawn at the input's size,
    masks the input 35 times: w = softmax_k(mean_i (y_c(x ⊙ (M_k + δ_i)) − y_c(x))), map = Σ_k w_k A_k.

    Cost: 35 forward passes per scored channel (at most ``scorecam_channels``, the most active), batched
    ``scorecam_batch`` at a time: 2241 for 64 channels."""
    generator = torch.Generator().manual_seed(NOISE_SEED)

    def masked_inputs(_row, image, masks, chosen):
        for _ in range(SSCAM_SAMPLES):
            noise = torch.randn(masks.shape, generator=generator) * SSCAM_STD  # every channel's, as torchcam draws it
            yield (masks[chosen] + noise[chosen].to(masks.device))[:, None] * image[None]

    weights = _smoothed_scores(engine, work, masked_inputs)
    return weights[:, :, None, None] * work.activations[work.pair_to_image]


def integrated_score_cam(engine: MethodEngine, work: Scoring) -> Tensor:
    """IS-CAM, Integrated Score-CAM (Naidu et al., 2020), as torchcam's ``ISCAM``: with M_k = up(norm(A_k)) as in
    SS-CAM, the input is masked at 10 growing scales, s_i = Σ_{j≤i} j/10: w = softmax_k(mean_i (y_c(s_i · x ⊙ M_k)
    − y_c(x))), map = Σ_k w_k A_k.

    Cost: 10 forward passes per scored channel: 641 for 64 channels."""

    def masked_inputs(_row, image, masks, chosen):
        coefficient = 0.0
        for step in range(ISCAM_SAMPLES):
            coefficient += (step + 1) / ISCAM_SAMPLES
            yield coefficient * (masks[chosen][:, None] * image[None])

    weights = _smoothed_scores(engine, work, masked_inputs)
    return weights[:, :, None, None] * work.activations[work.pair_to_image]


def ablation_cam(engine: MethodEngine, work: Scoring) -> Tensor:
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020), as pytorch-grad-cam computes it: channel k's weight is the
    relative fall of the class's logit when the layer's channel k is ablated, w_k = (y_c − y_c(A with channel k
    ablated)) / y_c, and map = Σ_k w_k A_k.

    Ablating sets the channel, at every position, to 0 if the layer's smallest activation is 0 and to
    that minimum − 10⁷ otherwise. The ablated layer's output replaces the real one in a forward pass, one row per
    ablated channel: where the layer's output is the whole stream, the network before it runs once per batch of
    ``scorecam_batch`` channels and only the rest runs per channel; inside a residual block the image itself is
    repeated. Like ScoreCAM it scores at most ``scorecam_channels`` channels (the rest get weight 0).
    """
    channel_dim = {"nchw": 1, "nhwc": 3}.get(work.layout, 2)
    grids = to_grid(work.raw, work.layout)
    ablated_logits, weights_index = [], []
    for image, output, grid in zip(work.images, work.raw, grids, strict=True):
        chosen = channels_to_score(engine, grid)
        value = 0.0 if bool(output.min() == 0) else float(output.min()) - 1e7
        scores = []
        for start in range(0, len(chosen), engine.scorecam_batch):
            channels = chosen[start : start + engine.scorecam_batch]
            ablated = output[None].repeat(len(channels), *([1] * output.dim()))
            index = [torch.arange(len(channels), device=output.device)] + [slice(None)] * output.dim()
            index[channel_dim] = channels
            ablated[tuple(index)] = value
            scores.append(_logits_with_layer_output(engine, work.module, image, ablated))
        ablated_logits.append(torch.cat(scores))
        weights_index.append(chosen)
    maps = []
    grids = grids.float()
    for image_row, target in zip(work.pair_to_image.tolist(), work.classes.tolist(), strict=True):
        ablated = ablated_logits[image_row]
        original = engine.objective(work.logits[image_row : image_row + 1], target)[0]
        scores = engine.objective(ablated, target)
        weights = torch.zeros(grids.shape[1], device=grids.device)
        weights[weights_index[image_row]] = (original - scores) / original
        maps.append(weights[:, None, None] * grids[image_row])
    return torch.stack(maps)


def _logits_with_layer_output(engine: MethodEngine, module: nn.Module, image: Tensor, outputs: Tensor) -> Tensor:
    """The logits when ``module``'s output is replaced by each row of ``outputs`` in turn, for one image."""

    def replace_output(_module: nn.Module, _inputs: object, _output: Tensor) -> Tensor:
        return outputs

    with forward_hooks([(module, replace_output)]), torch.no_grad(), engine.autocast(image.device):
        try:
            result = engine.model(image[None])  # the network before the layer runs once for all rows
            if len(result) == len(outputs):
                return result.float()
        except RuntimeError:
            pass  # the layer sits inside a block whose shortcut keeps one row: repeat the image instead
        return engine.model(image[None].expand(len(outputs), *image.shape)).float()
