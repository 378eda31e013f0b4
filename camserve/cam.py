"""Class activation maps for torch image classifiers, at the price of about one forward pass.

Pure torch: no TorchServe, no image library. Give it a model, a batch and, per image, what to explain (classes,
layer, method); it gives back the logits and one map per target, from one forward pass and one gradient call.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "CamEngine",
    "CamOutput",
    "CamRequest",
    "GRADIENT_METHODS",
    "GradCAM",
    "LAYOUTS",
    "LayerInfo",
    "LayerNotFoundError",
    "METHODS",
    "default_layer",
    "describe_layers",
    "eigen_cam",
    "eigen_grad_cam",
    "finer_seeds",
    "fem",
    "kpca_cam",
    "grad_cam_elementwise",
    "random_cam",
    "reduce_contributions",
    "find_layer",
    "grad_cam",
    "grad_cam_plus_plus",
    "hires_cam",
    "layer_cam",
    "normalize_map",
    "spatial_layers",
    "to_grid",
    "x_grad_cam",
]


# --- The methods: (activations A, gradients G), both (P, K, h, w), to each channel's contribution C (P, K, h, w),
# whose sum over channels is the map before the final ReLU; the eigen methods give the map (P, h, w) itself.
# With ``eigen_smooth`` the map is instead the first principal component of C (:func:`reduce_contributions`). ---


def grad_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017): α_k = (1/Z) Σ_ij ∂y_c/∂A_k,ij, map = Σ_k α_k A_k."""
    return gradients.mean(dim=(-2, -1), keepdim=True) * activations


def grad_cam_plus_plus(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al., WACV 2018), eq. 19 with the exponential's derivatives:

    α_k,ij = g² / (2·g² + Σ_ab A_k,ab · g³)  (0 where g = 0),   w_k = Σ_ij relu(g_k,ij) · α_k,ij,   map = Σ_k w_k A_k

    with g = ∂y_c/∂A_k,ij. Not torchcam's Σ relu(g)³, which departs from the paper.
    """
    g2 = gradients.pow(2)
    g3 = g2 * gradients
    activation_sums = activations.sum(dim=(-2, -1), keepdim=True)
    alpha = g2 / (2 * g2 + activation_sums * g3 + 1e-6)
    alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
    weights = (F.relu(gradients) * alpha).sum(dim=(-2, -1), keepdim=True)
    return weights * activations


def x_grad_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al., BMVC 2020): w_k = Σ_ij (g_k,ij · A_k,ij) / Σ_ij A_k,ij, map = Σ_k w_k A_k."""
    activation_sums = activations.sum(dim=(-2, -1), keepdim=True)
    weights = (gradients * activations / (activation_sums + 1e-7)).sum(dim=(-2, -1), keepdim=True)
    return weights * activations


def hires_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """HiResCAM (Draelos & Carin, 2020): map = Σ_k g_k ⊙ A_k, the element-wise product, no spatial averaging."""
    return gradients * activations


def layer_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """LayerCAM (Jiang et al., TIP 2021): map = Σ_k relu(g_k) ⊙ A_k."""
    return F.relu(gradients) * activations


def grad_cam_elementwise(activations: Tensor, gradients: Tensor) -> Tensor:
    """Element-wise Grad-CAM (pytorch-grad-cam's ``GradCAMElementWise``): map = Σ_k relu(g_k ⊙ A_k), each position's
    own gradient times activation, negative evidence dropped before the channels are summed."""
    return F.relu(gradients * activations)


def eigen_grad_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """EigenGrad-CAM (pytorch-grad-cam's ``EigenGradCAM``, after Muhammad & Yeasin 2020): the first principal
    component of g ⊙ A, computed and signed as in :func:`eigen_cam`; unlike EigenCAM it depends on the class."""
    return eigen_cam(gradients * activations)


