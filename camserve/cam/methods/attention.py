"""Attention methods for vision transformers: LeGrad, the gradient of each block's class score with respect to its
attention probabilities. They run in a pass of their own (the attention modules are asked for their per-head
probabilities for its duration) and differentiate with respect to those probabilities only."""

from __future__ import annotations

import time
from collections.abc import Sequence
from math import isqrt

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.cam.capture import CamOutput, CamRequest, MethodEngine, add_slot, run_by_layer, slot_classes
from camserve.cam.layers import forward_hooks

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


def legrad_applies(engine: MethodEngine, layer: str) -> str | None:
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

    def relevance(self, name: str, classes: Tensor, last_slot: bool) -> Tensor:
        """Block ``name``'s map for each image's class: mean over heads and queries of relu(∂s_c/∂P), the prefix
        tokens' keys left out, on the square patch grid."""
        selected = self.scores[name].gather(1, classes.view(-1, 1)).sum()
        last = last_slot and name == self.blocks[-1]
        (gradient,) = torch.autograd.grad(selected, self.probabilities[name], retain_graph=not last)
        relevance = gradient.float().relu().mean(dim=(1, 2))[:, PREFIX_TOKENS:]
        side = isqrt(relevance.shape[-1])
        if side * side != relevance.shape[-1]:
            raise ValueError(f"LeGrad needs a square patch grid; {relevance.shape[-1]} patch tokens")
        return relevance.reshape(len(relevance), side, side)

    def block_hooks(self) -> list:
        def project(name: str):
            def hook(_module: nn.Module, _inputs: object, tokens: Tensor) -> None:
                self.scores[name] = self.model.heads(self.model.encoder.ln(tokens.mean(dim=1)))
                self.tokens[name] = tokens.shape[1]

            return hook

        return [(self.model.get_submodule(name), project(name)) for name in self.blocks]


def legrad(engine: MethodEngine, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
    """LeGrad (Bousselham et al., 2024: "LeGrad: An Explainability Method for Vision Transformers via Feature
    Formation Sensitivity"), as torchcam's ``LeGrad``: for each block l from the layer's block to the last, s_l =
    heads(ln(mean of its output tokens)), the class's score read at that depth, and P_l its attention probabilities
    (batch, heads, queries, keys); map = mean_l of mean over heads and queries of relu(∂s_l,c/∂P_l), the class token's
    key left out, on the patch grid. Attention values are not multiplied in.

    Cost: one forward pass with autograd from the first block read, and one gradient call per block and target slot,
    with respect to the attention probabilities only. torchvision's ViT blocks (``self_attention``), and its head."""

    def run(layer: str, given: Tensor, chosen: list[CamRequest]):
        blocks = legrad_blocks(engine.model, layer)
        if isinstance(blocks, str):
            raise ValueError(blocks)
        capture = _Capture(engine.model, blocks)
        handles = capture.hooks()
        began = time.perf_counter()
        try:
            with forward_hooks(capture.block_hooks()), torch.enable_grad(), engine.autocast(images.device):
                logits = engine.model(given)
        finally:
            for handle in handles:
                handle.remove()
        forward_seconds = time.perf_counter() - began
        classes = engine.resolve_targets(logits.detach().float(), chosen)
        slots = max(len(targets) for targets in classes)
        maps: list[list[Tensor]] = [[] for _ in chosen]
        for slot in range(slots):
            relevances = [
                capture.relevance(name, slot_classes(classes, slot, images.device), slot == slots - 1)
                for name in blocks
            ]
            add_slot(maps, classes, slot, torch.stack(relevances).mean(0).detach())
        return logits.detach().float(), classes, [torch.stack(m) for m in maps], forward_seconds

    return run_by_layer(engine, images, requests, run)
