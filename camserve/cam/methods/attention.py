"""Attention methods for vision transformers: LeGrad, the gradient of each block's class score with respect to its
attention probabilities. They run in a pass of their own (the attention modules are asked for their per-head
probabilities for its duration) and differentiate with respect to those probabilities only."""

from __future__ import annotations

import time
from collections.abc import Sequence
from math import isqrt
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.cam.layers import forward_hooks
from camserve.cam.methods.composite import add_slot, by_layer, slot_classes

if TYPE_CHECKING:
    from camserve.cam.engine import CamEngine, CamOutput, CamRequest

__all__ = ["PREFIX_TOKENS", "legrad", "legrad_applies", "legrad_blocks"]

PREFIX_TOKENS = 1
"""Tokens before the patch tokens: torchvision's ViT has its class token."""


def _attention(block: nn.Module) -> nn.MultiheadAttention | None:
    attention = getattr(block, "self_attention", None)
    return attention if isinstance(attention, nn.MultiheadAttention) and attention.batch_first else None


def legrad_blocks(model: nn.Module, layer: str) -> list[str] | str:
    """The blocks LeGrad reads for ``layer``: the transformer block that is or holds ``layer``, and every block
    after it in the same list of blocks; or why LeGrad does not apply."""
    why = (
        "LeGrad reads the attention of transformer blocks that have an nn.MultiheadAttention `self_attention` "
        "(batch first), and projects their tokens through torchvision's ViT head (`encoder.ln`, then `heads`)"
    )
    if not isinstance(getattr(getattr(model, "encoder", None), "ln", None), nn.Module):
        return f"{why}; this model has no such head"
    if not isinstance(getattr(model, "heads", None), nn.Module):
        return f"{why}; this model has no such head"
    parts = layer.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        block = model.get_submodule(name)
        if _attention(block) is not None:
            parent_name, _, _ = name.rpartition(".")
            siblings = list(model.get_submodule(parent_name).named_children()) if parent_name else []
            names = [child for child, module in siblings if _attention(module) is not None]
            start = names.index(name.rpartition(".")[2]) if names else 0
            return [f"{parent_name}.{child}" for child in names[start:]] if names else [name]
    return f"{why}; {layer} is not in such a block: name one, such as an encoder block"


def legrad_applies(engine: CamEngine, layer: str) -> str | None:
    found = legrad_blocks(engine.model, layer)
    return found if isinstance(found, str) else None


class _Capture:
    """For one pass: each block's attention probabilities (in the graph) and its layer-specific class scores."""

    def __init__(self, model: nn.Module, blocks: list[str]) -> None:
        self.model, self.blocks = model, blocks
        self.probabilities: dict[str, Tensor] = {}
        self.scores: dict[str, Tensor] = {}
        self.tokens: dict[str, int] = {}

    def hooks(self) -> list:
        handles = []
        for name in self.blocks:
            attention = _attention(self.model.get_submodule(name))
            handles.append(attention.register_forward_pre_hook(self._ask_for_weights, with_kwargs=True))
            handles.append(attention.register_forward_hook(self._keeper(name), with_kwargs=True))
        return handles

    @staticmethod
    def _ask_for_weights(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Per-head probabilities, and a query that requires a gradient so that the graph starts here."""
        args, kwargs = list(args), dict(kwargs)
        query = args[0].detach().requires_grad_() if not args[0].requires_grad else args[0]
        args[:3] = [query, query, query]
        if len(args) > 4:
            args[4] = True
        else:
            kwargs["need_weights"] = True
        if len(args) > 6:
            args[6] = False
        else:
            kwargs["average_attn_weights"] = False
        return tuple(args), kwargs

    def _keeper(self, name: str):
        def keep(module: nn.MultiheadAttention, args: tuple, _kwargs: dict, output: tuple) -> tuple:
            probabilities, value = output[1], args[2]
            # The block's output recomputed from the probabilities, so that they are in the graph of what follows.
            embed = module.embed_dim
            bias = None if module.in_proj_bias is None else module.in_proj_bias[2 * embed :]
            values = F.linear(value, module.in_proj_weight[2 * embed :], bias)
            batch, length, _ = value.shape
            values = values.reshape(batch, length, module.num_heads, embed // module.num_heads).transpose(1, 2)
            mixed = torch.matmul(probabilities, values).transpose(1, 2).reshape(batch, probabilities.shape[-2], embed)
            self.probabilities[name] = probabilities
            return module.out_proj(mixed), None

        return keep

    def block_hooks(self) -> list:
        def project(name: str):
            def hook(_module: nn.Module, _inputs: object, tokens: Tensor) -> None:
                self.scores[name] = self.model.heads(self.model.encoder.ln(tokens.mean(dim=1)))
                self.tokens[name] = tokens.shape[1]

            return hook

        return [(self.model.get_submodule(name), project(name)) for name in self.blocks]


def legrad(engine: CamEngine, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
    """LeGrad (Bousselham et al., 2024: "LeGrad: An Explainability Method for Vision Transformers via Feature
    Formation Sensitivity"), as torchcam's ``LeGrad``: for each block l from the layer's block to the last, s_l =
    heads(ln(mean of its output tokens)), the class's score read at that depth, and P_l its attention probabilities
    (batch, heads, queries, keys); map = mean_l of mean over heads and queries of relu(∂s_l,c/∂P_l), the class token's
    key left out, on the patch grid. Attention values are not multiplied in.

    Cost: one forward pass with autograd from the first block read, and one gradient call per block and target slot,
    with respect to the attention probabilities only. torchvision's ViT blocks (``self_attention``), and its head."""
    from camserve.cam.engine import CamOutput, _gather

    started = time.perf_counter()
    forward_seconds, parts = 0.0, []
    for layer, rows in by_layer(engine, requests).items():
        blocks = legrad_blocks(engine.model, layer)
        if isinstance(blocks, str):
            raise ValueError(blocks)
        capture = _Capture(engine.model, blocks)
        handles = capture.hooks()
        began = time.perf_counter()
        try:
            with forward_hooks(capture.block_hooks()), torch.enable_grad(), engine.autocast(images.device):
                logits = engine.model(images[rows])
        finally:
            for handle in handles:
                handle.remove()
        forward_seconds += time.perf_counter() - began
        classes = engine.resolve_targets(logits.detach().float(), [requests[n] for n in rows])
        slots = max(len(chosen) for chosen in classes)
        maps: list[list[Tensor]] = [[] for _ in rows]
        for slot in range(slots):
            chosen = slot_classes(classes, slot, images.device)
            relevances = []
            for index, name in enumerate(blocks):
                selected = capture.scores[name].gather(1, chosen.view(-1, 1)).sum()
                last = slot == slots - 1 and index == len(blocks) - 1
                (gradient,) = torch.autograd.grad(selected, capture.probabilities[name], retain_graph=not last)
                relevance = gradient.float().relu().mean(dim=(1, 2))[:, PREFIX_TOKENS:]
                side = isqrt(relevance.shape[-1])
                if side * side != relevance.shape[-1]:
                    raise ValueError(f"LeGrad needs a square patch grid; {relevance.shape[-1]} patch tokens")
                relevances.append(relevance.reshape(len(rows), side, side))
            add_slot(maps, classes, slot, torch.stack(relevances).mean(0).detach())
        parts.append((rows, CamOutput(logits.detach().float(), classes, [torch.stack(m) for m in maps], {})))
    output = _gather(parts, len(requests))
    seconds = {"forward": forward_seconds, "cam": time.perf_counter() - started - forward_seconds}
    return CamOutput(output.logits, output.targets, output.maps, seconds)
