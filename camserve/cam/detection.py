"""Detectors: their detections and an explanation of each, from one forward pass of the batch.

A detector in torchvision's convention takes a list of RGB images in [0, 1], each at its own size; its transform
normalises them, resizes them (a Faster R-CNN's shorter side to 800, an SSD's whole image to 300²) and pads them into
one batch, and it returns one ``{"boxes", "labels", "scores"}`` per image (``masks`` for Mask R-CNN, ``keypoints``
for Keypoint R-CNN), its boxes in each image's own pixels.

The explained scalar of a detection (box b, class c) is :func:`box_score`, pytorch-grad-cam's
``FasterRCNNBoxScoreTarget``: among the output's boxes, the one b̂ of greatest IoU with b counts when its class is c
and IoU(b, b̂) > 0.5, and the scalar is IoU(b, b̂) + score(b̂) (0 when none counts). In the pass that found the
detection, b̂ is the detection itself.

The pass is split as the classifier engine splits it (:class:`~camserve.cam.engine.CamEngine`): the network before
the explained layer runs without autograd, the layer's output becomes the one leaf that requires a gradient, and
each explained detection's scalar is differentiated with respect to that activation alone. A detector's rows share
per-image bookkeeping (its transform's image sizes), so they cannot be repeated per detection: the t-th detection
of every image is differentiated together, one ``torch.autograd.grad`` call per slot t (the images do not interact,
so each image's gradient is its own detection's).

A two-stage detector (torchvision's R-CNNs: a ``roi_heads`` with its box pooling, head and predictor) takes a
shorter way back (:func:`_roi_scores`). Its proposals are detached, so a detection's score reaches the layer only
through the box head's view of its own proposal; yet a backward pass from the full output pools, and scatters back,
every proposal (torchvision's ``roi_align`` backward, which was half of the time). Each explained detection's
proposal is found again among the head's (the row whose class box and score are the detection's, exactly), and the
head is replayed on those proposals alone, on the same feature maps: the same scalar, differentiated through a
head of T rows instead of hundreds. Where a detection cannot be found exactly, the full path runs.

The maps come at the layer's grid, which covers the transform's padded batch: each is cut to its image's share of
the grid and brought to the size of the image the detector was given.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.cam.capture import MapGroup, captured_pass
from camserve.cam.layers import Layout, find_layer, to_grid
from camserve.cam.methods.registry import Method, method_record
from camserve.cam.post import reduce_contributions, upsample
from camserve.settings import DEFAULT_MAX_DETECTIONS, DEFAULT_SCORE_THRESHOLD

__all__ = [
    "Detection",
    "DetectionOutput",
    "DetectionRequest",
    "box_score",
    "explain_detections",
    "matched_score",
]

IOU_THRESHOLD = 0.5
"""A box of the output stands for the explained detection when its IoU with it exceeds this and its class is the
same (pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``)."""


@dataclass(frozen=True)
class Detection:
    """One detection, in the pixels of the image the detector was given."""

    box: tuple[float, float, float, float]
    """(x0, y0, x1, y1)."""
    label: int
    score: float


@dataclass(frozen=True)
class DetectionRequest:
    """What one image asks of a detector: which detections to keep, and which of them to explain how."""

    layer: str
    method: str
    eigen_smooth: bool = False
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    max_detections: int = DEFAULT_MAX_DETECTIONS
    explain: int = 1
    """Explain the top ``explain`` detections kept, when ``chosen`` is None."""
    chosen: tuple[int, ...] | None = None
    """Explain these detections, by their index among those kept."""


@dataclass
class DetectionOutput:
    """For each image: its detections (highest score first), the indices of those explained, one map per explained
    detection (T, H, W) at the size of the image the detector was given, the masks of a Mask R-CNN's detections
    (D, H, W) probabilities or None, the keypoints of a Keypoint R-CNN's (D, K, 3) or None, and the image's error
    (a chosen detection that does not exist) or None."""

    detections: list[list[Detection]]
    explained: list[list[int]]
    maps: list[Tensor]
    masks: list[Tensor | None]
    keypoints: list[Tensor | None]
    errors: list[str | None]
    seconds: dict[str, float] = field(default_factory=dict)


def _match(output: Mapping[str, Tensor], box: Tensor, label: int) -> tuple[Tensor, int] | None:
    """The IoU and index of the output box that stands for detection (``box``, ``label``): the box of greatest IoU
    with it, when its class is ``label`` and the IoU exceeds :data:`IOU_THRESHOLD`; None when there is none."""
    from torchvision.ops import box_iou

    boxes = output["boxes"]
    if len(boxes) == 0:
        return None
    ious = box_iou(box[None].to(boxes.device, boxes.dtype), boxes)
    index = ious.argmax()
    if ious[0, index] > IOU_THRESHOLD and int(output["labels"][index]) == int(label):
        return ious[0, index], index
    return None


def box_score(output: Mapping[str, Tensor], box: Tensor, label: int) -> Tensor:
    """pytorch-grad-cam's ``FasterRCNNBoxScoreTarget`` for one detection (``box`` (4,), ``label``) of one image's
    ``output``: IoU(b, b̂) + score(b̂) for the box b̂ that :func:`_match` finds, else 0."""
    match = _match(output, box, label)
    if match is None:
        return output["boxes"].new_zeros(())
    iou, index = match
    return iou + output["scores"][index]


def matched_score(output: Mapping[str, Tensor], box: Tensor, label: int) -> float:
    """score(b̂) alone, for the box b̂ that :func:`_match` finds, else 0: what faithfulness measures of a detection."""
    match = _match(output, box, label)
    return 0.0 if match is None else float(output["scores"][match[1]])


def _kept(output: Mapping[str, Tensor], request: DetectionRequest) -> Tensor:
    """The indices of the output's detections at or above the request's score threshold, highest score first, at
    most ``max_detections``."""
    scores = output["scores"].detach().float()
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[scores[order] >= request.score_threshold]
    return order[: request.max_detections]


def explain_detections(
    model: nn.Module,
    images: Sequence[Tensor],
    requests: Sequence[DetectionRequest],
    layouts: Mapping[str, str],
    autocast=None,
) -> DetectionOutput:
    """Detect in ``images`` (each (3, H, W) in [0, 1]) and explain each request's detections, in one forward pass.

    ``layouts`` gives each requested layer's layout (``camserve.cam.layers``); a gradient method needs a layer
    whose output is one tensor. ``autocast`` is the engine's autocast context for the images' device, if any.
    """
    if len(images) != len(requests):
        raise ValueError(f"got {len(requests)} requests for {len(images)} images")
    records = [method_record(request.method) for request in requests]
    modules = {layer: find_layer(model, layer) for layer in dict.fromkeys(request.layer for request in requests)}
    gradient_layers = {r.layer for r, record in zip(requests, records, strict=True) if record.uses_gradients}
    for layer in gradient_layers:
        if Layout(layouts[layer]).pyramid:
            raise ValueError(f"layer {layer} is a feature pyramid: a gradient method needs a layer of one tensor")
    batch: dict[str, object] = {}
    heads = _roi_heads(model, [modules[layer] for layer in gradient_layers])
    extra = _batch_hooks(model, heads, batch)
    started = time.perf_counter()
    with torch.inference_mode(False):
        images = [image.clone() if image.is_inference() else image for image in images]
        with autocast or torch.autocast("cpu", enabled=False):
            captured = captured_pass(model, list(images), modules, gradient_layers, extra_hooks=extra)
        forward_done = time.perf_counter()
        outputs = captured.outputs
        found = [_found(output, request) for output, request in zip(outputs, requests, strict=True)]
        targets = [
            [(output["boxes"].detach()[kept[d]], int(output["labels"][kept[d]])) for d in chosen]
            for output, (kept, _, chosen, _) in zip(outputs, found, strict=True)
        ]
        gradient_layouts = {layer: layouts[layer] for layer in gradient_layers}
        scores = _roi_scores(heads, batch, outputs, targets, images, autocast) if heads is not None else None
        gradients = _gradients(outputs, targets, captured.activations, gradient_layouts, scores)
    maps = []
    for n, request in enumerate(requests):
        count = len(found[n][2])
        grid = to_grid(captured.activations[request.layer], layouts[request.layer])[n : n + 1].detach().float()
        gradient = gradients[request.layer][n] if request.layer in gradients else None
        grid_maps = _grid_maps(records[n], grid, gradient, count, request.eigen_smooth)
        maps.append(_on_image(grid_maps, batch, images, n))
    kept_rows = [kept for kept, _, _, _ in found]
    masks = [output["masks"].detach()[kept, 0].float() if "masks" in output else None
             for output, kept in zip(outputs, kept_rows, strict=True)]  # fmt: skip
    keypoints = [output["keypoints"].detach()[kept].float() if "keypoints" in output else None
                 for output, kept in zip(outputs, kept_rows, strict=True)]  # fmt: skip
    seconds = {"forward": forward_done - started, "cam": time.perf_counter() - forward_done}
    detections, explained, errors = ([item[i] for item in found] for i in (1, 2, 3))
    return DetectionOutput(detections, explained, maps, masks, keypoints, errors, seconds)


def _found(output: Mapping[str, Tensor], request: DetectionRequest):
    """One image's kept indices, its detections, the indices of those it explains, and its error (a chosen
    detection that does not exist) or None."""
    kept = _kept(output, request)
    boxes = output["boxes"].detach().float()[kept]
    labels, scores = output["labels"][kept].tolist(), output["scores"].detach().float()[kept].tolist()
    detections = [
        Detection(tuple(round(v, 2) for v in box.tolist()), label, round(score, 6))
        for box, label, score in zip(boxes, labels, scores, strict=True)
    ]
    if request.chosen is None:
        return kept, detections, list(range(min(request.explain, len(kept)))), None
    missing = [i for i in request.chosen if i >= len(kept)]
    if not missing:
        return kept, detections, list(request.chosen), None
    error = (
        f"detection {missing[0]} does not exist: this image has {len(kept)} detection"
        f"{'' if len(kept) == 1 else 's'} at or above score_threshold {request.score_threshold}"
        + (f" (indices 0 to {len(kept) - 1})" if len(kept) else "")
    )
    return kept, detections, [], error


def _grid_maps(record: Method, grid: Tensor, gradient: Tensor | None, count: int, eigen_smooth: bool) -> Tensor:
    """One image's (count, h, w) maps of its explained detections at the layer's grid, as the method's record
    computes them from its (1, K, h, w) ``grid`` and the detections' (count, K, h, w) gradients."""
    if count == 0:
        return grid.new_zeros((0, *grid.shape[-2:]))
    rows = torch.zeros(count, dtype=torch.long, device=grid.device)
    group = MapGroup(activations=grid, rows=rows, classes=rows, gradients=gradient)
    with torch.no_grad():
        return F.relu(reduce_contributions(record.maps(None, group), eigen_smooth))


