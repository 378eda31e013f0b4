"""The engine: one flat plan for a batch's requests, the split forward pass and the gradient core.

Pure torch: no TorchServe, no image library. Give it a model, a batch and, per image, what to explain (targets,
layer, method); it gives back the logits, one map per target and its own timings.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from camserve.cam.layers import LayerInfo, LayerNotFoundError, describe_layers, find_layer, forward_hooks, to_grid
from camserve.cam.layers import default_layer as find_default_layer
from camserve.cam.methods.composite import AUGMENTATIONS, IDENTITY, augment, undo_augmentation
from camserve.cam.methods.gradient import minus_half_hvp
from camserve.cam.methods.perturbation import Scoring
from camserve.cam.methods.registry import DEFAULT_METHOD, Family, method_record
from camserve.cam.post import reduce_contributions
from camserve.cam.targets import SOFTMAX, Classes, Head, Target, TopPredicted, objective_seeds

__all__ = ["CamEngine", "CamOutput", "CamRequest"]


@dataclass(frozen=True)
class CamRequest:
    """What to explain for one image: its ``targets``, at ``layer``, with ``method``."""

    targets: Target = TopPredicted(1)
    layer: str | None = None
    """A dotted module path; None: the engine's default layer."""
    method: str = DEFAULT_METHOD
    eigen_smooth: bool = False
    """The first principal component of the channels' contributions instead of their sum (see
    :func:`camserve.cam.post.reduce_contributions`)."""
    aug_smooth: bool = False
    """Average the maps of flipped and brightened copies (see
    :data:`camserve.cam.methods.composite.AUGMENTATIONS`)."""

    @property
    def count(self) -> int:
        """How many maps the request asks for."""
        return self.targets.count


