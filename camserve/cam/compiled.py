"""The network before a layer compiled with ``torch.compile``, the rest eager: what the engine runs instead of the
model when a batch hooks that layer alone.

The part before the explained layer runs without autograd (:func:`camserve.cam.capture.captured_pass`), so it is
the part a compiler may take whole. The model is traced with ``torch.fx``, the layer kept as one module call, and
cut just before that call. Exactly one value may cross the cut, the layer's input; a layer whose block also carries
a residual across it is refused, with the reason. The prefix is compiled (Inductor, a dynamic batch dimension); the
suffix is a ``GraphModule`` that calls the model's own modules, the layer among them, so the engine's hooks on them
fire as in the model. Both share the model's parameters.

Only the engine's shared pass uses it, and only when every hook of the pass is on the layer: a request for a layer
inside the prefix, a sanity check's randomised copies and every other method run the eager model.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from camserve.cam.layers import find_layer

__all__ = ["CompileRefused", "split_at"]


class CompileRefused(ValueError):
    """The model cannot be split at this layer for compiling; the message says why."""


class _LayerTracer(fx.Tracer):
    """torch.fx's tracer, keeping ``layer`` as one call (its hooks must fire), besides torch's own leaf modules."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return module is self.layer or super().is_leaf_module(module, name)


class SplitModel(nn.Module):
    """``model(x)`` as ``suffix(prefix(x))``, the prefix compiled."""

    def __init__(self, prefix: fx.GraphModule, suffix: fx.GraphModule) -> None:
        super().__init__()
        self.prefix = torch.compile(prefix, dynamic=True)
        self.suffix = suffix

    def forward(self, images: torch.Tensor) -> object:
        return self.suffix(self.prefix(images))


def split_at(model: nn.Module, layer: str) -> SplitModel:
    """``model`` cut just before ``layer``, its prefix compiled; :class:`CompileRefused` says why it cannot be."""
    module = find_layer(model, layer)
    try:
        graph = _LayerTracer(module).trace(model)
    except Exception as error:  # torch.fx refuses data-dependent control flow, among others
        raise CompileRefused(f"torch.fx cannot trace the model ({type(error).__name__}: {error})") from None
    nodes = list(graph.nodes)
    calls = [n for n, node in enumerate(nodes) if node.op == "call_module" and node.target == layer]
    if len(calls) != 1:
        raise CompileRefused(f"layer {layer} is called {len(calls)} times in the traced forward pass, not once")
    cut = calls[0]
    before = set(nodes[:cut])
    crossing = list(dict.fromkeys(arg for node in nodes[cut:] for arg in node.all_input_nodes if arg in before))
    if len(crossing) != 1:
        names = ", ".join(node.name for node in crossing)
        raise CompileRefused(
            f"{len(crossing)} values cross from before layer {layer} to after it ({names}): only a layer whose input "
            "is all that the rest of the network reads (a stage of the network, not a module inside a residual "
            "block) can have the part before it compiled"
        )
    (value,) = crossing
    if value.op == "placeholder":
        raise CompileRefused(f"layer {layer} reads the model's input: there is nothing before it to compile")
    prefix = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    for node in nodes[:cut]:
        copied[node] = prefix.node_copy(node, lambda arg: copied[arg])
    prefix.output(copied[value])
    suffix = fx.Graph()
    copied = {value: suffix.placeholder("activation")}
    for node in nodes[cut:]:
        copied[node] = suffix.node_copy(node, lambda arg: copied[arg])
    before_layer = fx.GraphModule(model, prefix)
    before_layer.graph.eliminate_dead_code()  # what only fed values the rest never reads
    before_layer.recompile()
    return SplitModel(before_layer, fx.GraphModule(model, suffix))