def _gradients(
    outputs: Sequence[Mapping[str, Tensor]],
    targets: list[list[tuple[Tensor, int]]],
    activations: Mapping[str, Tensor],
    layouts: Mapping[str, str],
    scores: list[list[Tensor]] | None = None,
) -> dict[str, list[Tensor]]:
    """For each gradient layer, each image's (T, K, h, w) grids ∂s/∂A of its explained detections' :func:`box_score`
    s, one ``autograd.grad`` call per slot: the t-th explained detection of every image at once. ``scores``: the
    same scalars from :func:`_roi_scores`, when it found them."""
    if not layouts:
        return {}
    layers = [layer for layer in activations if layer in layouts]
    leaves = [activations[layer] for layer in layers]
    slots = max((len(pairs) for pairs in targets), default=0)
    per_slot: dict[str, list[list[Tensor]]] = {layer: [[] for _ in outputs] for layer in layers}
    for slot in range(slots):
        if scores is None:
            slot_scores = [box_score(outputs[n], *pairs[slot]) for n, pairs in enumerate(targets) if slot < len(pairs)]
        else:
            slot_scores = [image[slot] for image in scores if slot < len(image)]
        total = torch.stack(slot_scores).sum()
        grads = [None] * len(leaves)
        if total.requires_grad:
            grads = torch.autograd.grad(total, leaves, retain_graph=slot < slots - 1, allow_unused=True)
        for layer, leaf, grad in zip(layers, leaves, grads, strict=True):
            grid = to_grid(torch.zeros_like(leaf) if grad is None else grad, layouts[layer]).float()
            for n, pairs in enumerate(targets):
                if slot < len(pairs):
                    per_slot[layer][n].append(grid[n])
    return {layer: [torch.stack(grids) if grids else None for grids in images] for layer, images in per_slot.items()}