@dataclass(frozen=True)
class CamOutput:
    """What the engine returns for a batch of N images.

    ``logits`` is (N, classes). For image ``n``, ``targets[n]`` lists the explained classes in order, and
    ``maps[n]`` is a (len(targets[n]), h, w) tensor at its layer's resolution (or the input's, for methods that
    combine maps), after ReLU, not yet normalised. ``seconds`` holds the call's wall time: ``forward`` (the
    forward passes up to the logits) and ``cam`` (gradients and maps); on a GPU these are launch times unless the
    caller synchronises.
    """

    logits: Tensor
    targets: list[list[int]]
    maps: list[Tensor]
    seconds: dict[str, float] = field(default_factory=dict)
    kept: dict[str, Tensor] = field(default_factory=dict)
    """The outputs of the modules the call was asked to ``keep``, from the shared forward pass, one row per request
    of ``kept_rows``; empty when that pass was not one plain row per image (``aug_smooth``, composite methods)."""
    kept_rows: tuple[int, ...] = ()


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
        self.head = head
        self._layers: dict[str, LayerInfo] | None = None
        self._default_layer = default_layer
        self._unexpandable: set[frozenset[str]] = set()

    # --- What the engine knows of the model ---

    def layers(self, images: Tensor | None = None) -> dict[str, LayerInfo]:
        """The modules that run once per forward pass, with their layouts and grid shapes: probed once, with an
        image like ``images[0]`` when given, else an RGB ``input_size`` square."""
        if self._layers is None:
            sample = None if images is None else torch.zeros_like(images[:1])
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
        output = self._keep_scoring(_gather(parts, len(requests)), requests)
        forward = output.seconds["forward"]
        return replace(output, seconds={"forward": forward, "cam": time.perf_counter() - started - forward})

    def _keep_scoring(self, output: CamOutput, requests: Sequence[CamRequest]) -> CamOutput:
        """Drop the explained classes of a ``TopPredicted(at_least=...)`` request that score below it, keeping its
        top class when none reaches it (unless ``or_top`` is False): the pairs were explained as its top ``count``,
        in the same pass."""
        filtered = [n for n, r in enumerate(requests) if getattr(r.targets, "at_least", None) is not None]
        if not filtered:
            return output
        scores = self.head.ranking(output.logits[filtered]).cpu()
        targets, maps = list(output.targets), list(output.maps)
        for row, n in enumerate(filtered):
            wanted = requests[n].targets
            keep = [i for i, c in enumerate(targets[n]) if scores[row, c] >= wanted.at_least]
            keep = keep or ([0] if wanted.or_top else [])
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
        size = tuple(images.shape[-2:])
        ranking_seconds = 0.0
        ranked = [
            i for i, request in enumerate(chosen) if request.aug_smooth and not isinstance(request.targets, Classes)
        ]
        if ranked:  # aug_smooth explains the original image's classes: rank them once
            started = time.perf_counter()
            logits = self.logits(images[[indices[i] for i in ranked]]).float()
            ranking_seconds = time.perf_counter() - started
            for i, classes in zip(ranked, self.resolve_targets(logits, [chosen[i] for i in ranked]), strict=True):
                chosen[i] = replace(chosen[i], targets=Classes(classes))
        row_images, row_requests, spans = [], [], []
        for n, request in zip(indices, chosen, strict=True):
            record = method_record(request.method)
            copies = AUGMENTATIONS if request.aug_smooth else ((False, 1.0),)
            request_spans = []
            for part in record.parts(request, self.default_layer) if record.parts else [request]:
                request_spans.append(list(range(len(row_requests), len(row_requests) + len(copies))))
                row_images += [
                    augment(images[n], flip, factor) if request.aug_smooth else images[n] for flip, factor in copies
                ]
                row_requests += [replace(part, aug_smooth=False)] * len(copies)
            spans.append(request_spans)
        output = self.explain_shared(torch.stack(row_images), row_requests)
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

    # --- The shared forward pass ---

    def explain_shared(self, images: Tensor, requests: Sequence[CamRequest], keep: Sequence[str] = ()) -> CamOutput:
        """One forward pass and one gradient call for images whose methods share the forward pass, one plain row
        each (no ``aug_smooth``, no composite method): the core that every plan ends in. The outputs of the modules
        ``keep`` names come back in ``kept``, one row per image."""
        if len(requests) != len(images):
            raise ValueError(f"got {len(requests)} requests for {len(images)} images")
        records = [method_record(request.method) for request in requests]
        if any(record.parts or not record.shares_forward_pass for record in records):
            raise ValueError("explain_shared takes methods that share the forward pass; call the engine instead")
        self.layers(images)
        requests = [
            request if request.layer is not None else replace(request, layer=self.default_layer) for request in requests
        ]
        records = [method_record(request.method) for request in requests]
        layouts = {request.layer: self.spatial_layer(request.layer).layout for request in requests}
        counts = [request.count for request in requests]
        layers = list(dict.fromkeys(request.layer for request in requests))
        modules = {layer: find_layer(self.model, layer) for layer in layers}
        gradient_layers = {
            r.layer for r, record in zip(requests, records, strict=True) if record.family is Family.GRADIENT
        }
        shapley_layers = {r.layer for r, record in zip(requests, records, strict=True) if record.second_order}

        # One row per (image, target) pair: a given class, or the image's r-th predicted one (ranked after the pass).
        device = images.device
        pairs_of_image = torch.tensor(counts)
        pair_image_host = torch.repeat_interleave(torch.arange(len(requests)), pairs_of_image)
        first_pair_host = torch.cumsum(pairs_of_image, 0) - pairs_of_image
        given, ranks = [], []
        for request in requests:
            if isinstance(request.targets, Classes):
                given += request.targets.indices
                ranks += [-1] * request.count
            else:
                given += [0] * request.count
                ranks += range(request.count)
        # Pairs that share a layer, a method and eigen_smooth are computed together. Indices go to the device now: a
        # copy from host memory after the forward pass is queued would wait for it and leave the GPU idle.
        groups: dict[tuple[str, str, bool], list[int]] = {}
        for pair, n in enumerate(pair_image_host.tolist()):
            groups.setdefault((requests[n].layer, requests[n].method, requests[n].eigen_smooth), []).append(pair)
        pair_slot_host = torch.arange(len(given)) - first_pair_host[pair_image_host]
        pair_image, first_pair, pair_slot, pair_given, pair_rank = (
            t.to(device)
            for t in (
                pair_image_host,
                first_pair_host,
                pair_slot_host,
                torch.tensor(given, dtype=torch.long),
                torch.tensor(ranks, dtype=torch.long),
            )
        )
        group_index = {key: torch.tensor(pairs).to(device) for key, pairs in groups.items()}
        wanted_expansion = bool(gradient_layers) and len(given) > len(requests)
        expand = pair_image if wanted_expansion and frozenset(layers) not in self._unexpandable else None
        # ShapleyCAM differentiates twice: fused attention kernels have no second derivative, the math one does.
        attention = sdpa_kernel([SDPBackend.MATH]) if shapley_layers else contextlib.nullcontext()
        started = time.perf_counter()
        with self.autocast(device), attention:
            try:
                stream_logits, activations, per_pair, kept = self._split_forward(
                    images, modules, gradient_layers, expand, keep
                )
                if expand is not None and len(stream_logits) != len(given):
                    raise RuntimeError(f"{len(stream_logits)} rows of logits for {len(given)} pairs")
            except RuntimeError:
                if expand is None:
                    raise
                # Repeating rows inside a block breaks it (a residual branch meets the unrepeated input):
                # differentiate per target slot instead, and remember not to try again for these layers.
                self._unexpandable.add(frozenset(layers))
                expand = None
                stream_logits, activations, per_pair, kept = self._split_forward(
                    images, modules, gradient_layers, None, keep
                )
            forward_done = time.perf_counter()
            logits = stream_logits[first_pair] if expand is not None else stream_logits
            scores = self.head.ranking(logits.detach())
            self._check_targets(scores.shape[1], requests)
            top = max((r.count for r in requests if isinstance(r.targets, TopPredicted)), default=1)
            ranked = scores.topk(top, dim=1).indices
            pair_class = torch.where(pair_rank >= 0, ranked[pair_image, pair_rank.clamp_min(0)], pair_given)
            # The seeds of the gradients: none for activation-only work (a segmenter's objective is not free).
            seeds = self.seeds(logits[pair_image], pair_class) if gradient_layers else None
            own_seeds = {record.name: record for record in records if record.seeds is not None and gradient_layers}
            for record in own_seeds.values():  # a method with its own scalar in place of the objective's
                rows = torch.tensor([records[n].name == record.name for n in pair_image_host.tolist()], device=device)
                seeds[rows] = record.seeds(logits[pair_image[rows]], pair_class[rows]).to(seeds.dtype)
            gradients, corrected = self._gradients(
                stream_logits, activations, gradient_layers, seeds, pair_image, pair_slot, expand is not None,
                shapley_layers,
            )  # fmt: skip
        rows = {  # for each layer, the row of its activations that belongs to each pair
            layer: torch.arange(len(given), device=device) if per_pair[layer] else pair_image for layer in layers
        }
        raw_activations = {layer: activation.detach() for layer, activation in activations.items()}
        activations = {layer: to_grid(activation.detach(), layouts[layer]) for layer, activation in activations.items()}
        gradients = {layer: to_grid(gradient, layouts[layer]) for layer, gradient in gradients.items()}
        corrected = {layer: to_grid(gradient, layouts[layer]) for layer, gradient in corrected.items()}
        context = _MapContext(raw_activations, logits.detach().float(), modules, layouts, corrected)
        pair_maps = self._pair_maps(
            images, counts, activations, gradients, rows, pair_image, pair_class, groups, group_index, context
        )
        classes = iter(pair_class.tolist())
        chosen = [[next(classes) for _ in range(count)] for count in counts]
        seconds = {"forward": forward_done - started}
        return CamOutput(
            logits=logits.detach().float(),
            targets=chosen,
            maps=list(pair_maps),
            seconds=seconds,
            kept=kept,
            kept_rows=tuple(range(len(requests))) if kept else (),
        )

    def _split_forward(
        self,
        images: Tensor,
        modules: dict[str, nn.Module],
        gradient_layers: set[str],
        expand: Tensor | None,
        keep: Sequence[str] = (),
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, bool], dict[str, Tensor]]:
        """The logits, each layer's activation, whether that activation has one row per pair (else per image), and
        the first output of each module ``keep`` names (as the module made it, before the layers' hooks).

        The logits have one row per pair from the first gradient layer on when ``expand`` (each pair's image) is
        given, and one per image otherwise.
        """
        captured: dict[str, list[Tensor]] = {layer: [] for layer in modules}
        per_pair: dict[str, bool] = {}
        kept: dict[str, Tensor] = {}

        def record(name: str) -> Callable[[nn.Module, object, Tensor], None]:
            def hook(module: nn.Module, inputs: object, output: Tensor) -> None:
                # The layer's own output is copied: downstream in-place ops could rewrite it. An earlier module's
                # is kept as it ends up: in-place ops rewrite it for every later reader alike.
                if name not in kept:
                    kept[name] = output.detach().clone() if name in modules else output

            return hook

        def capture(layer: str) -> Callable[[nn.Module, object, Tensor], Tensor]:
            def hook(module: nn.Module, inputs: object, output: Tensor) -> Tensor | None:
                if torch.is_grad_enabled():  # inside the graph: keep this tensor, pass a clone downstream
                    captured[layer].append(output)
                    per_pair[layer] = expand is not None
                    return output.clone()
                if layer in gradient_layers:  # the first gradient layer to run starts the graph
                    leaf = output.detach() if expand is None else output.detach()[expand]
                    captured[layer].append(leaf.requires_grad_(True))
                    per_pair[layer] = expand is not None
                    torch.set_grad_enabled(True)  # the enclosing no_grad() restores the mode on exit
                    return leaf.clone()
                captured[layer].append(output.detach().clone())  # activation-only work: no gradient needed
                per_pair[layer] = False
                return None

            return hook

        recorders = [(find_layer(self.model, name), record(name)) for name in keep]  # first: the modules' outputs
        hooks = recorders + [(module, capture(layer)) for layer, module in modules.items()]
        with forward_hooks(hooks), torch.no_grad():
            logits = self.model(images)
        for layer, outputs in captured.items():
            if len(outputs) != 1:
                raise RuntimeError(f"layer {layer!r} ran {len(outputs)} times in one forward pass; expected once")
        return logits, {layer: outputs[0] for layer, outputs in captured.items()}, per_pair, kept

    @staticmethod
    def _gradients(
        logits: Tensor,
        activations: dict[str, Tensor],
        gradient_layers: set[str],
        seeds: Tensor,
        pair_image: Tensor,
        pair_slot: Tensor,
        rows_are_pairs: bool,
        shapley_layers: set[str] = frozenset(),
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """∂t_p/∂A for every pair p and gradient layer, each a (pairs, K, h, w) tensor, where pair p's target t_p
        has gradient ``seeds[p]`` with respect to its image's logits (one-hot for a class's raw logit y_c).

        When the logits have one row per pair (see :meth:`_split_forward`), row p takes seed p, and one
        ``autograd.grad`` call serves every pair. Else the logits have one row per image, and seed slot t holds each
        image's t-th target, differentiated together through ``is_grads_batched``.

        For ``shapley_layers`` it also returns g − ½·H·A, the gradient minus half the Hessian-vector product
        Σ_ab A_ab ∂g/∂A_ab (ShapleyCAM, Cai et al., 2025: the Shapley-value view of CAM), from a second
        differentiation of the first gradient; a layer after which the network is piecewise linear has H = 0.
        """
        if not gradient_layers:
            return {}, {}
        layers = [layer for layer in activations if layer in gradient_layers]
        inputs = [activations[layer] for layer in layers]
        second_order = bool(shapley_layers)
        if rows_are_pairs or len(seeds) == len(logits):
            grad_outputs = seeds.to(logits.dtype)
            gradients = torch.autograd.grad(logits, inputs, grad_outputs=grad_outputs, create_graph=second_order)
            corrected = {
                layer: minus_half_hvp(g, activations[layer]).float()
                for layer, g in zip(layers, gradients, strict=True)
                if layer in shapley_layers
            }
            return {layer: g.detach().float() for layer, g in zip(layers, gradients, strict=True)}, corrected
        slots = int(pair_slot.max()) + 1
        grad_outputs = torch.zeros((slots, *logits.shape), dtype=logits.dtype, device=logits.device)
        grad_outputs[pair_slot, pair_image] = seeds.to(logits.dtype)
        if not second_order:
            gradients = torch.autograd.grad(logits, inputs, grad_outputs=grad_outputs, is_grads_batched=True)
            return {layer: g[pair_slot, pair_image].float() for layer, g in zip(layers, gradients, strict=True)}, {}
        # Second order, one target slot at a time (is_grads_batched does not nest with a double backward).
        per_slot = [
            torch.autograd.grad(logits, inputs, grad_outputs=grad_outputs[slot], create_graph=True, retain_graph=True)
            for slot in range(slots)
        ]
        gradients = {layer: torch.stack([g[i] for g in per_slot]) for i, layer in enumerate(layers)}
        corrected = {
            layer: torch.stack([minus_half_hvp(g[i], activations[layer]) for g in per_slot])[pair_slot, pair_image]
            for i, layer in enumerate(layers)
            if layer in shapley_layers
        }
        return {layer: g.detach()[pair_slot, pair_image].float() for layer, g in gradients.items()}, corrected

    def _pair_maps(
        self,
        images: Tensor,
        counts: list[int],
        activations: dict[str, Tensor],
        gradients: dict[str, Tensor],
        rows: dict[str, Tensor],
        pair_image: Tensor,
        pair_class: Tensor,
        groups: dict[tuple[str, str, bool], list[int]],
        group_index: dict[tuple[str, str, bool], Tensor],
        context: _MapContext,
    ) -> list[Tensor]:
        """Each image's (T, h, w) maps, computed one (layer, method, eigen_smooth) group at a time, by the method's
        family: a gradient method per pair; the others once per distinct image, then back to pairs."""
        maps: list[Tensor | None] = [None] * len(pair_image)
        with torch.no_grad():
            for (layer, method, eigen_smooth), pairs in groups.items():
                record = method_record(method)
                index = group_index[(layer, method, eigen_smooth)]
                pair_rows = rows[layer][index]
                if record.family is Family.GRADIENT:
                    gradient = (context.corrected if record.second_order else gradients)[layer][index]
                    group_maps = record.combine(activations[layer].detach()[pair_rows].float(), gradient)
                else:  # class-independent work, once per image: unique rows, then back to pairs
                    unique_rows, pair_to_unique = pair_rows.unique(return_inverse=True)
                    unique_activations = activations[layer].detach()[unique_rows].float()
                    if record.family is Family.ACTIVATION:
                        group_maps = record.combine(unique_activations)[pair_to_unique]
                    else:
                        images_of_rows = pair_image[index].unique()
                        scoring = Scoring(
                            module=context.modules[layer],
                            layout=context.layouts[layer],
                            images=images[images_of_rows],
                            activations=unique_activations,
                            raw=context.raw[layer][unique_rows],
                            logits=context.logits[images_of_rows],
                            pair_to_image=pair_to_unique,
                            classes=pair_class[index],
                        )
                        group_maps = record.combine(self, scoring)
                group_maps = reduce_contributions(group_maps, eigen_smooth)
                if len(groups) == 1:  # the common case: every pair, in order; split into views, no copies
                    return list(F.relu(group_maps).split(counts))
                for pair, pair_map in zip(pairs, F.relu(group_maps), strict=True):
                    maps[pair] = pair_map
        per_image, start = [], 0
        for count in counts:
            per_image.append(torch.stack(maps[start : start + count]))
            start += count
        return per_image


@dataclass
class _MapContext:
    """What some methods need beyond the (grid) activations and gradients."""

    raw: dict[str, Tensor]
    """Each layer's output as the network made it (tokens, NHWC)."""
    logits: Tensor
    """(images, classes)."""
    modules: dict[str, nn.Module]
    layouts: dict[str, str]
    corrected: dict[str, Tensor]
    """ShapleyCAM's g − ½·H·A per layer."""


def _gather(parts: Sequence[tuple[list[int], CamOutput]], total: int) -> CamOutput:
    """The outputs of a plan's parts, each for some of the batch's requests, back in the requests' order; their
    forward times add up."""
    if len(parts) == 1 and parts[0][0] == list(range(total)):
        return parts[0][1]
    logits: list[Tensor | None] = [None] * total
    targets: list[list[int] | None] = [None] * total
    maps: list[Tensor | None] = [None] * total
    kept, kept_rows = {}, ()
    for rows, output in parts:
        for i, n in enumerate(rows):
            logits[n], targets[n], maps[n] = output.logits[i], output.targets[i], output.maps[i]
        if output.kept:
            kept, kept_rows = output.kept, tuple(rows[i] for i in output.kept_rows)
    forward = sum(output.seconds.get("forward", 0.0) for _, output in parts)
    return CamOutput(
        logits=torch.stack(logits),
        targets=targets,
        maps=maps,
        seconds={"forward": forward},
        kept=kept,
        kept_rows=kept_rows,
    )