def random_cam(activations: Tensor, seed: int = 0) -> Tensor:
    """RandomCAM, a baseline (pytorch-grad-cam's ``RandomCAM``): map = Σ_k w_k A_k with w_k ~ U(−1, 1), drawn from a
    generator seeded with ``seed``, the same weights for every image. An explanation that no faithfulness measure
    can tell from this one explains nothing."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    weights = torch.rand(activations.shape[1], generator=generator) * 2 - 1
    return weights.to(activations.device, activations.dtype).view(1, -1, 1, 1) * activations


def fem(activations: Tensor, k: float = 2.0) -> Tensor:
    """FEM, the Feature Explanation Method (Fuad et al., IPTA 2020), as pytorch-grad-cam computes it: with μ_k and σ_k
    channel k's mean and (population) standard deviation over positions, w_k = mean_ij [A_k,ij > μ_k + k·σ_k], the
    share of positions where the channel fires exceptionally, and map = Σ_k w_k A_k. No gradients."""
    mean = activations.mean(dim=(2, 3), keepdim=True)
    std = activations.std(dim=(2, 3), keepdim=True, correction=0)
    weights = (activations > mean + k * std).to(activations.dtype).mean(dim=(2, 3), keepdim=True)
    return weights * activations


def kpca_cam(activations: Tensor) -> Tensor:
    """KPCA-CAM (Karmani et al., 2024): EigenCAM with kernel PCA, as pytorch-grad-cam computes it with scikit-learn's
    ``KernelPCA(n_components=1, kernel="sigmoid")``. With X the (h·w, K) activations centred over positions,
    K_ab = tanh(x_a·x_b / K + 1), centred in feature space (K − 1K − K1 + 1K1, 1 = 1/n), and (λ, α) its top
    eigenpair: map = α·√λ, its sign fixed so that α's largest-magnitude entry is positive (scikit-learn's
    ``svd_flip``). No gradients."""
    flat = activations.double().flatten(2).transpose(1, 2)
    flat = flat - flat.mean(dim=1, keepdim=True)
    positions, channels = flat.shape[1:]
    kernel = torch.tanh(flat @ flat.transpose(1, 2) / channels + 1.0)
    ones = torch.full((positions, positions), 1.0 / positions, dtype=kernel.dtype, device=kernel.device)
    centred = kernel - ones @ kernel - kernel @ ones + ones @ kernel @ ones
    values, vectors = torch.linalg.eigh(centred)
    alpha, value = vectors[:, :, -1], values[:, -1].clamp_min(0)
    largest = alpha.gather(1, alpha.abs().argmax(dim=1, keepdim=True))
    projection = torch.sign(largest) * alpha * value.sqrt()[:, None]
    return projection.view(activations.shape[0], *activations.shape[2:]).float()


def finer_seeds(logits: Tensor, classes: Tensor, alpha: float = 1.0, comparisons: int = 3) -> Tensor:
    """Finer-CAM's target (Zhang et al., CVPR 2025, pytorch-grad-cam's ``FinerCAM`` over ``GradCAM``), as the gradient
    of that target with respect to the logits, one row per explanation.

    For class c, the ``comparisons`` classes whose logits are nearest to y_c are the look-alikes s_1…s_3; with
    p = softmax(y), the target is Σ_k p_{s_k}·(y_c − α·y_{s_k}) / Σ_k p_{s_k}: what sets c apart from the classes it
    is confused with. The map is then Grad-CAM of that target. Returns ∂target/∂y, (P, classes).
    """
    with torch.enable_grad():
        y = logits.detach().float().requires_grad_(True)
        rows = torch.arange(len(y), device=y.device)
        distance = (y.detach() - y.detach()[rows, classes][:, None]).abs()
        distance[rows, classes] = -1.0  # the class itself comes first; its look-alikes follow
        similar = distance.argsort(dim=1, stable=True)[:, 1 : 1 + min(comparisons, y.shape[1] - 1)]
        # p_s / Σ p_s over the look-alikes is the softmax of their logits alone: the same value without the 0/0
        # that p_s underflowing to 0 gives far from the top class (pytorch-grad-cam returns NaN maps there).
        look_alikes = y.gather(1, similar)
        weights = look_alikes.softmax(dim=1)
        target = (weights * (y[rows, classes][:, None] - alpha * look_alikes)).sum(dim=1)
        return torch.autograd.grad(target.sum(), y)[0]


AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))
"""``aug_smooth``'s copies, as pytorch-grad-cam makes them with ttach: a horizontal flip or not, times the
normalised input multiplied by 0.9, 1 or 1.1."""


def augment(image: Tensor, flip: bool, factor: float) -> Tensor:
    """One of :data:`AUGMENTATIONS` of a normalised (C, H, W) image."""
    return (image.flip(-1) if flip else image) * factor


def reduce_contributions(contributions: Tensor, eigen_smooth: bool = False) -> Tensor:
    """Maps (P, h, w) from a method's output: per-channel contributions C (P, K, h, w) are summed over channels, or
    with ``eigen_smooth`` replaced by their first principal component (pytorch-grad-cam's ``eigen_smooth``: the
    projection of C onto its top singular vector, signed as in :func:`eigen_cam`); a map passes through."""
    if contributions.dim() == 3:
        return contributions
    return eigen_cam(contributions) if eigen_smooth else contributions.sum(dim=1)


def eigen_cam(activations: Tensor) -> Tensor:
    """EigenCAM (Muhammad & Yeasin, IJCNN 2020): the activations' first principal component, no gradients.

    With X the (h·w, K) activations of one image, centred over positions, and v₁ its first right singular vector:
    map = s · X v₁. The map does not depend on the class. An SVD fixes v₁ only up to its sign, so s = ±1 is chosen
    to make the map correlate positively with the mean activation Σ_k A_k / K: the component points where the
    layer fires. (pytorch-grad-cam leaves the sign to the SVD routine; the maps agree up to that sign.)
    """
    flat = activations.double().flatten(2).transpose(1, 2)
    centred = flat - flat.mean(dim=1, keepdim=True)
    positions, channels = centred.shape[1:]
    # X v₁ = σ₁ u₁: take the top eigenvector of the smaller Gram matrix, X Xᵀ or Xᵀ X, rather than a full SVD.
    if positions <= channels:
        values, vectors = torch.linalg.eigh(centred @ centred.transpose(1, 2))
        projection = vectors[:, :, -1] * values[:, -1:].clamp_min(0).sqrt()
    else:
        _, vectors = torch.linalg.eigh(centred.transpose(1, 2) @ centred)
        projection = (centred @ vectors[:, :, -1:]).squeeze(-1)
    mean_activation = centred.mean(dim=2)
    sign = torch.where((projection * mean_activation).sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
    return (sign * projection).view(activations.shape[0], *activations.shape[2:]).float()


GRADIENT_METHODS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gradcam": grad_cam,
    "gradcam++": grad_cam_plus_plus,
    "xgradcam": x_grad_cam,
    "hirescam": hires_cam,
    "layercam": layer_cam,
    "gradcam-elementwise": grad_cam_elementwise,
    "eigengradcam": eigen_grad_cam,
    "finercam": grad_cam,
    "shapleycam": grad_cam,
}
"""Each takes (A, g). ``finercam`` is Grad-CAM of the target of :func:`finer_seeds`; ``shapleycam`` is Grad-CAM with
g − ½·Hg·A in place of g (:meth:`CamEngine._gradients`)."""
ACTIVATION_METHODS: dict[str, Callable[[Tensor], Tensor]] = {
    "eigencam": eigen_cam,
    "kpcacam": kpca_cam,
    "fem": fem,
    "randomcam": random_cam,
}
"""Methods that read the activations alone: one map per image, whatever the class."""
METHODS = (*GRADIENT_METHODS, *ACTIVATION_METHODS, "scorecam", "ablationcam", "refinecam", "fullgrad", "sess")
"""Every method name the engine takes. ``scorecam`` (Wang et al., CVPRW 2020) is :meth:`CamEngine._score_cam`,
``ablationcam`` (Desai & Ramaswamy, WACV 2020) :meth:`CamEngine._ablation_cam`, ``refinecam``
:meth:`CamEngine._explain_refined`, ``fullgrad`` (Srinivas & Fleuret, NeurIPS 2019) :meth:`CamEngine._full_grad`."""
PERTURBATION_METHODS = ("scorecam", "ablationcam")
"""Methods that run the network once more per scored channel."""


# --- Layers ---


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


LAYOUTS = ("nchw", "nhwc", "cls_tokens", "tokens")
"""How a layer's output becomes the (N, K, h, w) grid that every method reads (the reshape-transform idea of
pytorch-grad-cam, as a property of the layer):

