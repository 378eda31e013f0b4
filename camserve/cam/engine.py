"""The engine: one flat plan for a batch's requests, the split forward pass and the gradient core.

Pure torch: no TorchServe, no image library. Give it a model, a batch and, per image, what to explain (targets,
layer, method); it gives back the logits, one map per target and its own timings.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from camserve.cam.capture import (
    CamOutput,
    CamRequest,
    Captured,
    MapGroup,
    captured_pass,
    gather,
    layer_gradients,
)
from camserve.cam.layers import LayerInfo, LayerNotFoundError, describe_layers, find_layer, to_grid
from camserve.cam.layers import default_layer as find_default_layer
from camserve.cam.methods.registry import method_record
from camserve.cam.post import reduce_contributions
from camserve.cam.rows import Pairs, explain_copies
from camserve.cam.targets import SOFTMAX, Classes, Head, TopPredicted, objective_seeds

__all__ = ["CamEngine", "CamOutput", "CamRequest"]


@dataclass(frozen=True)
class _Plan:
    """A batch's requests grouped once: what runs apart (by method), and the rows of the shared forward pass."""

    apart: dict[str, list[int]]
    """For each method that runs apart, the requests that ask for it."""
    shared: list[int]
    """The requests whose work shares one forward pass."""


class CamEngine:
    """CAMs for a batch of images, each with its own targets, layer and method, from one forward pass.

    The split: the network before the earliest requested layer runs without autograd. That layer's output becomes
    the only leaf that requires a gradient, the rest runs with autograd, and one ``torch.autograd.grad`` call
    differentiates each explained scalar with respect to the requested activations alone: no parameter gradient is
    computed and nothing is written to ``.grad``. The hooks live only for the duration of the call and are removed
    even on error; each captured activation is a clone, so in-place ops downstream (``out += identity``) cannot
    corrupt it.

    The plan: requests whose method runs apart (its record's ``run_apart``) get their own passes; every other
    request adds rows to the one shared forward pass: one row, or one per ``aug_smooth`` copy, per part of a
    composite method. Within the shared pass, when some image asks for several targets, the leaf is repeated once
    per (image, target) pair, so that only the network after the layer runs again for the extra targets. This
    needs a network whose rows do not interact in eval mode, as every classifier's do, and a layer whose output is
    the whole stream: at a layer inside a residual block the repeated rows would meet the block's unrepeated
    shortcut, so there the engine falls back (once; it remembers) to one ``torch.autograd.grad`` call batched over
    target slots with ``is_grads_batched``. Activation-only methods are computed once per image, and a perturbation
    method's passes once per image, whatever the number of targets.

    ``head`` says how the model's output becomes what is explained (:class:`~camserve.cam.targets.Head`): the
    scalar each explanation differentiates, a function of the output, and the per-class scores that rank the classes;
    the default is a single-label classifier's raw logit y_c, ranked by softmax. ``autocast_dtype`` (``torch.bfloat16``,
    ``torch.float16``) runs the network under ``torch.autocast``; maps are combined in float32. Perturbation
    methods score at most ``scorecam_channels`` channels per map (None: every channel), ``scorecam_batch`` masked
    images per forward pass. ``input_size`` is the side of the square input the engine probes the network with,
    once, to learn its layers' shapes and layouts. ``default_layer`` is the layer that requests without one explain
    (found by :func:`camserve.cam.layers.default_layer` if None).
    """

    def __init__(
        self,
        model: nn.Module,
        autocast_dtype: torch.dtype | None = None,
        scorecam_channels: int | None = 64,
        scorecam_batch: int = 32,
        input_size: int = 224,
        default_layer: str | None = None,
        head: Head = SOFTMAX,
    ) -> None:
        if scorecam_channels is not None and scorecam_channels < 1:
            raise ValueError(
                f"scorecam_channels must be at least 1, or None for every channel; got {scorecam_channels}"
            )
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.scorecam_channels = scorecam_channels
        self.scorecam_batch = scorecam_batch
        self.input_size = input_size
        self.input_channels = 3
        """The channels of the model's input (a grayscale model's 1): the service sets them from the spec."""
        self.input_spatial: tuple[int, ...] | None = None
        """A 3D network's input (D, H, W); None: the ``input_size`` square. The service sets it from the spec."""
        self.head = head
        self._layers: dict[str, LayerInfo] | None = None
        self._default_layer = default_layer
        self._unexpandable: set[frozenset[str]] = set()
        self.compiled: dict[str, nn.Module] = {}
        """Layer: the model with the part before it compiled, for passes that hook that layer alone
        (:func:`camserve.cam.compiled.split_at`)."""

    # --- What the engine knows of the model ---

    def layers(self, images: Tensor | None = None) -> dict[str, LayerInfo]:
        """The modules that run once per forward pass, with their layouts and grid shapes: probed once, with an
        image like ``images[0]`` when given, else an RGB ``input_size`` square."""
        if self._layers is None:
            sample = self.sample() if images is None else torch.zeros_like(images[:1])
            self._layers = describe_layers(self.model, self.input_size, sample)
        return self._layers

    @property
    def default_layer(self) -> str:
        if self._default_layer is None:
            self._default_layer = find_default_layer(self.model, self.input_size, self.layers())
        return self._default_layer

    def spatial_layer(self, name: str | None) -> LayerInfo:
        """The probed layer ``name`` (None: the default), or :class:`LayerNotFoundError` if it gives no map."""
        info = self.layers().get(self.default_layer if name is None else name)
        if info is None or info.layout is None:
            raise LayerNotFoundError(str(name), [layer for layer, item in self.layers().items() if item.layout])
        return info

    def sample(self, count: int = 1, random: bool = False) -> Tensor:
        """``count`` blank (or seeded random) inputs of the model's shape: ``input_channels`` × the square
        ``input_size`` (a 3D network's ``input_spatial``), on the model's device; what the engine probes it with."""
        device = next(iter(self.model.parameters()), torch.empty(0)).device
        shape = (count, self.input_channels, *(self.input_spatial or (self.input_size, self.input_size)))
        if random:
            return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        return torch.zeros(shape, device=device)

    def forward_passes(self, request: CamRequest) -> int:
        """The forward passes one image's request costs (its method record's count)."""
        return method_record(request.method).forward_passes(self, request)

    # --- Small shared pieces ---

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The engine's autocast on ``device``: on with ``autocast_dtype``, off without."""
        return torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def logits(self, images: Tensor) -> Tensor:
        """The model's logits for ``images``, with no autograd and no hooks, under the engine's autocast."""
        with torch.no_grad(), self.autocast(images.device):
            return self.model(images)

    def resolve_targets(self, logits: Tensor, requests: Sequence[CamRequest]) -> list[list[int]]:
        """Each request's explained classes, given its image's ``logits`` row: its ``Classes``, or its top ones."""
        scores = self.head.ranking(logits)
        self._check_targets(scores.shape[1], requests)
        return [
            list(request.targets.indices)
            if isinstance(request.targets, Classes)
            else row.topk(request.targets.count).indices.tolist()
            for request, row in zip(requests, scores, strict=True)
        ]

    def seeds(self, outputs: Tensor, classes: Tensor) -> Tensor:
        """∂objective/∂outputs for each row of ``outputs`` and its class (:func:`objective_seeds`)."""
        return objective_seeds(self.head.objective, outputs, classes)

    def objective(self, outputs: Tensor, target: int) -> Tensor:
        """The explained scalar of class ``target`` for each row of ``outputs``, in float32."""
        classes = torch.full((len(outputs),), target, dtype=torch.long, device=outputs.device)
        return self.head.objective(outputs.float(), classes)

    @staticmethod
    def _check_targets(classes: int, requests: Sequence[CamRequest]) -> None:
        for request in requests:
            targets = request.targets
            if isinstance(targets, Classes) and max(targets.indices) >= classes:
                raise ValueError(f"classes must be below {classes}, got {max(targets.indices)}")
            if isinstance(targets, TopPredicted) and targets.count > classes:
                raise ValueError(f"cannot explain the top {targets.count} of {classes} classes")

    # --- The plan ---

    def __call__(self, images: Tensor, requests: Sequence[CamRequest], keep: Sequence[str] = ()) -> CamOutput:
        """Explain ``images``, one request each. ``keep`` names modules whose outputs in the shared forward pass are
        returned in ``kept`` (:mod:`camserve.cam.sanity` replays them)."""
        if len(requests) != len(images):
            raise ValueError(f"got {len(requests)} requests for {len(images)} images")
        plan = self.plan(requests)
        started = time.perf_counter()
        # TorchServe runs inference() under inference_mode; gradients need normal tensors, index tensors included.
        with torch.inference_mode(False):
            images = images.clone() if images.is_inference() else images
            parts = [
                (rows, method_record(method).run_apart(self, images[rows], [requests[n] for n in rows]))
                for method, rows in plan.apart.items()
            ]
            if plan.shared:
                parts.append((plan.shared, self._explain_rows(images, requests, plan.shared, keep)))
        output = self._keep_scoring(gather(parts, len(requests)), requests)
        forward = output.seconds["forward"]
        return replace(output, seconds={"forward": forward, "cam": time.perf_counter() - started - forward})

    def _keep_scoring(self, output: CamOutput, requests: Sequence[CamRequest]) -> CamOutput:
        """Drop the explained classes that a filtering ``TopPredicted`` (``at_least``, ``above``) does not keep: the
        pairs were explained as its top ``count``, in the same pass."""
        filtered = [n for n, r in enumerate(requests) if isinstance(r.targets, TopPredicted) and r.targets.filters]
        if not filtered:
            return output
        scores = self.head.ranking(output.logits[filtered]).cpu()
        targets, maps = list(output.targets), list(output.maps)
        for row, n in enumerate(filtered):
            keep = requests[n].targets.kept([float(scores[row, c]) for c in targets[n]])
            targets[n] = [targets[n][i] for i in keep]
            maps[n] = maps[n][keep]
        return replace(output, targets=targets, maps=maps)

    def plan(self, requests: Sequence[CamRequest]) -> _Plan:
        """Group the batch's requests once: those whose method runs apart, by method, and the rest together."""
        apart: dict[str, list[int]] = {}
        shared = []
        for n, request in enumerate(requests):
            if method_record(request.method).shares_forward_pass:
                shared.append(n)
            else:
                apart.setdefault(request.method, []).append(n)
        return _Plan(apart, shared)

    def _explain_rows(
        self, images: Tensor, requests: Sequence[CamRequest], indices: list[int], keep: Sequence[str] = ()
    ) -> CamOutput:
        """The shared forward pass for the requests ``indices``: each adds a row per ``aug_smooth`` copy per part of
        its method, and its map is merged back from its rows' maps."""
        chosen = [requests[n] for n in indices]
        if not any(r.aug_smooth or method_record(r.method).parts for r in chosen):  # the common case: a row each
            return self.explain_shared(images if len(indices) == len(images) else images[indices], chosen, keep)
        return explain_copies(self, images, chosen, indices)

    # --- The shared forward pass ---

    def with_model(self, model: nn.Module) -> CamEngine:
        """An engine like this one for another model of the same architecture (a randomised copy)."""
        return CamEngine(
            model,
            autocast_dtype=self.autocast_dtype,
            scorecam_channels=self.scorecam_channels,
            scorecam_batch=self.scorecam_batch,
            input_size=self.input_size,
            default_layer=self.default_layer,
            head=self.head,
        )

    def explain_shared(self, images: Tensor, requests: Sequence[CamRequest], keep: Sequence[str] = ()) -> CamOutput:
        """One forward pass and one gradient call for images whose methods share the forward pass, one plain row
        each (no ``aug_smooth``, no composite method): the core that every plan ends in. The outputs of the modules
        ``keep`` names come back in ``kept``, one row per image."""
        requests = self._shared_requests(images, requests)
        records = [method_record(request.method) for request in requests]
        layers = list(dict.fromkeys(request.layer for request in requests))
        modules = {layer: find_layer(self.model, layer) for layer in layers}
        gradient_layers = {r.layer for r, record in zip(requests, records, strict=True) if record.uses_gradients}
        corrections = {r.layer: rec.second_order for r, rec in zip(requests, records, strict=True) if rec.second_order}
        pairs = Pairs.of(requests, images.device)
        # ShapleyCAM differentiates twice: fused attention kernels have no second derivative, the math one does.
        attention = sdpa_kernel([SDPBackend.MATH]) if corrections else contextlib.nullcontext()
        started = time.perf_counter()
        with self.autocast(images.device), attention:
            captured, expanded = self._forward_pairs(images, modules, gradient_layers, pairs, keep)
            forward_done = time.perf_counter()
            logits = captured.outputs[pairs.first] if expanded else captured.outputs
            pair_class = self._pair_classes(logits.detach(), requests, pairs)
            seeds = self._pair_seeds(logits, pair_class, records, pairs) if gradient_layers else None
            gradients, corrected = layer_gradients(
                captured.outputs, captured.activations, gradient_layers, seeds, pairs.image, pairs.slot, expanded,
                corrections,
            )  # fmt: skip
        groups = self._groups(
            images, modules, pairs, pair_class, captured, gradients, corrected, logits.detach().float()
        )
        pair_maps = self._pair_maps(pairs, groups)
        classes = iter(pair_class.tolist())
        chosen = [[next(classes) for _ in range(count)] for count in pairs.counts]
        kept_rows = tuple(range(len(requests))) if captured.kept else ()
        seconds = {"forward": forward_done - started}
        return CamOutput(logits, chosen, list(pair_maps), seconds, captured.kept, kept_rows)

    def _shared_requests(self, images: Tensor, requests: Sequence[CamRequest]) -> list[CamRequest]:
        """The requests with their layers filled in, after checking that each shares the forward pass in one row."""
        if len(requests) != len(images):
            raise ValueError(f"got {len(requests)} requests for {len(images)} images")
        if any(method_record(r.method).parts or not method_record(r.method).shares_forward_pass for r in requests):
            raise ValueError("explain_shared takes methods that share the forward pass; call the engine instead")
        self.layers(images)
        requests = [r if r.layer is not None else replace(r, layer=self.default_layer) for r in requests]
        for request in requests:
            self.spatial_layer(request.layer)
        return requests

    def _forward_pairs(
        self,
        images: Tensor,
        modules: dict[str, nn.Module],
        gradient_layers: set[str],
        pairs: Pairs,
        keep: Sequence[str],
    ) -> tuple[Captured, bool]:
        """The captured pass, with the leaf repeated once per pair when several targets share an image and the
        layer allows it; else (once; the engine remembers) one row per image. Whether the rows are pairs."""
        layers = frozenset(modules)
        wanted = bool(gradient_layers) and len(pairs.image) > len(pairs.counts)
        expand = pairs.image if wanted and layers not in self._unexpandable else None
        model = self.compiled.get(next(iter(modules)), self.model) if len(modules) == 1 and not keep else self.model
        try:
            captured = captured_pass(model, images, modules, gradient_layers, expand, keep)
            if expand is not None and len(captured.outputs) != len(pairs.image):
                raise RuntimeError(f"{len(captured.outputs)} rows of logits for {len(pairs.image)} pairs")
        except RuntimeError:
            if expand is None:
                raise
            # Repeating rows inside a block breaks it (a residual branch meets the unrepeated input): differentiate
            # per target slot instead, and remember not to try again for these layers.
            self._unexpandable.add(layers)
            expand = None
            captured = captured_pass(model, images, modules, gradient_layers, None, keep)
        return captured, expand is not None

    def _pair_classes(self, logits: Tensor, requests: Sequence[CamRequest], pairs: Pairs) -> Tensor:
        """Each pair's class: its given one, or its image's r-th highest by the head's ranking."""
        scores = self.head.ranking(logits)
        self._check_targets(scores.shape[1], requests)
        top = max((r.count for r in requests if isinstance(r.targets, TopPredicted)), default=1)
        ranked = scores.topk(top, dim=1).indices
        return torch.where(pairs.ranked, ranked[pairs.image, pairs.rank], pairs.given)

    def _pair_seeds(self, logits: Tensor, pair_class: Tensor, records: list, pairs: Pairs) -> Tensor:
        """∂scalar/∂logits for each pair: the head's objective, or a method's own scalar (Finer-CAM's)."""
        seeds = self.seeds(logits[pairs.image], pair_class)
        own = {record.name: record for record in records if record.seeds is not None}
        for record in own.values():
            rows = torch.tensor(
                [records[n].name == record.name for n in pairs.image_host.tolist()], device=seeds.device
            )
            seeds[rows] = record.seeds(logits[pairs.image[rows]], pair_class[rows]).to(seeds.dtype)
        return seeds

    def _groups(
        self, images, modules, pairs, pair_class, captured, gradients, corrected, logits
    ) -> dict[tuple, MapGroup]:
        """What each group of pairs (one layer, method and ``eigen_smooth``) reads, as its method record takes it:
        each layer's grids made once, then each group's rows of them."""
        layouts = {layer: self.spatial_layer(layer).layout for layer in modules}
        raw = {layer: captured.activations[layer].detach() for layer in modules}
        grids = {layer: to_grid(raw[layer], layouts[layer]) for layer in modules}
        gradients = {layer: to_grid(g, layouts[layer]) for layer, g in gradients.items()}
        corrected = {layer: to_grid(g, layouts[layer]) for layer, g in corrected.items()}
        every = torch.arange(len(pairs.image), device=images.device)
        groups = {}
        for key, index in pairs.group_index.items():
            layer = key[0]
            groups[key] = MapGroup(
                activations=grids[layer],
                rows=(every if captured.per_pair[layer] else pairs.image)[index],
                classes=pair_class[index],
                gradients=gradients[layer][index] if layer in gradients else None,
                corrected=corrected[layer][index] if layer in corrected else None,
                pair_image=pairs.image[index],
                images=images,
                raw=raw[layer],
                logits=logits,
                module=modules[layer],
                layout=layouts[layer],
            )
        return groups

    def _pair_maps(self, pairs: Pairs, groups: dict[tuple, MapGroup]) -> list[Tensor]:
        """Each image's (T, h, w) maps, one group at a time, as each group's method record computes them."""
        maps: list[Tensor | None] = [None] * len(pairs.image)
        with torch.no_grad():
            for (layer, method, eigen_smooth), group in groups.items():
                group_maps = F.relu(reduce_contributions(method_record(method).maps(self, group), eigen_smooth))
                if len(groups) == 1:  # the common case: every pair, in order; split into views, no copies
                    return list(group_maps.split(pairs.counts))
                for pair, pair_map in zip(pairs.groups[(layer, method, eigen_smooth)], group_maps, strict=True):
                    maps[pair] = pair_map
        per_image, start = [], 0
        for count in pairs.counts:
            per_image.append(torch.stack(maps[start : start + count]))
            start += count
        return per_image
