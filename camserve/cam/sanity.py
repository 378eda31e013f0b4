"""The sanity check of an explanation: does the map change when the model after the explained layer is randomised?

Adebayo et al. (NeurIPS 2018, "Sanity Checks for Saliency Maps") randomise a model's weights in cascade, from the
top down, and compare each saliency map with the one before: a map that barely changes explains the input's edges,
not the model. Quantus implements the test offline as ``MPRT``. Here it runs on every explanation that asks:

- the randomised copy re-initialises every module that runs after the explained layer, exactly as Quantus's
  ``get_random_layer_generator`` does (``torch.manual_seed(seed + 1)``, then the module's ``reset_parameters()``,
  for each module that has one); the modules before the layer share their tensors with the model;
- the layer's activation is the same in both models, so for a method that shares the batch's forward pass only the
  part of the copy after the layer runs: the outputs of the modules before it are replayed from the batch's own
  forward pass (:attr:`camserve.cam.engine.CamOutput.kept`), batched for every asking request at that layer;
- a method that makes its own passes (Score-CAM's masked inputs, FullGrad's input gradients, guided
  backpropagation) runs again, whole, on the copy;
- an activation-only method (EigenCAM) reads nothing after the layer: its figure is 1 by construction, and no pass
  runs;
- the figure is Spearman's rank correlation between the map and the copy's map for the same class, both
  upsampled to the model input's size as the overlay and faithfulness see them, ties ranked by their mean rank
  (SciPy's ``spearmanr``, which Quantus calls). A map that does not depend on the model after the layer scores
  near 1; Grad-CAM on a trained model scores near 0 once more than a linear head is randomised.

The copies are built lazily, once per layer, and kept (at most :data:`MAX_COPIES`).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from camserve.cam.layers import find_layer, forward_hooks
from camserve.cam.methods.registry import method_record
from camserve.cam.post import upsample
from camserve.cam.targets import Classes

if TYPE_CHECKING:
    from camserve.cam.capture import CamOutput, CamRequest
    from camserve.cam.engine import CamEngine

__all__ = [
    "MAX_COPIES",
    "SANITY_SEED",
    "Sanity",
    "SanityFigure",
    "rank_correlation",
    "randomised_copy",
    "sanity_passes",
    "split_at",
]

SANITY_SEED = 42
"""Quantus's ``MPRT`` default: each randomised module is re-initialised right after ``torch.manual_seed(43)``."""

MAX_COPIES = 4
"""Randomised copies kept per worker, one per explained layer, the least recently used dropped first."""


@dataclass(frozen=True)
class SanityFigure:
    """One explanation's sanity check, as the response gives it."""

    rank_correlation: float | None
    """Spearman's rank correlation of the map with the randomised copy's; None where a map is constant."""
    randomised: tuple[str, ...]
    """The top modules re-initialised: every module that runs after the explained layer."""


def average_ranks(values: Tensor) -> Tensor:
    """Each row's ranks (0-based), tied values sharing their mean rank, as SciPy's ``rankdata``."""
    ranks = torch.empty_like(values, dtype=torch.float64)
    for row, out in zip(values, ranks, strict=True):
        ordered, order = row.sort(stable=True)
        _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        out[order] = ((ends - counts.double()) + ends - 1)[inverse] / 2
    return ranks


def rank_correlation(first: Tensor, second: Tensor) -> Tensor:
    """Spearman's rank correlation of each row of ``first`` (P, …) with the same row of ``second``: the Pearson
    correlation of their average ranks. NaN where either row is constant."""
    a = average_ranks(first.flatten(1).double())
    b = average_ranks(second.flatten(1).double())
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denominator = (a.pow(2).sum(dim=1) * b.pow(2).sum(dim=1)).sqrt()
    return torch.where(denominator > 0, (a * b).sum(dim=1) / denominator, torch.full_like(denominator, float("nan")))


