"""Layers and layouts: which modules of a model give a spatial map, how their outputs become (N, K, h, w) grids,
and which layer a CAM explains by default."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LAYOUTS",
    "PYRAMID",
    "VOLUME",
    "Layout",
    "LayerInfo",
    "LayerNotFoundError",
    "NoSpatialLayerError",
    "backbone_stage",
    "default_layer",
    "describe_layers",
    "find_layer",
    "forward_hooks",
    "to_grid",
    "volume_map",
]


@contextlib.contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Forward hooks that live only for the duration of a ``with`` block, and are removed even on error."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class NoSpatialLayerError(ValueError):
    """The model has no layer that a CAM could explain (no module gives a spatial map)."""


class LayerNotFoundError(ValueError):
    """The requested layer name does not name a usable layer of the model."""

    def __init__(self, name: str, valid: Sequence[str]) -> None:
        self.name = name
        self.valid = list(valid)
        if len(self.valid) <= 16:
            accepted = f"one of {', '.join(self.valid)}"
        else:
            top_level = [layer for layer in self.valid if "." not in layer]
            deepest = max(self.valid, key=lambda layer: layer.count("."))
            accepted = f"one of {', '.join(top_level)} or a dotted submodule such as {deepest}"
        super().__init__(f"layer must be a layer of the model that gives a spatial map, {accepted}; got {name!r}")


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule that the dotted ``name`` points at, or :class:`LayerNotFoundError`."""
    try:
        if name:
            return model.get_submodule(name)
    except AttributeError:
        pass
    raise LayerNotFoundError(name, [layer for layer, _ in model.named_modules() if layer])


PYRAMID = "fpn"
VOLUME = "ncdhw"
LAYOUTS = ("nchw", "nhwc", "cls_tokens", "tokens", "prefix_tokens:P", PYRAMID, VOLUME)
"""How a layer's output becomes the (N, K, h, w) grid that every method reads (the reshape-transform idea of
pytorch-grad-cam, as a property of the layer):

- ``nchw``: a convolutional map, as it is.
- ``nhwc``: channels last (torchvision's Swin): ``A.permute(0, 3, 1, 2)``.
- ``cls_tokens``: (N, 1 + h·w, K) tokens after a class token (ViT): drop token 0, reshape to (N, h, w, K), then
  permute to (N, K, h, w).
- ``tokens``: (N, h·w, K) tokens without a class token: the same reshape.
- ``prefix_tokens:P``: (N, P + h·w, K) tokens after P prefix tokens (a class token and register tokens, as timm's
  ``num_prefix_tokens`` counts them): drop the first P, then the same reshape.
- ``ncdhw``: a 3D network's map (N, K, d, h, w), as (N, K, d, h·w): its positions in order, which is all that
  the gradient and activation families that share the pass read (a channel's mean, its sums, its principal
  components); :func:`volume_map` gives a map its (d, h, w) back.
- ``fpn``: a feature pyramid, a mapping of (N, K_l, h_l, w_l) levels (a detector's ``backbone``): each level's
  absolute value, bilinearly resized to the smallest level's grid, concatenated along the channels; this is
  pytorch-grad-cam's ``fasterrcnn_reshape_transform`` (its smallest level is ``pool``). It is not linear in the
  levels, so only activation methods read it.

The map is linear in the tokens, so gradients take the same reshape.
"""


class Layout(str):
    """A layer's layout as a typed value: one of :data:`LAYOUTS` (``prefix_tokens:P`` with P a count), checked
    once when it is made. It is the string the spec stores, so it compares and serialises as one."""

    __slots__ = ()

    def __new__(cls, text: str) -> Layout:
        if isinstance(text, Layout):
            return text
        if text not in LAYOUTS[:4] + (PYRAMID, VOLUME) and _prefix_tokens(text) is None:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {text!r}")
        return super().__new__(cls, text)

    @property
    def pyramid(self) -> bool:
        """A feature pyramid: a mapping of levels, which only activation methods read."""
        return self == PYRAMID

    @property
    def volume(self) -> bool:
        """A 3D network's map: only methods that read positions as a set explain it."""
        return self == VOLUME

    @property
    def prefix(self) -> int | None:
        """How many leading tokens a token layout drops; None for a layout that is not tokens."""
        return _prefix_tokens(self)