def _roi_heads(model: nn.Module, layers: Sequence[nn.Module]) -> nn.Module | None:
    """A two-stage detector's box head (torchvision's ``RoIHeads``), when every gradient layer comes before it."""
    heads = getattr(model, "roi_heads", None)
    parts = ("box_roi_pool", "box_head", "box_predictor", "box_coder")
    if not layers or not isinstance(heads, nn.Module) or not all(hasattr(heads, part) for part in parts):
        return None
    inside = set(map(id, heads.modules()))
    return None if any(id(layer) in inside for layer in layers) else heads


def _batch_hooks(model: nn.Module, heads: nn.Module | None, batch: dict[str, object]) -> list[tuple[nn.Module, object]]:
    """Hooks that keep, in ``batch``, the transform's image sizes and padded size, and, for a two-stage detector,
    the box head's inputs (feature maps, proposals, image sizes) and its predictor's output."""

    def remember_batch(module: nn.Module, inputs: object, output: object) -> None:
        image_list = output[0]
        batch["sizes"] = [tuple(size) for size in image_list.image_sizes]
        batch["padded"] = tuple(image_list.tensors.shape[-2:])

    transform = getattr(model, "transform", None)
    hooks = [(transform, remember_batch)] if isinstance(transform, nn.Module) else []
    if heads is None:
        return hooks

    def remember_inputs(module: nn.Module, inputs: tuple, output: object) -> None:
        batch["features"], batch["proposals"], batch["image_shapes"] = inputs[:3]

    def remember_predictions(module: nn.Module, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        batch["predictions"] = output

    return hooks + [(heads, remember_inputs), (heads.box_predictor, remember_predictions)]


def _class_boxes(heads: nn.Module, regression: Tensor, proposals: list[Tensor], batch, images) -> list[Tensor]:
    """Each image's (P, classes, 4) class boxes in the pixels of the image the detector was given, as the head's
    post-processing and the transform's make them: decoded, clipped to the transform's size, resized back."""
    from torchvision.models.detection.transform import resize_boxes
    from torchvision.ops import clip_boxes_to_image

    decoded = heads.box_coder.decode(regression, proposals).split([len(p) for p in proposals])
    shapes = batch["image_shapes"]
    return [
        resize_boxes(clip_boxes_to_image(boxes, shapes[n]).reshape(-1, 4), shapes[n], images[n].shape[-2:]).reshape(
            boxes.shape
        )
        for n, boxes in enumerate(decoded)
    ]


def _roi_scores(heads, batch, outputs, targets, images, autocast=None) -> list[list[Tensor]] | None:
    """Each explained detection's :func:`box_score` from the box head replayed on its own proposal (module
    docstring); None when a detection's proposal is not found exactly, or its match is not itself."""
    from torchvision.ops import box_iou

    if "predictions" not in batch or not any(f.requires_grad for f in batch["features"].values()):
        return None
    logits, regression = (t.detach().float() for t in batch["predictions"])
    proposals = batch["proposals"]
    with torch.no_grad():
        boxes = _class_boxes(heads, regression, proposals, batch, images)
        probabilities = F.softmax(logits, -1).split([len(p) for p in proposals])
    rows = []
    for n, pairs in enumerate(targets):
        rows.append([])
        for box, label in pairs:
            match = _match(outputs[n], box, label)
            if match is None or not torch.equal(outputs[n]["boxes"][match[1]].detach(), box):
                return None  # its best match is another box: the full path decides
            distance = (boxes[n][:, label] - box.float()).abs().amax(1)
            distance += (probabilities[n][:, label] - outputs[n]["scores"][match[1]].detach().float()).abs()
            row = int(distance.argmin())
            if distance[row] > 1e-4:
                return None
            rows[n].append(row)
    chosen = [proposals[n][rows[n]] for n in range(len(targets))]
    with torch.enable_grad(), autocast or torch.autocast("cpu", enabled=False):
        pooled = heads.box_roi_pool(batch["features"], chosen, batch["image_shapes"])
        logits, regression = heads.box_predictor(heads.box_head(pooled))
    replayed = _class_boxes(heads, regression.float(), chosen, batch, images)
    probabilities = F.softmax(logits.float(), -1).split([len(c) for c in chosen])
    scores = []
    for n, pairs in enumerate(targets):
        scores.append([])
        for t, (box, label) in enumerate(pairs):
            # The replayed box carries the head's gradient with the found box's exact value: at b̂ = b, IoU's min
            # and max meet in ties, whose gradient depends on exact equality (a last-bit difference of the head's
            # smaller product would turn it from none into 1/area).
            found = box.to(replayed[n].dtype)
            replica = replayed[n][t, label] - replayed[n][t, label].detach() + found
            scores[n].append(box_iou(found[None], replica[None])[0, 0] + probabilities[n][t, label])
    return scores


def _on_image(grid_maps: Tensor, batch: Mapping[str, object], images: Sequence[Tensor], n: int) -> Tensor:
    """(T, h, w) maps over the transform's padded batch, image ``n``'s share of them brought to the size of the image
    the detector was given, in one bilinear resampling (``align_corners=False``).

    The grid covers the transform's padded batch; the image's share is the fraction inner/padded of it, at the
    transform's size (a Faster R-CNN's shorter side of 800, say). Output pixel u samples the grid at
    (u + ½)·(w·inner/padded)/W − ½, as one resize of that share would: resizing the grid to the transform's size
    first and then to the image's would interpolate twice and blur the map by the transform's scale. Without
    padding (the share is the whole grid) this is the plain resize pytorch-grad-cam makes. Without a transform's
    sizes, the grid covers the image."""
    height, width = images[n].shape[-2:]
    if len(grid_maps) == 0:
        return grid_maps.new_zeros((0, height, width))
    if "sizes" in batch:
        padded_h, padded_w = batch["padded"]
        inner_h, inner_w = batch["sizes"][n]
        if (inner_h, inner_w) != (padded_h, padded_w):
            # scale_factor sets the sampling step (grid pixels per output pixel) directly; the output then covers
            # the padded grid, of which the first (height, width) pixels are the image's share.
            grid_h, grid_w = grid_maps.shape[-2:]
            factor = (height * padded_h / (grid_h * inner_h), width * padded_w / (grid_w * inner_w))
            full = F.interpolate(
                grid_maps[None], scale_factor=factor, mode="bilinear", align_corners=False, recompute_scale_factor=False
            )[0]
            return full[:, :height, :width]
    return upsample(grid_maps[None], (height, width))[0]