@dataclass(frozen=True)
class Split:
    """A model's modules around one layer, in the order one forward pass runs them."""

    before: tuple[str, ...]
    """The top modules that run once, wholly before the layer starts, and return one tensor: their outputs can be
    replayed (a module that returns anything else runs, on its replayed submodules' outputs)."""
    after: tuple[str, ...]
    """The top modules that first run after the layer ends and hold parameters (a shared module that also ran
    before is not one)."""


def split_at(model: nn.Module, layer: str, image: Tensor) -> Split:
    """Where each module of ``model`` runs relative to ``layer`` in a forward pass of ``image`` (one row)."""
    events: list[tuple[str, str]] = []
    untensored: set[str] = set()
    named = [(name, module) for name, module in model.named_modules() if name]

    def started(name: str):
        return lambda module, inputs: events.append(("start", name))

    def ended(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            events.append(("end", name))
            if not isinstance(output, Tensor):
                untensored.add(name)

        return hook

    handles = [module.register_forward_pre_hook(started(name)) for name, module in named]
    try:
        with forward_hooks((module, ended(name)) for name, module in named), torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    starts: dict[str, list[int]] = {}
    ends: dict[str, list[int]] = {}
    for index, (kind, name) in enumerate(events):
        (starts if kind == "start" else ends).setdefault(name, []).append(index)
    if layer not in starts:
        raise ValueError(f"layer {layer!r} does not run in the model's forward pass")
    layer_start, layer_end = starts[layer][0], ends[layer][-1]
    before = {
        name for name in starts if len(starts[name]) == 1 and ends[name][0] < layer_start and name not in untensored
    }
    after = {name for name in starts if starts[name][0] > layer_end}

    def top(names: set[str]) -> tuple[str, ...]:
        chosen = [name for name in names if not any(name.startswith(other + ".") for other in names)]
        return tuple(sorted(chosen, key=lambda name: starts[name][0]))

    with_parameters = {name for name, module in named if next(module.parameters(), None) is not None}
    return Split(top(before), tuple(name for name in top(after) if name in with_parameters))


def randomised_copy(model: nn.Module, after: Sequence[str], seed: int = SANITY_SEED) -> nn.Module:
    """A copy of ``model`` whose modules under ``after`` are re-initialised as Quantus's MPRT does: for each one
    with ``reset_parameters``, ``torch.manual_seed(seed + 1)`` and then ``reset_parameters()``. Every other tensor is
    shared with ``model``, not copied. The caller's random state is left as it was."""
    inside = [
        (name, module)
        for name, module in model.named_modules()
        if any(name == top or name.startswith(top + ".") for top in after)
    ]
    randomised = {id(module) for _, module in inside}
    memo = {}
    for module in model.modules():
        if id(module) not in randomised:
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                memo[id(tensor)] = tensor
    twin = copy.deepcopy(model, memo)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for name, _ in reversed(inside):
            module = twin.get_submodule(name)
            if hasattr(module, "reset_parameters"):
                torch.manual_seed(seed + 1)
                module.reset_parameters()
    return twin


class _Copy:
    """The randomised copy for one layer: its engine, and the modules before the layer that can replay."""

    def __init__(self, engine: CamEngine, layer: str, seed: int) -> None:
        sample = engine.sample()
        self.split = split_at(engine.model, layer, sample)
        model = randomised_copy(engine.model, self.split.after, seed)
        self.replayed = (*self.split.before, layer)
        self.replay: dict[str, Tensor] = {}
        for name in self.replayed:
            self._replayable(find_layer(model, name), name)
        self.engine = engine.with_model(model)

    def _replayable(self, module: nn.Module, name: str) -> None:
        """The module returns its replayed output while one is set, and runs as itself otherwise."""
        run = module.forward

        def forward(*args, **kwargs):
            value = self.replay.get(name)
            return run(*args, **kwargs) if value is None else value

        module.forward = forward


class Sanity:
    """Sanity figures for a batch's explanations, with randomised copies of ``engine``'s model built lazily."""

    def __init__(self, engine: CamEngine, seed: int = SANITY_SEED) -> None:
        self.engine = engine
        self.seed = seed
        self._copies: OrderedDict[str, _Copy] = OrderedDict()

    def copy_for(self, layer: str) -> _Copy:
        if layer not in self._copies:
            self._copies[layer] = _Copy(self.engine, layer, self.seed)
            while len(self._copies) > MAX_COPIES:
                self._copies.popitem(last=False)
        self._copies.move_to_end(layer)
        return self._copies[layer]

    def keep(self, requests: Sequence[CamRequest]) -> list[str]:
        """The modules whose outputs the batch's forward pass must keep for these requests' checks to replay."""
        names: dict[str, None] = {}
        for request in requests:
            if tail_only(request):
                names.update(dict.fromkeys(self.copy_for(self._layer(request)).replayed))
        return list(names)

    def figures(
        self, images: Tensor, requests: Sequence[CamRequest | None], output: CamOutput
    ) -> dict[int, list[SanityFigure]]:
        """For each request that is not None, one figure per explained class of ``output`` (the engine's output for
        ``images``, called with :meth:`keep`'s modules)."""
        figures: dict[int, list[SanityFigure]] = {}
        replayed: dict[str, list[int]] = {}
        rerun: dict[str, list[int]] = {}
        for n, request in enumerate(requests):
            if request is None:
                continue
            layer = self._layer(request)
            if method_record(request.method).activations_only:
                randomised = self.copy_for(layer).split.after
                figures[n] = [SanityFigure(1.0, randomised)] * len(output.targets[n])
            elif tail_only(request) and n in output.kept_rows:
                replayed.setdefault(layer, []).append(n)
            else:
                rerun.setdefault(layer, []).append(n)
        for layer, rows in replayed.items():
            twin = self.copy_for(layer)
            kept_index = [output.kept_rows.index(n) for n in rows]
            twin.replay = {name: _rows(output.kept[name], kept_index) for name in twin.replayed}
            try:
                other = twin.engine.explain_shared(images[rows], self._same_classes(requests, output, rows))
            finally:
                twin.replay = {}
            self._compare(figures, rows, output, other, twin.split.after, images.shape[-2:])
        for layer, rows in rerun.items():
            twin = self.copy_for(layer)
            other = twin.engine(images[rows], self._same_classes(requests, output, rows))
            self._compare(figures, rows, output, other, twin.split.after, images.shape[-2:])
        return figures

    def _layer(self, request: CamRequest) -> str:
        return request.layer or self.engine.default_layer

    @staticmethod
    def _same_classes(requests, output: CamOutput, rows: list[int]) -> list[CamRequest]:
        """The requests of ``rows``, explaining the classes the model explained (not the copy's predictions)."""
        return [replace(requests[n], targets=Classes(output.targets[n])) for n in rows]

    @staticmethod
    def _compare(figures, rows, output: CamOutput, other: CamOutput, randomised: tuple[str, ...], size) -> None:
        for i, n in enumerate(rows):
            values = rank_correlation(at_input(output.maps[n], size), at_input(other.maps[i], size)).tolist()
            figures[n] = [SanityFigure(None if v != v else round(v, 6), randomised) for v in values]


def sanity_passes(engine: CamEngine, request: CamRequest) -> int:
    """The passes the check of one image's ``request`` adds: none for an activation-only method; one pass of the
    model after the layer when it replays; else the method's own passes again, on the copy."""
    if method_record(request.method).activations_only:
        return 0
    return 1 if tail_only(request) else engine.forward_passes(request)


def at_input(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(T, h, w) maps upsampled to the model input's size, as every overlay and faithfulness figure sees them."""
    return upsample(maps[:, None].float(), tuple(size))[:, 0]


def tail_only(request: CamRequest) -> bool:
    """Whether the check of ``request`` can replay the batch's forward pass up to the layer: its method shares
    that pass with one plain row (no extra passes, no ``aug_smooth``)."""
    return method_record(request.method).one_pass and not request.aug_smooth


def _rows(kept: Tensor, index: list[int]) -> Tensor:
    return kept if index == list(range(len(kept))) else kept[index]