def to_grid(tensor: Tensor | Mapping[str, Tensor], layout: str) -> Tensor:
    """A layer's output (or its gradient) as an (N, K, h, w) grid; see :data:`LAYOUTS`."""
    if layout == "nchw":
        return tensor
    layout = Layout(layout)
    if layout.pyramid:
        levels = list(tensor.values())
        size = min((level.shape[-2:] for level in levels), key=lambda shape: shape[0] * shape[1])
        return torch.cat([F.interpolate(level.abs(), tuple(size), mode="bilinear") for level in levels], dim=1)
    if layout == "nhwc":
        return tensor.permute(0, 3, 1, 2)
    if layout.volume:
        return tensor.flatten(3)
    tokens = tensor[:, layout.prefix :]
    side = math.isqrt(tokens.shape[1])
    return tokens.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


def volume_map(cam: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A map of a ``ncdhw`` layer, (…, d, h·w), as (…, d, h, w) given the layer's one-image output ``shape``."""
    return cam.reshape(*cam.shape[:-2], *shape[-3:])


def _prefix_tokens(layout: str) -> int | None:
    if layout in ("cls_tokens", "tokens"):
        return int(layout == "cls_tokens")
    name, _, count = layout.partition(":")
    return int(count) if name == "prefix_tokens" and count.isdigit() else None


MAX_PREFIX_TOKENS = 8
"""The most leading tokens (a class token and registers) a token map is probed for."""


def token_layout(prefix: int) -> str:
    """The layout name for tokens after ``prefix`` leading tokens."""
    return {0: "tokens", 1: "cls_tokens"}.get(prefix, f"prefix_tokens:{prefix}")


def _layout_of(shape: tuple[int, ...]) -> str | None:
    """The layout of a one-image output ``shape`` probed with a square input, or None when it is no spatial map.

    At a square input a spatial map is square: (1, K, s, s) is NCHW and (1, s, s, K) NHWC (K = s reads as NCHW).
    (1, T, K) is a token map when T − P is a square of a side above 1 for the fewest leading tokens P (a class
    token, registers) up to :data:`MAX_PREFIX_TOKENS`.
    """
    if len(shape) == 5:
        return VOLUME if min(shape[2:]) > 1 else None
    if len(shape) == 4:
        _, a, b, c = shape
        if b == c > 1:
            return "nchw"
        if a == b > 1:
            return "nhwc"
        return None
    if len(shape) == 3:
        for prefix in (1, 0, *range(2, MAX_PREFIX_TOKENS + 1)):  # a class token first, as ViTs have
            grid_tokens = shape[1] - prefix
            side = math.isqrt(max(grid_tokens, 0))
            if side > 1 and side * side == grid_tokens:
                return token_layout(prefix)
    return None


@dataclass(frozen=True)
class LayerInfo:
    """What one probe forward pass shows of a module that runs once per pass."""

    name: str
    shape: tuple[int, ...]
    """The raw output shape for one image; () when the output is not a tensor."""
    layout: str | None
    """How the output becomes a grid (:data:`LAYOUTS`); None: not a spatial map."""
    grid: tuple[int, int, int] | None
    """(K, h, w) of the grid."""
    output_id: int | None
    """Equal for modules that return the very same tensor (a container and its last child, an in-place op); None
    when the output is not a tensor."""
    takes_image: bool
    """The module's input is the network's input: it is the whole trunk, not a layer of it."""


def describe_layers(model: nn.Module, image_size: int = 224, image: Tensor | None = None) -> dict[str, LayerInfo]:
    """The modules that run exactly once in a forward pass of one image, in the order they finish, with their
    output's layout (ResNet's shared ``relu`` runs several times and is left out). The image is ``image`` (one
    square image's batch, e.g. ``zeros_like(batch[:1])``) or else an RGB ``image_size`` square of zeros."""
    calls: dict[str, list[tuple[tuple[int, ...], Tensor | None, bool]]] = {}
    pyramids: dict[str, Mapping[str, Tensor]] = {}
    order: list[str] = []
    if image is None:
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        image = torch.zeros(1, 3, image_size, image_size, device=device)

    def record(name: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            tensor = output if isinstance(output, Tensor) else None
            if tensor is None and _is_pyramid(output):
                pyramids[name] = output
            takes_image = bool(inputs) and inputs[0] is image
            if name not in calls:
                order.append(name)
            calls.setdefault(name, []).append((tuple(tensor.shape) if tensor is not None else (), tensor, takes_image))

        return hook

    with forward_hooks((module, record(name)) for name, module in model.named_modules() if name), torch.no_grad():
        model(image)
    layers = {}
    for name in order:
        if len(calls[name]) != 1:
            continue
        shape, tensor, takes_image = calls[name][0]
        layout = _layout_of(shape) if shape else None
        if name in pyramids:
            shape, tensor = tuple(to_grid(pyramids[name], PYRAMID).shape), pyramids[name]
            layout = PYRAMID if min(shape[-2:]) > 1 else None  # an SSD's pyramid ends in 1x1: no map
        grid = None
        if layout:
            grid = (
                shape[1:] if layout == PYRAMID else tuple(to_grid(torch.empty(shape, device="meta"), layout).shape[1:])
            )
        layers[name] = LayerInfo(name, shape, layout, grid, None if tensor is None else id(tensor), takes_image)
    return layers


MAX_BACKBONE_STRIDE = 32
"""A detector's or segmenter's default layer is the last backbone stage at most this many pixels per cell."""


def backbone_stage(layers: Mapping[str, LayerInfo], image_size: int) -> str | None:
    """The default layer of a detector or segmenter in torchvision's layout: the last stage of its backbone, the
    shallowest maps under ``backbone.body`` (its FPN detectors) or else ``backbone`` (its segmenters and SSDs), of
    at most :data:`MAX_BACKBONE_STRIDE` pixels per cell (an SSD's extra layers shrink to 1x1): ``backbone.body.layer4``
    of a ResNet-50 FPN, ``backbone.body.16`` of a MobileNet v3 FPN, ``backbone.features`` of SSD300,
    ``backbone.features.1`` of SSDlite, ``backbone.layer4`` of DeepLabV3 and FCN, ``backbone.16`` of LR-ASPP.
    None when the model has no such backbone."""
    for trunk in ("backbone.body", "backbone"):
        stages = [
            info
            for name, info in layers.items()
            if info.layout not in (None, PYRAMID)
            and name.startswith(trunk + ".")
            and image_size / info.grid[-1] <= MAX_BACKBONE_STRIDE
        ]
        if stages:
            depth = min(info.name.count(".") for info in stages)
            return [info.name for info in stages if info.name.count(".") == depth][-1]
    return None


def _is_pyramid(output: object) -> bool:
    """A feature pyramid: a mapping of at least two 4-D maps (a detector backbone's ``OrderedDict``)."""
    return (
        isinstance(output, Mapping)
        and len(output) >= 2
        and all(isinstance(value, Tensor) and value.dim() == 4 for value in output.values())
    )


def default_layer(model: nn.Module, image_size: int = 224, layers: Mapping[str, LayerInfo] | None = None) -> str:
    """The layer a CAM explains by default, found from the model itself, as pytorch-grad-cam recommends per family.

    - Token models (a ViT's ``cls_tokens``, a Swin's ``nhwc`` maps): the first LayerNorm of the last block that
      has two of them, ``encoder.layers.encoder_layer_11.ln_1`` or ``features.7.1.norm1``. A ViT's last block
      output carries no patch gradient (only the class token reaches the head).
    - Otherwise, the last spatial map before global pooling: among the modules that return that very tensor,
      the shallowest that is a single stage (at most one change of resolution inside it) and not the whole trunk
      (its input is not the image): ``layer4`` of a ResNet, ``features.7`` of a ConvNeXt, ``features.norm5`` of a
      DenseNet, ``trunk_output.block4`` of a RegNet. Adaptive pooling to a fixed size (VGG's ``avgpool``) does
      not count as the last map.
    """
    layers = describe_layers(model, image_size) if layers is None else layers
    spatial = [info for info in layers.values() if info.layout]
    if not spatial:
        raise NoSpatialLayerError("the model has no layer that gives a spatial map: nothing to explain")
    modules = dict(model.named_modules())
    norms: dict[str, list[str]] = {}
    for info in spatial:
        if info.layout != "nchw" and isinstance(modules[info.name], nn.LayerNorm):
            norms.setdefault(info.name.rpartition(".")[0], []).append(info.name)
    blocks = [names for names in norms.values() if len(names) >= 2]
    if blocks:
        return blocks[-1][0]
    pooling = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    maps = [info for info in spatial if not isinstance(modules[info.name], pooling)] or spatial
    last = maps[-1]
    same = [
        info
        for info in maps
        if info.output_id == last.output_id and not info.takes_image and not isinstance(modules[info.name], nn.Identity)
    ] or [last]

    def resolutions(name: str) -> int:
        inside = {info.grid[1:] for info in spatial if info.name.startswith(name + ".")}
        return len(inside | {layers[name].grid[1:]})

    stages = [info for info in same if resolutions(info.name) <= 2] or same
    depth = min(info.name.count(".") for info in stages)
    return [info.name for info in stages if info.name.count(".") == depth][-1]
