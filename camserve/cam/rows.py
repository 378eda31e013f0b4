"""The rows of the engine's shared forward pass: the copies and parts of requests (``aug_smooth``'s copies, a
composite method's parts), and the (image, target) pairs of one pass."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from camserve.cam.augment import AUGMENTATIONS, IDENTITY, augment, undo_augmentation
from camserve.cam.capture import CamOutput, CamRequest, MethodEngine
from camserve.cam.methods.registry import method_record
from camserve.cam.targets import Classes

__all__ = ["Pairs", "explain_copies"]


def explain_copies(engine: MethodEngine, images: Tensor, chosen: list[CamRequest], indices: list[int]) -> CamOutput:
    """The shared forward pass for the requests ``chosen`` of the images ``indices``: each adds a row per
    ``aug_smooth`` copy per part of its method, and its map is merged back from its rows' maps."""
    size = tuple(images.shape[-2:])
    ranking_seconds = 0.0
    ranked = [i for i, request in enumerate(chosen) if request.aug_smooth and not isinstance(request.targets, Classes)]
    if ranked:  # aug_smooth explains the original image's classes: rank them once
        started = time.perf_counter()
        logits = engine.logits(images[[indices[i] for i in ranked]]).float()
        ranking_seconds = time.perf_counter() - started
        for i, classes in zip(ranked, engine.resolve_targets(logits, [chosen[i] for i in ranked]), strict=True):
            chosen[i] = replace(chosen[i], targets=Classes(classes))
    row_images, row_requests, spans = [], [], []
    for n, request in zip(indices, chosen, strict=True):
        record = method_record(request.method)
        copies = AUGMENTATIONS if request.aug_smooth else ((False, 1.0),)
        request_spans = []
        for part in record.parts(request, engine.default_layer) if record.parts else [request]:
            request_spans.append(list(range(len(row_requests), len(row_requests) + len(copies))))
            row_images += [
                augment(images[n], flip, factor) if request.aug_smooth else images[n] for flip, factor in copies
            ]
            row_requests += [replace(part, aug_smooth=False)] * len(copies)
        spans.append(request_spans)
    output = engine.explain_shared(torch.stack(row_images), row_requests)
    logits, targets, maps = [], [], []
    for request, request_spans in zip(chosen, spans, strict=True):
        first = request_spans[0]
        if request.aug_smooth:
            part_maps = [undo_augmentation([output.maps[r] for r in rows], size) for rows in request_spans]
            logits.append(output.logits[first[IDENTITY]])
        else:
            part_maps = [output.maps[rows[0]] for rows in request_spans]
            logits.append(output.logits[first[0]])
        merge = method_record(request.method).merge
        maps.append(merge(part_maps, size) if merge else part_maps[0])
        targets.append(output.targets[first[0]])
    seconds = {"forward": output.seconds["forward"] + ranking_seconds}
    return CamOutput(logits=torch.stack(logits), targets=targets, maps=maps, seconds=seconds)


@dataclass(frozen=True)
class Pairs:
    """One row per (image, target) pair of a shared pass: a given class, or the image's r-th predicted one (ranked
    after the pass). Pairs that share a layer, a method and ``eigen_smooth`` form a group, computed together."""

    counts: list[int]
    image_host: Tensor
    image: Tensor
    first: Tensor
    """Each image's first pair."""
    slot: Tensor
    """Each pair's place among its image's targets."""
    given: Tensor
    rank: Tensor
    ranked: Tensor
    """Whether the pair's class is its image's ``rank``-th predicted one (else ``given``)."""
    groups: dict[tuple[str, str, bool], list[int]]
    group_index: dict[tuple[str, str, bool], Tensor]

    @classmethod
    def of(cls, requests: Sequence[CamRequest], device: torch.device) -> Pairs:
        counts = [request.count for request in requests]
        per_image = torch.tensor(counts)
        image = torch.repeat_interleave(torch.arange(len(requests)), per_image)
        first = torch.cumsum(per_image, 0) - per_image
        given, ranks, ranked = [], [], []
        for request in requests:
            chooses = isinstance(request.targets, Classes)
            given += request.targets.indices if chooses else [0] * request.count
            ranks += [0] * request.count if chooses else range(request.count)
            ranked += [not chooses] * request.count
        groups: dict[tuple[str, str, bool], list[int]] = {}
        for pair, n in enumerate(image.tolist()):
            groups.setdefault((requests[n].layer, requests[n].method, requests[n].eigen_smooth), []).append(pair)
        # Indices go to the device now: a copy from host memory after the forward pass is queued would wait for it
        # and leave the GPU idle.
        return cls(
            counts=counts,
            image_host=image,
            image=image.to(device),
            first=first.to(device),
            slot=(torch.arange(len(given)) - first[image]).to(device),
            given=torch.tensor(given, dtype=torch.long).to(device),
            rank=torch.tensor(ranks, dtype=torch.long).to(device),
            ranked=torch.tensor(ranked, dtype=torch.bool).to(device),
            groups=groups,
            group_index={key: torch.tensor(members).to(device) for key, members in groups.items()},
        )