- ``nchw``: a convolutional map, as it is.
- ``nhwc``: channels last (torchvision's Swin): ``A.permute(0, 3, 1, 2)``.
- ``cls_tokens``: (N, 1 + h·w, K) tokens after a class token (ViT): drop token 0, reshape to (N, h, w, K), then
  permute to (N, K, h, w).
- ``tokens``: (N, h·w, K) tokens without a class token: the same reshape.

The map is linear in the tokens, so gradients take the same reshape.
"""


def to_grid(tensor: Tensor, layout: str) -> Tensor:
    """A layer's output (or its gradient) as an (N, K, h, w) grid; see :data:`LAYOUTS`."""
    if layout == "nchw":
        return tensor
    if layout == "nhwc":
        return tensor.permute(0, 3, 1, 2)
    if layout in ("cls_tokens", "tokens"):
        tokens = tensor[:, 1:] if layout == "cls_tokens" else tensor
        side = math.isqrt(tokens.shape[1])
        return tokens.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def _layout_of(shape: tuple[int, ...]) -> str | None:
    """The layout of a one-image output ``shape`` probed with a square input, or None when it is no spatial map.

    At a square input a spatial map is square: (1, K, s, s) is NCHW and (1, s, s, K) NHWC (K = s reads as NCHW).
    (1, T, K) is a token map when T − 1 (after a class token) or T is a square of a side above 1.
    """
    if len(shape) == 4:
        _, a, b, c = shape
        if b == c > 1:
            return "nchw"
        if a == b > 1:
            return "nhwc"
        return None
    if len(shape) == 3:
        for layout, grid_tokens in (("cls_tokens", shape[1] - 1), ("tokens", shape[1])):
            side = math.isqrt(max(grid_tokens, 0))
            if side > 1 and side * side == grid_tokens:
                return layout
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
    output_id: int
    """Equal for modules that return the very same tensor (a container and its last child, an in-place op)."""
    takes_image: bool
    """The module's input is the network's input: it is the whole trunk, not a layer of it."""


def describe_layers(model: nn.Module, image_size: int = 224, image: Tensor | None = None) -> dict[str, LayerInfo]:
    """The modules that run exactly once in a forward pass of one image, in the order they finish, with their
    output's layout (ResNet's shared ``relu`` runs several times and is left out). The image is ``image`` (one
    square image's batch, e.g. ``zeros_like(batch[:1])``) or else an RGB ``image_size`` square of zeros."""
    calls: dict[str, list[tuple[tuple[int, ...], Tensor | None, bool]]] = {}
    order: list[str] = []
    if image is None:
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        image = torch.zeros(1, 3, image_size, image_size, device=device)

    def record(name: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            tensor = output if isinstance(output, Tensor) else None
            takes_image = bool(inputs) and inputs[0] is image
            if name not in calls:
                order.append(name)
            calls.setdefault(name, []).append((tuple(tensor.shape) if tensor is not None else (), tensor, takes_image))

        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for hook in hooks:
            hook.remove()
    layers = {}
    for name in order:
        if len(calls[name]) != 1:
            continue
        shape, tensor, takes_image = calls[name][0]
        layout = _layout_of(shape) if shape else None
        grid = tuple(to_grid(torch.empty(shape, device="meta"), layout).shape[1:]) if layout else None
        layers[name] = LayerInfo(name, shape, layout, grid, id(tensor) if tensor is not None else -1, takes_image)
    return layers


def spatial_layers(model: nn.Module, image_size: int = 224) -> list[str]:
    """The submodules that a CAM can explain: those that run once per forward pass and give a spatial map
    (NCHW, NHWC or tokens; see :data:`LAYOUTS`). Modules called several times (ResNet's shared ``relu``) and those
    with flat outputs (``fc``) or 1×1 outputs (``avgpool``) are left out."""
    return [name for name, info in describe_layers(model, image_size).items() if info.layout]


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
        raise LayerNotFoundError("", [])
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
    same = [info for info in maps if info.output_id == last.output_id and not info.takes_image] or [last]

    def resolutions(name: str) -> int:
        inside = {info.grid[1:] for info in spatial if info.name.startswith(name + ".")}
        return len(inside | {layers[name].grid[1:]})

    stages = [info for info in same if resolutions(info.name) <= 2] or same
    depth = min(info.name.count(".") for info in stages)
    return [info.name for info in stages if info.name.count(".") == depth][-1]


# --- The engine ---


SESS_SCALES = 12
"""SESS's number of scales, as pytorch-grad-cam's default."""


def _window_starts(length: int, window: int) -> list[int]:
    """SESS's window positions along one side: every ``window`` pixels, the last one shifted back inside."""
    starts = []
    for start in range(0, length, window):
        if start + window >= length:
            starts.append(max(length - window, 0))
            break
        starts.append(start)
    return starts


def _effective_bias(layer: nn.Module) -> Tensor:
    """A layer's bias as FullGrad sees it: a convolution's own; a BatchNorm's β − μ·γ/√(σ² + ε) in eval mode."""
    if isinstance(layer, nn.BatchNorm2d):
        return layer.bias - layer.running_mean * layer.weight / torch.sqrt(layer.running_var + layer.eps)
    return layer.bias


def _normalise_channels(maps: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Each (image, channel) map min–max normalised as pytorch-grad-cam's ``scale_cam_image`` does it,
    (m − min m) / (max(m − min m) + 10⁻⁷), then bilinearly upsampled to ``size`` if given."""
    maps = maps.float()
    shifted = maps - maps.amin(dim=(2, 3), keepdim=True)
    scaled = shifted / (shifted.amax(dim=(2, 3), keepdim=True) + 1e-7)
    return scaled if size is None else _upsample(scaled, size)


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, C, h, w) maps bilinearly resized to ``size`` (``align_corners=False``, as OpenCV's INTER_LINEAR)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _minus_half_hvp(gradient: Tensor, activation: Tensor) -> Tensor:
    """g − ½·Σ_ab A_ab ∂g/∂A_ab for a gradient built with ``create_graph=True``; H = 0 where g does not depend on A."""
    if not gradient.requires_grad:
        return gradient.detach()
    (hvp,) = torch.autograd.grad(
        gradient, activation, grad_outputs=activation.detach(), retain_graph=True, allow_unused=True
    )
    return gradient.detach() if hvp is None else (gradient - 0.5 * hvp).detach()


@dataclass(frozen=True)
class CamRequest:
    """What to explain for one image: ``classes`` in that order, or else its ``top`` predicted classes."""

    classes: Sequence[int] | None = None
    top: int = 1
    layer: str | None = None
    """A dotted module path; None: the engine's default layer."""
    method: str = "gradcam"
    eigen_smooth: bool = False
    """The first principal component of the channels' contributions instead of their sum (see
    :func:`reduce_contributions`)."""
    aug_smooth: bool = False
    """Average the maps of flipped and brightened copies (see :meth:`CamEngine._explain_with_augmentations`)."""


@dataclass(frozen=True)
class CamOutput:
    """What the engine returns for a batch of N images.

    ``logits`` is (N, classes). For image ``n``, ``targets[n]`` lists the explained classes in order, and
    ``maps[n]`` is a (len(targets[n]), h, w) tensor at its layer's resolution, after ReLU, not yet normalised.
    """

    logits: Tensor
    targets: list[list[int]]
    maps: list[Tensor]


class CamEngine:
    """CAMs for a batch of images, each with its own classes, layer and method, from one forward pass.

    The split: the network before the earliest requested layer runs without autograd. That layer's output becomes
    the only leaf that requires a gradient, the rest runs with autograd, and one ``torch.autograd.grad`` call
    differentiates the raw logits y_c with respect to the requested activations alone: no parameter gradient is
    computed and nothing is written to ``.grad``. The hooks live only for the duration of the call and are removed
    even on error; each captured activation is a clone, so in-place ops downstream (``out += identity``) cannot
    corrupt it.

    Work is grouped by what each image needs. When some image asks for several classes, the leaf is repeated once
    per (image, class) pair, so that only the network after the layer runs again for the extra classes, and each
    pair's gradient comes from its own row: one image's ten targets do not widen every other image's gradient call.
    This needs a network whose rows do not interact in eval mode, as every classifier's do, and a layer whose
    output is the whole stream: at a layer inside a residual block the repeated rows would meet the block's
    unrepeated shortcut, so there the engine falls back (once; it remembers) to one ``torch.autograd.grad`` call
    batched over target slots with ``is_grads_batched``. EigenCAM is computed once per image, and ScoreCAM's masked
    forward passes once per image, whatever the number of classes.

    ``autocast_dtype`` (``torch.bfloat16``, ``torch.float16``) runs the network under ``torch.autocast``; maps are
    combined in float32. ScoreCAM scores at most ``scorecam_channels`` channels per map (those with the highest mean
    activation), ``scorecam_batch`` masked images per forward pass. ``input_size`` is the side of the square input
    the engine probes the network with, once, to learn its layers' shapes and layouts: token layers (ViT, Swin)
    become grids before any method sees them (:func:`to_grid`), and their gradients the same way.
    ``default_layer`` is the layer that requests without one explain (found by :func:`default_layer` if None).
    """

    def __init__(
        self,
        model: nn.Module,
        autocast_dtype: torch.dtype | None = None,
        scorecam_channels: int | None = 64,
        scorecam_batch: int = 32,
        input_size: int = 224,
        default_layer: str | None = None,
    ) -> None:
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.scorecam_channels = scorecam_channels
        self.scorecam_batch = scorecam_batch
        self.input_size = input_size
        self._layers: dict[str, LayerInfo] | None = None
        self._default_layer = default_layer
        self._unexpandable: set[frozenset[str]] = set()
        self.seconds: dict[str, float] = {}
        """The last call's wall time: ``forward`` (up to the logits) and ``cam`` (gradients and maps). On a GPU
        these are launch times unless the caller synchronises."""

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
            self._default_layer = default_layer(self.model, self.input_size, self.layers())
        return self._default_layer

    def spatial_layer(self, name: str | None) -> LayerInfo:
        """The probed layer ``name`` (None: the default), or :class:`LayerNotFoundError` if it gives no map."""
        info = self.layers().get(self.default_layer if name is None else name)
        if info is None or info.layout is None:
            raise LayerNotFoundError(str(name), [layer for layer, item in self.layers().items() if item.layout])
        return info

    def sess_windows(self) -> int:
        """How many windows SESS explains for one image of the engine's input size."""
        side = self.input_size
        step = round(side * 2 / 7)
        return sum(len(_window_starts(side + step * i, side)) ** 2 for i in range(SESS_SCALES))

    def logits(self, images: Tensor) -> Tensor:
        """The model's logits for ``images``, with no autograd and no hooks, under the engine's autocast."""
        autocast_on = self.autocast_dtype is not None
        with torch.no_grad(), torch.autocast(images.device.type, dtype=self.autocast_dtype, enabled=autocast_on):
            return self.model(images)

    def forward_passes(self, request: CamRequest) -> int:
        """The forward passes one image's request costs: 1, plus ScoreCAM's and Ablation-CAM's one per scored
        channel; times 6 with ``aug_smooth`` (plus one to rank the classes when none is given)."""
        passes = 1
        if request.method in PERTURBATION_METHODS:
            channels = self.spatial_layer(request.layer).grid[0]
            passes += min(channels, self.scorecam_channels) if self.scorecam_channels else channels
        if request.method == "refinecam":
            passes = 2
        if request.method == "sess":
            passes = 2 * self.sess_windows() + 1
        if request.aug_smooth:
            passes = len(AUGMENTATIONS) * passes + (request.classes is None)
        return passes

    def __call__(self, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
        # TorchServe runs inference() under inference_mode; gradients need normal tensors, index tensors included.
        with torch.inference_mode(False):
            images = images.clone() if images.is_inference() else images
            # FullGrad differentiates the whole network, so its images get their own pass; the rest share theirs.
            return self._explain_apart(images, requests, "fullgrad", self._full_grad)

    def _explain_composite(self, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
        if any(request.method == "sess" for request in requests):
            return self._explain_apart(images, requests, "sess", self._explain_sess)
        if any(request.method == "refinecam" for request in requests):
            return self._explain_refined(images, requests)
        return self._explain_smoothed(images, requests)

    def _explain_apart(
        self,
        images: Tensor,
        requests: Sequence[CamRequest],
        method: str,
        explain: Callable[[Tensor, Sequence[CamRequest]], CamOutput],
    ) -> CamOutput:
        """The images whose request asks for ``method`` through ``explain``, the others together as usual, and the
        answers back in the requests' order."""
        apart = [n for n, request in enumerate(requests) if request.method == method]
        if not apart:
            return self._explain_composite(images, requests)
        others = [n for n, request in enumerate(requests) if request.method != method]
        parts = [(apart, explain(images[apart], [requests[n] for n in apart]))]
        if others:
            parts.append((others, self._explain_composite(images[others], [requests[n] for n in others])))
        logits, targets, maps = [None] * len(requests), [None] * len(requests), [None] * len(requests)
        for rows, output in parts:
            for i, n in enumerate(rows):
                logits[n], targets[n], maps[n] = output.logits[i], output.targets[i], output.maps[i]
        return CamOutput(logits=torch.stack(logits), targets=targets, maps=maps)

    def _explain_sess(self, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
        """SESS (Tursun et al., 2022: Saliency Enhancing with Scaling and Sliding), as pytorch-grad-cam's ``SESS``
        over ``GradCAM`` computes it with its defaults. The image (side S) is resized so that its shorter side is
        each of 12 scales S, S + r, …, S + 11r (r = round(2S/7)); S×S windows slide over each with stride S (the
        last one shifted back inside). Each window's score is the softmax probability of the class (clipped at 0),
        divided by the best window's; each window's Grad-CAM, upsampled and normalised at the window's size, times
        its score, is pasted where the window was and resized back to the image; the fused map is the mean over the
        windows that are positive at each pixel, then a Gaussian blur (11×11, σ = 5). The classes are the whole
        image's.

        Cost: for every window one forward pass to score it and one forward and gradient pass to explain it, 122
        windows per image at the defaults, so 2·122 + 1 passes: raise the server's work budget to allow it. Maps
        come at the input's size."""
        logits = self.logits(images).float()
        targets, maps = [], []
        for image, row, request in zip(images, logits, requests):
            chosen = request.classes if request.classes is not None else row.topk(request.top).indices.tolist()
            targets.append([int(c) for c in chosen])
            maps.append(torch.stack([self._sess_map(image, request, c) for c in targets[-1]]))
        return CamOutput(logits=logits, targets=targets, maps=maps)

    def _sess_map(self, image: Tensor, request: CamRequest, target: int, batch: int = 32) -> Tensor:
        """One image's SESS map for one class (see :meth:`_explain_sess`); the windows' Grad-CAM keeps the request's
        layer and ``eigen_smooth``."""
        from torchvision.transforms.functional import gaussian_blur, resize

        height, width = image.shape[-2:]
        window = min(height, width)
        step = round(window * 2 / 7)
        patches, places = [], []
        for scale in (window + step * i for i in range(SESS_SCALES)):
            scaled = resize(image[None], scale)
            scaled_height, scaled_width = scaled.shape[-2:]
            for y in _window_starts(scaled_height, window):
                for x in _window_starts(scaled_width, window):
                    patches.append(scaled[0, :, y : y + window, x : x + window])
                    places.append((x, y, scaled_width, scaled_height))
        patches = torch.stack(patches)
        scores = torch.cat(
            [
                self.logits(patches[i : i + batch]).float().softmax(dim=1)[:, target]
                for i in range(0, len(patches), batch)
            ]
        )
        scores = scores.clamp_min(0)
        best = scores.max()
        weights = scores / best if best > 0 else torch.ones_like(scores)
        total = torch.zeros(height, width, device=image.device)
        counts = torch.zeros(height, width, device=image.device)
        for start in range(0, len(patches), batch):
            chunk = patches[start : start + batch]
            window_request = CamRequest(classes=[target], layer=request.layer, eigen_smooth=request.eigen_smooth)
            output = self._explain_smoothed(chunk, [window_request] * len(chunk))
            for offset, cam in enumerate(output.maps):
                index = start + offset
                scaled = normalize_map(cam, (window, window))[0] * weights[index]
                x, y, scaled_width, scaled_height = places[index]
                canvas = torch.zeros(scaled_height, scaled_width, device=image.device)
                canvas[y : y + window, x : x + window] = scaled
                pasted = F.interpolate(canvas[None, None], size=(height, width), mode="bilinear", align_corners=False)[
                    0, 0
                ]
                positive = pasted > 0
                total = total + torch.where(positive, pasted, torch.zeros_like(pasted))
                counts = counts + positive
        fused = torch.where(counts > 0, total / counts.clamp_min(1), torch.zeros_like(total))
        return gaussian_blur(fused[None, None], kernel_size=11, sigma=5.0)[0, 0]

    def _full_grad(self, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
        """FullGrad (Srinivas & Fleuret, NeurIPS 2019), as pytorch-grad-cam computes it: the input gradient and every
        bias gradient, each channel normalised and upsampled to the input, summed:

            map = Σ_c norm(|x_c · ∂y/∂x_c|) + Σ_layers Σ_k up(norm(|b_k · ∂y/∂z_k|))

        over every ``Conv2d`` and ``BatchNorm2d`` with a bias (a BatchNorm's effective bias is
        β − μ·γ/√(σ² + ε)), where z is the layer's output and norm(m) = (m − min m) / (max m + 10⁻⁷). It needs the
        whole network differentiated, from the input on: these images get their own forward pass with autograd,
        and one gradient call per target slot. Gradients are taken with respect to the input and the layers'
        outputs, never the parameters. The request's layer does not apply. Maps come at the input's size."""
        size = tuple(images.shape[-2:])
        counts = [request.top if request.classes is None else len(request.classes) for request in requests]
        layers = [
            module
            for module in self.model.modules()
            if type(module) in (nn.Conv2d, nn.BatchNorm2d) and module.bias is not None
        ]
        outputs: list[Tensor] = []

        def keep(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
            outputs.append(output)
            return output.clone()  # in-place ops downstream (ReLU) must not rewrite the kept output

        handles = [layer.register_forward_hook(keep) for layer in layers]
        try:
            with torch.enable_grad():
                x = images.detach().requires_grad_(True)
                logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        biases = [_effective_bias(layer).detach() for layer in layers]
        classes = []
        for request, count, row in zip(requests, counts, logits.detach()):
            chosen = request.classes if request.classes is not None else row.topk(count).indices.tolist()
            classes.append([int(c) for c in chosen])
        maps = [[] for _ in requests]
        for slot in range(max(counts)):
            seeds = torch.zeros_like(logits)
            for n, chosen in enumerate(classes):
                seeds[n, chosen[min(slot, len(chosen) - 1)]] = 1.0
            last = slot == max(counts) - 1
            gradients = torch.autograd.grad(logits, [x, *outputs], grad_outputs=seeds, retain_graph=not last)
            with torch.no_grad():
                # Upsampling is linear: summing a layer's normalised channels first, then upsampling once, gives
                # Σ_k up(norm(·)) exactly, at a fraction of the cost (ResNet-50 has 26 000 bias channels).
                total = _normalise_channels((gradients[0] * x).abs(), size).sum(dim=1)
                for bias, gradient in zip(biases, gradients[1:]):
                    summed = _normalise_channels((bias.view(1, -1, 1, 1) * gradient).abs()).sum(dim=1, keepdim=True)
                    total += _upsample(summed, size)[:, 0]
            for n, count in enumerate(counts):
                if slot < count:
                    maps[n].append(total[n].float())
        return CamOutput(logits=logits.detach().float(), targets=classes, maps=[torch.stack(m) for m in maps])

    def _explain_smoothed(self, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
        if not any(request.aug_smooth for request in requests):
            return self._explain(images, requests)
        return self._explain_with_augmentations(images, requests)

    def _explain_refined(self, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
        """RefineCAM (pytorch-grad-cam's ``RefineCAM`` over ``GradCAMPlusPlus``): the product of Grad-CAM++ maps of
        several layers, each min–max normalised at the input's size, which denoises an early layer's map with a
        deep one. Here the layers are the request's and the model's default layer:

            map = norm(up(GradCAM++_layer)) ⊙ norm(up(GradCAM++_default))

        The image is explained twice in the batch's one forward pass (the second copy at the default layer), so
        it costs 2 forward passes."""
        self.layers(images)
        refined = [n for n, request in enumerate(requests) if request.method == "refinecam"]
        batch_requests = [r if r.method != "refinecam" else replace(r, method="gradcam++") for r in requests]
        batch_requests += [replace(requests[n], method="gradcam++", layer=self.default_layer) for n in refined]
        output = self._explain_smoothed(torch.cat([images, images[refined]]), batch_requests)
        size = tuple(images.shape[-2:])
        maps = list(output.maps[: len(requests)])
        for i, n in enumerate(refined):
            maps[n] = normalize_map(output.maps[n], size) * normalize_map(output.maps[len(requests) + i], size)
        return CamOutput(logits=output.logits[: len(requests)], targets=output.targets[: len(requests)], maps=maps)

    def _explain_with_augmentations(self, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
        """``aug_smooth`` as pytorch-grad-cam does it (test-time augmentation, no paper behind it): each image is
        explained under every flip × brightness of :data:`AUGMENTATIONS`, each map is undone (flipped back),
        min–max normalised at the input's size, and the maps are averaged. The classes are the original image's
        (a plain forward pass ranks them when the request gives none); the logits are the original image's. All
        the copies share one forward pass with the batch's other images."""
        smoothed = [n for n, request in enumerate(requests) if request.aug_smooth]
        untouched = [n for n, request in enumerate(requests) if not request.aug_smooth]
        plain = [replace(requests[n], aug_smooth=False) for n in smoothed]
        if any(request.classes is None for request in plain):
            ranked = self.logits(images[smoothed]).float().topk(max(r.top for r in plain), dim=1).indices.tolist()
            plain = [
                request if request.classes is not None else replace(request, classes=ranked[i][: request.top])
                for i, request in enumerate(plain)
            ]
        copies = [augment(images[n], flip, factor) for n in smoothed for flip, factor in AUGMENTATIONS]
        batch = torch.cat([images[untouched], torch.stack(copies)]) if copies else images[untouched]
        batch_requests = [requests[n] for n in untouched] + [r for r in plain for _ in AUGMENTATIONS]
        output = self._explain(batch, batch_requests)
        size = tuple(images.shape[-2:])
        logits, targets, maps = [None] * len(requests), [None] * len(requests), [None] * len(requests)
        for i, n in enumerate(untouched):
            logits[n], targets[n], maps[n] = output.logits[i], output.targets[i], output.maps[i]
        for i, n in enumerate(smoothed):
            first = len(untouched) + i * len(AUGMENTATIONS)
            undone = [
                normalize_map(output.maps[first + a].flip(-1) if flip else output.maps[first + a], size)
                for a, (flip, _) in enumerate(AUGMENTATIONS)
            ]
            identity = first + AUGMENTATIONS.index((False, 1.0))
            logits[n], targets[n], maps[n] = output.logits[identity], output.targets[first], torch.stack(undone).mean(0)
        return CamOutput(logits=torch.stack(logits), targets=targets, maps=maps)

    def _explain(self, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
        if len(requests) != len(images):
            raise ValueError(f"got {len(requests)} requests for {len(images)} images")
        for request in requests:
            if request.method not in METHODS:
                raise ValueError(f"method must be one of {', '.join(METHODS)}, got {request.method!r}")
        self.layers(images)
        requests = [
            request if request.layer is not None else replace(request, layer=self.default_layer) for request in requests
        ]
        layouts = {request.layer: self.spatial_layer(request.layer).layout for request in requests}
        counts = [request.top if request.classes is None else len(request.classes) for request in requests]
        if min(counts, default=0) < 1:
            raise ValueError("every image needs at least one class to explain")
        layers = list(dict.fromkeys(request.layer for request in requests))
        modules = {layer: find_layer(self.model, layer) for layer in layers}
        gradient_layers = {r.layer for r in requests if r.method in GRADIENT_METHODS}

        # One row per (image, target) pair; class -1 - r stands for the image's (r+1)-th predicted class.
        device = images.device
        pairs_of_image = torch.tensor(counts)
        pair_image_host = torch.repeat_interleave(torch.arange(len(requests)), pairs_of_image)
        first_pair_host = torch.cumsum(pairs_of_image, 0) - pairs_of_image
        asked = [
            int(c)
            for r, n in zip(requests, counts)
            for c in (r.classes if r.classes is not None else range(-1, -n - 1, -1))
        ]
        # Pairs that share a layer and a method are computed together. Indices go to the device now: a copy from
        # host memory after the forward pass is queued would wait for it and leave the GPU idle.
        groups: dict[tuple[str, str, bool], list[int]] = {}
        for pair, n in enumerate(pair_image_host.tolist()):
            groups.setdefault((requests[n].layer, requests[n].method, requests[n].eigen_smooth), []).append(pair)
        pair_slot_host = torch.arange(len(asked)) - first_pair_host[pair_image_host]
        pair_image, first_pair, pair_slot, pair_class = (
            t.to(device)
            for t in (pair_image_host, first_pair_host, pair_slot_host, torch.tensor(asked, dtype=torch.long))
        )
        group_index = {key: torch.tensor(pairs).to(device) for key, pairs in groups.items()}
        wanted_expansion = bool(gradient_layers) and len(asked) > len(requests)
        expand = pair_image if wanted_expansion and frozenset(layers) not in self._unexpandable else None
        autocast = torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)
        # ShapleyCAM differentiates twice: fused attention kernels have no second derivative, the math one does.
        second_order = any(r.method == "shapleycam" for r in requests)
        attention = sdpa_kernel([SDPBackend.MATH]) if second_order else contextlib.nullcontext()
        started = time.perf_counter()
        with autocast, attention:
            try:
                stream_logits, activations, per_pair = self._split_forward(images, modules, gradient_layers, expand)
                if expand is not None and len(stream_logits) != len(asked):
                    raise RuntimeError(f"{len(stream_logits)} rows of logits for {len(asked)} pairs")
            except RuntimeError:
                if expand is None:
                    raise
                # Repeating rows inside a block breaks it (a residual branch meets the unrepeated input):
                # differentiate per target slot instead, and remember not to try again for these layers.
                self._unexpandable.add(frozenset(layers))
                expand = None
                stream_logits, activations, per_pair = self._split_forward(images, modules, gradient_layers, None)
            forward_done = time.perf_counter()
            logits = stream_logits[first_pair] if expand is not None else stream_logits
            if max(asked) >= logits.shape[1]:
                raise ValueError(f"classes must be below {logits.shape[1]}, got {max(asked)}")
            top = max((r.top for r in requests if r.classes is None), default=1)
            if top > logits.shape[1]:
                raise ValueError(f"cannot explain the top {top} of {logits.shape[1]} classes")
            ranked = logits.topk(top, dim=1).indices
            predicted = ranked[pair_image, (-pair_class - 1).clamp(0, top - 1)]
            pair_class = torch.where(pair_class < 0, predicted, pair_class)
            pair_methods = [requests[n].method for n in pair_image_host.tolist()]
            seeds = F.one_hot(pair_class, logits.shape[1]).to(logits.dtype)
            finer = torch.tensor([m == "finercam" for m in pair_methods], device=device)
            if bool(finer.any()):
                seeds[finer] = finer_seeds(logits[pair_image[finer]], pair_class[finer]).to(seeds.dtype)
            shapley_layers = {r.layer for r in requests if r.method == "shapleycam"}
            gradients, corrected = self._gradients(
                stream_logits, activations, gradient_layers, seeds, pair_image, pair_slot, expand is not None,
                shapley_layers,
            )  # fmt: skip
        rows = {  # for each layer, the row of its activations that belongs to each pair
            layer: torch.arange(len(asked), device=device) if per_pair[layer] else pair_image for layer in layers
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
        self.seconds = {"forward": forward_done - started, "cam": time.perf_counter() - forward_done}
        return CamOutput(logits=logits.detach().float(), targets=chosen, maps=list(pair_maps))

    def _split_forward(
        self, images: Tensor, modules: dict[str, nn.Module], gradient_layers: set[str], expand: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, bool]]:
        """The logits, each layer's activation, and whether that activation has one row per pair (else per image).

        The logits have one row per pair from the first gradient layer on when ``expand`` (each pair's image) is
        given, and one per image otherwise.
        """
        captured: dict[str, list[Tensor]] = {layer: [] for layer in modules}
        per_pair: dict[str, bool] = {}

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
                captured[layer].append(output.detach().clone())  # eigencam/scorecam: no gradient needed
                per_pair[layer] = False
                return None

            return hook

        handles = [module.register_forward_hook(capture(layer)) for layer, module in modules.items()]
        try:
            with torch.no_grad():
                logits = self.model(images)
        finally:
            for handle in handles:
                handle.remove()
        for layer, outputs in captured.items():
            if len(outputs) != 1:
                raise RuntimeError(f"layer {layer!r} ran {len(outputs)} times in one forward pass; expected once")
        return logits, {layer: outputs[0] for layer, outputs in captured.items()}, per_pair

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
                layer: _minus_half_hvp(g, activations[layer]).float()
                for layer, g in zip(layers, gradients)
                if layer in shapley_layers
            }
            return {layer: g.detach().float() for layer, g in zip(layers, gradients)}, corrected
        slots = int(pair_slot.max()) + 1
        grad_outputs = torch.zeros((slots, *logits.shape), dtype=logits.dtype, device=logits.device)
        grad_outputs[pair_slot, pair_image] = seeds.to(logits.dtype)
        if not second_order:
            gradients = torch.autograd.grad(logits, inputs, grad_outputs=grad_outputs, is_grads_batched=True)
            return {layer: g[pair_slot, pair_image].float() for layer, g in zip(layers, gradients)}, {}
        # Second order, one target slot at a time (is_grads_batched does not nest with a double backward).
        per_slot = [
            torch.autograd.grad(logits, inputs, grad_outputs=grad_outputs[slot], create_graph=True, retain_graph=True)
            for slot in range(slots)
        ]
        gradients = {layer: torch.stack([g[i] for g in per_slot]) for i, layer in enumerate(layers)}
        corrected = {
            layer: torch.stack([_minus_half_hvp(g[i], activations[layer]) for g in per_slot])[pair_slot, pair_image]
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
        """Each image's (T, h, w) maps, computed one (layer, method, eigen_smooth) group at a time."""
        maps: list[Tensor | None] = [None] * len(pair_image)
        with torch.no_grad():
            for (layer, method, eigen_smooth), pairs in groups.items():
                index = group_index[(layer, method, eigen_smooth)]
                pair_rows = rows[layer][index]
                if method in GRADIENT_METHODS:
                    gradient = (context.corrected if method == "shapleycam" else gradients)[layer][index]
                    group_maps = GRADIENT_METHODS[method](activations[layer].detach()[pair_rows].float(), gradient)
                else:  # class-independent work, once per image: unique rows, then back to pairs
                    unique_rows, pair_to_unique = pair_rows.unique(return_inverse=True)
                    unique_activations = activations[layer].detach()[unique_rows].float()
                    if method in ACTIVATION_METHODS:
                        group_maps = ACTIVATION_METHODS[method](unique_activations)[pair_to_unique]
                    elif method == "scorecam":
                        images_of_rows = pair_image[index].unique()
                        group_maps = self._score_cam(
                            images[images_of_rows], unique_activations, pair_to_unique, pair_class[index]
                        )
                    else:
                        images_of_rows = pair_image[index].unique()
                        group_maps = self._ablation_cam(
                            context.modules[layer],
                            context.layouts[layer],
                            images[images_of_rows],
                            context.raw[layer][unique_rows],
                            context.logits[images_of_rows],
                            pair_to_unique,
                            pair_class[index],
                        )
                group_maps = reduce_contributions(group_maps, eigen_smooth)
                if len(groups) == 1:  # the common case: every pair, in order; split into views, no copies
                    return list(F.relu(group_maps).split(counts))
                for pair, pair_map in zip(pairs, F.relu(group_maps)):
                    maps[pair] = pair_map
        per_image, start = [], 0
        for count in counts:
            per_image.append(torch.stack(maps[start : start + count]))
            start += count
        return per_image

    def _score_cam(self, images: Tensor, activations: Tensor, pair_to_image: Tensor, classes: Tensor) -> Tensor:
        """Score-CAM (Wang et al., CVPRW 2020): each channel, upsampled and min–max normalised, masks the input;
        the class's logit on the masked input scores the channel, and w = softmax over channels of the scores:

            M_k = norm(up(A_k)),   s_k = y_c(x ⊙ M_k),   w = softmax(s),   map = Σ_k w_k A_k

        As in pytorch-grad-cam, the masks are upsampled with ``align_corners=True``. The masked passes do not depend
        on the class: they run once per image, and every target of that image is scored from their logits. Cost: one
        forward pass per scored channel, batched ``scorecam_batch`` at a time; at most ``scorecam_channels``
        channels are scored (those with the highest mean activation), the rest get weight 0.

        ``images`` and ``activations`` have one row per image; ``pair_to_image`` and ``classes`` one per map.
        """
        masked_logits, selections = [], []
        for image, activation in zip(images, activations):
            chosen = self._channels_to_score(activation)
            selected = activation[chosen]
            masks = F.interpolate(selected[None], size=image.shape[-2:], mode="bilinear", align_corners=True)[0]
            low = masks.amin(dim=(1, 2), keepdim=True)
            high = masks.amax(dim=(1, 2), keepdim=True)
            masks = (masks - low) / (high - low + 1e-8)
            scores = []
            for start in range(0, len(masks), self.scorecam_batch):
                masked = image[None] * masks[start : start + self.scorecam_batch, None]
                with torch.autocast(
                    image.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
                ):
                    scores.append(self.model(masked).float())
            masked_logits.append(torch.cat(scores))
            selections.append(selected)
        maps = []
        for image_row, target in zip(pair_to_image.tolist(), classes.tolist()):
            weights = torch.softmax(masked_logits[image_row][:, target], dim=0)
            maps.append(weights[:, None, None] * selections[image_row])
        return torch.stack(maps)

    def _channels_to_score(self, activation: Tensor) -> Tensor:
        """The channels a perturbation method scores: every one, or the ``scorecam_channels`` with the highest mean
        activation (sorted), the rest getting weight 0."""
        channels = activation.shape[0]
        if self.scorecam_channels and channels > self.scorecam_channels:
            return activation.mean(dim=(1, 2)).topk(self.scorecam_channels).indices.sort().values
        return torch.arange(channels, device=activation.device)

    def _ablation_cam(
        self,
        module: nn.Module,
        layout: str,
        images: Tensor,
        raw: Tensor,
        logits: Tensor,
        pair_to_image: Tensor,
        classes: Tensor,
    ) -> Tensor:
        """Ablation-CAM (Desai & Ramaswamy, WACV 2020), as pytorch-grad-cam computes it: channel k's weight is the
        relative fall of the class's logit when the layer's channel k is ablated,

            w_k = (y_c − y_c(A with channel k ablated)) / y_c,   map = Σ_k w_k A_k

        where ablating sets the channel, at every position, to 0 if the layer's smallest activation is 0 and to
        that minimum − 10⁷ otherwise. The ablated layer's output replaces the real one in a forward pass, one row per
        ablated channel: where the layer's output is the whole stream, the network before it runs once per batch of
        ``scorecam_batch`` channels and only the rest runs per channel; inside a residual block the image itself is
        repeated. Like ScoreCAM it scores at most ``scorecam_channels`` channels (the rest get weight 0) and its
        passes serve every target of the image. ``images``, ``raw`` (the layer's raw outputs) and ``logits`` have one
        row per image; ``pair_to_image`` and ``classes`` one per map.
        """
        channel_dim = {"nchw": 1, "nhwc": 3}.get(layout, 2)
        ablated_logits, weights_index = [], []
        for image, output, grid in zip(images, raw, to_grid(raw, layout)):
            chosen = self._channels_to_score(grid)
            value = 0.0 if bool(output.min() == 0) else float(output.min()) - 1e7
            scores = []
            for start in range(0, len(chosen), self.scorecam_batch):
                channels = chosen[start : start + self.scorecam_batch]
                ablated = output[None].repeat(len(channels), *([1] * output.dim()))
                index = [torch.arange(len(channels), device=output.device)] + [slice(None)] * output.dim()
                index[channel_dim] = channels
                ablated[tuple(index)] = value
                scores.append(self._logits_with_layer_output(module, image, ablated))
            ablated_logits.append(torch.cat(scores))
            weights_index.append(chosen)
        maps = []
        grids = to_grid(raw, layout).float()
        for image_row, target in zip(pair_to_image.tolist(), classes.tolist()):
            original = logits[image_row, target]
            weights = torch.zeros(grids.shape[1], device=grids.device)
            weights[weights_index[image_row]] = (original - ablated_logits[image_row][:, target]) / original
            maps.append(weights[:, None, None] * grids[image_row])
        return torch.stack(maps)

    def _logits_with_layer_output(self, module: nn.Module, image: Tensor, outputs: Tensor) -> Tensor:
        """The logits when ``module``'s output is replaced by each row of ``outputs`` in turn, for one image."""

        def replace_output(_module: nn.Module, _inputs: object, _output: Tensor) -> Tensor:
            return outputs

        handle = module.register_forward_hook(replace_output)
        autocast_on = self.autocast_dtype is not None
        try:
            with torch.no_grad(), torch.autocast(image.device.type, dtype=self.autocast_dtype, enabled=autocast_on):
                try:
                    result = self.model(image[None])  # the network before the layer runs once for all rows
                    if len(result) == len(outputs):
                        return result.float()
                except RuntimeError:
                    pass  # the layer sits inside a block whose shortcut keeps one row: repeat the image instead
                return self.model(image[None].expand(len(outputs), *image.shape)).float()
        finally:
            handle.remove()


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


class GradCAM:
    """Grad-CAM on one layer (None: the model's default layer), for every image alike:
    ``GradCAM(model, "layer4")(images, targets)``.

    ``targets`` gives, per image, the classes to explain, or None for its top-1 predicted class.

    Example:
        >>> model = torchvision.models.resnet50().eval()
        >>> out = GradCAM(model, "layer4")(torch.rand(1, 3, 224, 224), targets=[[281]])
        >>> out.maps[0].shape
        torch.Size([1, 7, 7])
    """

    method = "gradcam"

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        autocast_dtype: torch.dtype | None = None,
        input_size: int = 224,
    ) -> None:
        if layer is not None:
            find_layer(model, layer)
        self.layer = layer
        self.engine = CamEngine(model, autocast_dtype=autocast_dtype, input_size=input_size)

    def __call__(self, images: Tensor, targets: Sequence[Sequence[int] | None] | None = None) -> CamOutput:
        targets = [None] * len(images) if targets is None else targets
        requests = [CamRequest(classes=classes, layer=self.layer, method=self.method) for classes in targets]
        return self.engine(images, requests)


def normalize_map(maps: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Upsample (T, h, w) maps bilinearly (``align_corners=False``) to ``size`` = (H, W), then min–max each to [0, 1].

    This is pytorch-grad-cam's post-processing. A constant map (all zero, say) becomes all zero, never NaN.
    """
    maps = maps.float()
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    low, high = maps.amin(dim=(1, 2), keepdim=True), maps.amax(dim=(1, 2), keepdim=True)
    span = high - low
    # A constant map has span 0: dividing by +inf instead turns it into zeros rather than NaN.
    return (maps - low) / torch.where(span > 0, span, torch.inf)
