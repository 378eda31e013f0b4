"""The engine's public interface for methods: what a request asks, what a call returns, the captured pass, and a
way to add a map to a result.

Every method is written against this module and the :class:`MethodEngine` it is handed; none imports the engine.

- :func:`captured_pass`: one forward pass with hooks that capture the layers' activations, the network before the
  first gradient layer without autograd, that layer's output the only leaf that requires a gradient;
- :func:`layer_gradients`: the gradients of a batch of scalars with respect to those activations alone;
- :func:`by_layer`, :func:`slot_classes`, :func:`add_slot` and :func:`run_by_layer`: the loop of the methods that
  run apart (requests by layer, one gradient call per target slot, each slot's maps added to its images);
- :func:`gather`: parts of a plan back in the requests' order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from camserve.cam.layers import LayerInfo, find_layer, forward_hooks
from camserve.cam.targets import Head, Target, TopPredicted

__all__ = [
    "DEFAULT_METHOD",
    "CamOutput",
    "CamRequest",
    "Captured",
    "MapGroup",
    "MethodEngine",
    "add_slot",
    "by_layer",
    "captured_pass",
    "gather",
    "layer_gradients",
    "run_by_layer",
    "slot_classes",
]


DEFAULT_METHOD = "gradcam"
"""The method of a request that names none (the registry's first record)."""


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
    """Average the maps of flipped and brightened copies (see :data:`camserve.cam.augment.AUGMENTATIONS`)."""

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


class MethodEngine(Protocol):
    """What a method may ask of the engine that runs it (:class:`camserve.cam.engine.CamEngine`)."""

    model: nn.Module
    head: Head
    input_size: int
    scorecam_channels: int | None
    scorecam_batch: int

    @property
    def default_layer(self) -> str: ...

    def spatial_layer(self, name: str | None) -> LayerInfo: ...

    def sample(self, count: int = 1, random: bool = False) -> Tensor: ...

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager: ...

    def logits(self, images: Tensor) -> Tensor: ...

    def resolve_targets(self, logits: Tensor, requests: Sequence[CamRequest]) -> list[list[int]]: ...

    def seeds(self, outputs: Tensor, classes: Tensor) -> Tensor: ...

    def objective(self, outputs: Tensor, target: int) -> Tensor: ...

    def explain_shared(self, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput: ...


@dataclass(frozen=True)
class MapGroup:
    """What a method reads for the pairs of one group (one layer, method and ``eigen_smooth``): a method record's
    :meth:`~camserve.cam.methods.registry.Method.maps` turns it into each pair's contributions."""

    activations: Tensor
    """The layer's grids (rows, K, h, w), detached: one row per image, or per pair."""
    rows: Tensor
    """Each pair's row of ``activations``."""
    classes: Tensor
    """Each pair's explained class."""
    gradients: Tensor | None = None
    """Each pair's ∂scalar/∂A (pairs, K, h, w), for a method that reads gradients."""
    corrected: Tensor | None = None
    """Each pair's gradient after its method's second-order correction (ShapleyCAM's g − ½·H·A)."""
    pair_image: Tensor | None = None
    """Each pair's image, a row of ``images`` and ``logits``: for the methods that score extra passes."""
    images: Tensor | None = None
    raw: Tensor | None = None
    """The layer's output as the network made it (tokens, NHWC), one row per row of ``activations``."""
    logits: Tensor | None = None
    module: nn.Module | None = None
    layout: str | None = None


# --- The captured pass ---


@dataclass
class Captured:
    """One captured forward pass: the model's ``outputs``, each layer's ``activations`` (the gradient layers' in
    the graph), whether each has one row per pair (``per_pair``), and the outputs of the modules asked to be kept."""

    outputs: object
    activations: dict[str, object]
    per_pair: dict[str, bool]
    kept: dict[str, Tensor]


def _detached_copy(output: object) -> object:
    """A detached copy of a module's output: a tensor, or a mapping of them (a feature pyramid's)."""
    if isinstance(output, Tensor):
        return output.detach().clone()
    return type(output)((key, value.detach()) for key, value in output.items())


def captured_pass(
    model: nn.Module,
    inputs: object,
    modules: dict[str, nn.Module],
    gradient_layers: set[str] | frozenset[str],
    expand: Tensor | None = None,
    keep: Sequence[str] = (),
    extra_hooks: Sequence[tuple[nn.Module, Callable]] = (),
) -> Captured:
    """``model(inputs)`` with the activations of ``modules`` captured, split at the first gradient layer to run:
    the network before it runs without autograd, its output becomes the one leaf that requires a gradient (each
    pair's row of it when ``expand``, each pair's image, is given), and the rest runs with autograd. Layers after it
    are captured in the graph; layers outside ``gradient_layers`` before it are detached copies. Each captured
    activation is kept and a clone passed downstream, so that in-place ops cannot rewrite it. ``keep`` names
    modules whose first output is kept as the module made it; ``extra_hooks`` run in the same pass."""
    captured: dict[str, list[object]] = {layer: [] for layer in modules}
    per_pair: dict[str, bool] = {}
    kept: dict[str, Tensor] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: object, output: Tensor) -> None:
            # The layer's own output is copied: downstream in-place ops could rewrite it. An earlier module's is
            # kept as it ends up: in-place ops rewrite it for every later reader alike.
            if name not in kept:
                kept[name] = output.detach().clone() if name in modules else output

        return hook

    def capture(layer: str) -> Callable:
        def hook(module: nn.Module, args: object, output: Tensor) -> Tensor | None:
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
            captured[layer].append(_detached_copy(output))  # activation-only work: no gradient needed
            per_pair[layer] = False
            return None

        return hook

    recorders = [(find_layer(model, name), record(name)) for name in keep]  # first: the modules' outputs
    hooks = recorders + [(module, capture(layer)) for layer, module in modules.items()] + list(extra_hooks)
    with forward_hooks(hooks), torch.no_grad():
        outputs = model(inputs)
    for layer, values in captured.items():
        if len(values) != 1:
            raise RuntimeError(f"layer {layer!r} ran {len(values)} times in one forward pass; expected once")
    return Captured(outputs, {layer: values[0] for layer, values in captured.items()}, per_pair, kept)


def layer_gradients(
    logits: Tensor,
    activations: dict[str, Tensor],
    gradient_layers: set[str],
    seeds: Tensor,
    pair_image: Tensor,
    pair_slot: Tensor,
    rows_are_pairs: bool,
    corrections: dict[str, Callable[[Tensor, Tensor], Tensor]] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """∂t_p/∂A for every pair p and gradient layer, each a (pairs, K, …) tensor, where pair p's target t_p has
    gradient ``seeds[p]`` with respect to its image's logits (one-hot for a class's raw logit y_c).

    When the logits have one row per pair (see :func:`captured_pass`'s ``expand``), row p takes seed p, and one
    ``autograd.grad`` call serves every pair. Else the logits have one row per image, and seed slot t holds each
    image's t-th target, differentiated together through ``is_grads_batched``.

    ``corrections`` maps a layer to a method's function of (its first gradient, the activation) that needs the
    gradient's graph (ShapleyCAM's g − ½·H·A): it is applied per layer, and returned as the second dict."""
    if not gradient_layers:
        return {}, {}
    corrections = corrections or {}
    layers = [layer for layer in activations if layer in gradient_layers]
    inputs = [activations[layer] for layer in layers]
    second_order = bool(corrections)
    if rows_are_pairs or len(seeds) == len(logits):
        gradients = torch.autograd.grad(logits, inputs, grad_outputs=seeds.to(logits.dtype), create_graph=second_order)
        corrected = {
            layer: corrections[layer](g, activations[layer]).float()
            for layer, g in zip(layers, gradients, strict=True)
            if layer in corrections
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
        layer: torch.stack([corrections[layer](g[i], activations[layer]) for g in per_slot])[pair_slot, pair_image]
        for i, layer in enumerate(layers)
        if layer in corrections
    }
    return {layer: g.detach()[pair_slot, pair_image].float() for layer, g in gradients.items()}, corrected


# --- The methods that run apart: requests by layer, target slots, their parts gathered ---


def by_layer(engine: MethodEngine, requests: Sequence[CamRequest]) -> dict[str, list[int]]:
    """The requests' indices grouped by their layer (None: the engine's default layer)."""
    groups: dict[str, list[int]] = {}
    for n, request in enumerate(requests):
        groups.setdefault(request.layer or engine.default_layer, []).append(n)
    return groups


def slot_classes(classes: Sequence[Sequence[int]], slot: int, device: torch.device) -> Tensor:
    """Each image's class of target slot ``slot`` (its last one where it has fewer): the rows of one gradient call."""
    return torch.tensor([chosen[min(slot, len(chosen) - 1)] for chosen in classes], device=device)


def add_slot(maps: list[list[Tensor]], classes: Sequence[Sequence[int]], slot: int, cams: Tensor) -> None:
    """Append each image's map of target slot ``slot`` to its list, for the images that have that many targets."""
    for n, chosen in enumerate(classes):
        if slot < len(chosen):
            maps[n].append(cams[n])


LayerRun = Callable[[str, Tensor, list[CamRequest]], tuple[Tensor, list[list[int]], list[Tensor], float]]
"""One layer's work for a method that runs apart: (layer, its images, their requests) → (logits, classes, maps,
the seconds its forward passes took)."""


def run_by_layer(engine: MethodEngine, images: Tensor, requests: Sequence[CamRequest], run: LayerRun) -> CamOutput:
    """A method that runs apart, one layer at a time: ``run`` explains each layer's requests, and the parts come
    back in the requests' order with the call's timings."""
    started = time.perf_counter()
    forward_seconds, parts = 0.0, []
    for layer, rows in by_layer(engine, requests).items():
        logits, classes, maps, seconds = run(layer, images[rows], [requests[n] for n in rows])
        forward_seconds += seconds
        parts.append((rows, CamOutput(logits, classes, maps)))
    output = gather(parts, len(requests))
    seconds = {"forward": forward_seconds, "cam": time.perf_counter() - started - forward_seconds}
    return CamOutput(output.logits, output.targets, output.maps, seconds)


def gather(parts: Sequence[tuple[list[int], CamOutput]], total: int) -> CamOutput:
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
    return CamOutput(torch.stack(logits), targets, maps, {"forward": forward}, kept, kept_rows)
