"""Class activation maps for torch image classifiers, at the price of about one forward pass.

Pure torch: no TorchServe, no image library. Give it a model, a batch and, per image, what to explain (classes,
layer, method); it gives back the logits and one map per target, from one forward pass and one gradient call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CamEngine",
    "CamOutput",
    "CamRequest",
    "GRADIENT_METHODS",
    "GradCAM",
    "LayerNotFoundError",
    "METHODS",
    "eigen_cam",
    "find_layer",
    "grad_cam",
    "grad_cam_plus_plus",
    "hires_cam",
    "layer_cam",
    "layer_output_shapes",
    "normalize_map",
    "spatial_layers",
    "x_grad_cam",
]


# --- The methods: (activations A, gradients G), both (P, K, h, w), to maps (P, h, w) before the final ReLU. ---


def grad_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017): α_k = (1/Z) Σ_ij ∂y_c/∂A_k,ij, map = Σ_k α_k A_k."""
    return (gradients.mean(dim=(-2, -1), keepdim=True) * activations).sum(dim=1)


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
    return (weights * activations).sum(dim=1)


def x_grad_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al., BMVC 2020): w_k = Σ_ij (g_k,ij · A_k,ij) / Σ_ij A_k,ij, map = Σ_k w_k A_k."""
    activation_sums = activations.sum(dim=(-2, -1), keepdim=True)
    weights = (gradients * activations / (activation_sums + 1e-7)).sum(dim=(-2, -1), keepdim=True)
    return (weights * activations).sum(dim=1)


def hires_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """HiResCAM (Draelos & Carin, 2020): map = Σ_k g_k ⊙ A_k, the element-wise product, no spatial averaging."""
    return (gradients * activations).sum(dim=1)


def layer_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """LayerCAM (Jiang et al., TIP 2021): map = Σ_k relu(g_k) ⊙ A_k."""
    return (F.relu(gradients) * activations).sum(dim=1)


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
}
METHODS = (*GRADIENT_METHODS, "eigencam", "scorecam")
"""Every method name the engine takes. ``scorecam`` (Wang et al., CVPRW 2020) is in :meth:`CamEngine._score_cam`."""


# --- Layers ---


class LayerNotFoundError(ValueError):
    """The requested layer name does not name a usable layer of the model."""

    def __init__(self, name: str, valid: Sequence[str]) -> None:
        self.name = name
        self.valid = list(valid)
        top_level = [layer for layer in self.valid if "." not in layer]
        super().__init__(
            f"layer must be one of {', '.join(top_level)} or a dotted submodule such as "
            f"{self.valid[-1] if self.valid else 'layer4.2'}, got {name!r}"
        )


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule that the dotted ``name`` points at, or :class:`LayerNotFoundError`."""
    try:
        if name:
            return model.get_submodule(name)
    except AttributeError:
        pass
    raise LayerNotFoundError(name, [layer for layer, _ in model.named_modules() if layer])


def layer_output_shapes(model: nn.Module, image_size: int = 64) -> dict[str, tuple[int, ...]]:
    """Each submodule's output shape for one ``image_size`` square image, for the modules that run exactly once per
    forward pass (ResNet's shared ``relu`` runs several times and is left out)."""
    calls: dict[str, list[tuple[int, ...]]] = {}
    hooks = [
        module.register_forward_hook(
            lambda m, i, o, name=name: calls.setdefault(name, []).append(
                tuple(o.shape) if isinstance(o, Tensor) else ()
            )
        )
        for name, module in model.named_modules()
        if name
    ]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: shapes[0] for name, shapes in calls.items() if len(shapes) == 1}


def spatial_layers(model: nn.Module, image_size: int = 64) -> list[str]:
    """The submodules that a CAM can explain: those that run once per forward pass and give a (N, K, h, w) map.

    Found by one forward pass of a small input. Modules called several times (ResNet's shared ``relu``) and those
    with flat outputs (``fc``) or 1×1 outputs (``avgpool``) are left out.
    """
    shapes = layer_output_shapes(model, image_size)
    return [name for name, shape in shapes.items() if len(shape) == 4 and shape[-1] > 1]


# --- The engine ---


@dataclass(frozen=True)
class CamRequest:
    """What to explain for one image: ``classes`` in that order, or else its ``top`` predicted classes."""

    classes: Sequence[int] | None = None
    top: int = 1
    layer: str = "layer4"
    method: str = "gradcam"


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
    the engine probes the network with to learn its layers' shapes.
    """

    def __init__(
        self,
        model: nn.Module,
        autocast_dtype: torch.dtype | None = None,
        scorecam_channels: int | None = 64,
        scorecam_batch: int = 32,
        input_size: int = 224,
    ) -> None:
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.scorecam_channels = scorecam_channels
        self.scorecam_batch = scorecam_batch
        self.input_size = input_size
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._unexpandable: set[frozenset[str]] = set()
        self.seconds: dict[str, float] = {}
        """The last call's wall time: ``forward`` (up to the logits) and ``cam`` (gradients and maps). On a GPU
        these are launch times unless the caller synchronises."""

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each module's output shape for one input image (modules that run once per forward pass), probed once."""
        if self._shapes is None:
            self._shapes = layer_output_shapes(self.model, self.input_size)
        return self._shapes

    def forward_passes(self, request: CamRequest) -> int:
        """The forward passes one image's request costs: 1, plus ScoreCAM's one per scored channel."""
        if request.method != "scorecam":
            return 1
        channels = self.layer_shapes()[request.layer][1]
        return 1 + (min(channels, self.scorecam_channels) if self.scorecam_channels else channels)

    def __call__(self, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
        # TorchServe runs inference() under inference_mode; gradients need normal tensors, index tensors included.
        with torch.inference_mode(False):
            return self._explain(images.clone() if images.is_inference() else images, requests)

    def _explain(self, images: Tensor, requests: Sequence[CamRequest]) -> CamOutput:
        if len(requests) != len(images):
            raise ValueError(f"got {len(requests)} requests for {len(images)} images")
        for request in requests:
            if request.method not in METHODS:
                raise ValueError(f"method must be one of {', '.join(METHODS)}, got {request.method!r}")
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
        groups: dict[tuple[str, str], list[int]] = {}
        for pair, n in enumerate(pair_image_host.tolist()):
            groups.setdefault((requests[n].layer, requests[n].method), []).append(pair)
        pair_slot_host = torch.arange(len(asked)) - first_pair_host[pair_image_host]
        pair_image, first_pair, pair_slot, pair_class = (
            t.to(device)
            for t in (pair_image_host, first_pair_host, pair_slot_host, torch.tensor(asked, dtype=torch.long))
        )
        group_index = {key: torch.tensor(pairs).to(device) for key, pairs in groups.items()}
        wanted_expansion = bool(gradient_layers) and len(asked) > len(requests)
        expand = pair_image if wanted_expansion and frozenset(layers) not in self._unexpandable else None
        autocast = torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)
        started = time.perf_counter()
        with autocast:
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
            gradients = self._gradients(
                stream_logits, activations, gradient_layers, pair_class, pair_image, pair_slot, expand is not None
            )
        rows = {  # for each layer, the row of its activations that belongs to each pair
            layer: torch.arange(len(asked), device=device) if per_pair[layer] else pair_image for layer in layers
        }
        pair_maps = self._pair_maps(
            images, counts, activations, gradients, rows, pair_image, pair_class, groups, group_index
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
        pair_class: Tensor,
        pair_image: Tensor,
        pair_slot: Tensor,
        rows_are_pairs: bool,
    ) -> dict[str, Tensor]:
        """∂y_c/∂A for every pair and gradient layer, each a (pairs, K, h, w) tensor, from one ``autograd.grad``.

        When the logits have one row per pair (see :meth:`_split_forward`), row p's seed selects its class. Else
        the logits have one row per image, and seed t selects each image's t-th class, differentiated together
        through ``is_grads_batched``.
        """
        if not gradient_layers:
            return {}
        layers = [layer for layer in activations if layer in gradient_layers]
        inputs = [activations[layer] for layer in layers]
        if rows_are_pairs or len(pair_class) == len(logits):
            seeds = torch.zeros_like(logits)
            seeds[torch.arange(len(pair_class), device=logits.device), pair_class] = 1.0
            gradients = torch.autograd.grad(logits, inputs, grad_outputs=seeds)
            return {layer: g.float() for layer, g in zip(layers, gradients)}
        slots = int(pair_slot.max()) + 1
        seeds = torch.zeros((slots, *logits.shape), dtype=logits.dtype, device=logits.device)
        seeds[pair_slot, pair_image, pair_class] = 1.0
        gradients = torch.autograd.grad(logits, inputs, grad_outputs=seeds, is_grads_batched=True)
        return {layer: g[pair_slot, pair_image].float() for layer, g in zip(layers, gradients)}

    def _pair_maps(
        self,
        images: Tensor,
        counts: list[int],
        activations: dict[str, Tensor],
        gradients: dict[str, Tensor],
        rows: dict[str, Tensor],
        pair_image: Tensor,
        pair_class: Tensor,
        groups: dict[tuple[str, str], list[int]],
        group_index: dict[tuple[str, str], Tensor],
    ) -> list[Tensor]:
        """Each image's (T, h, w) maps, computed one (layer, method) group at a time."""
        maps: list[Tensor | None] = [None] * len(pair_image)
        with torch.no_grad():
            for (layer, method), pairs in groups.items():
                index = group_index[(layer, method)]
                pair_rows = rows[layer][index]
                if method in GRADIENT_METHODS:
                    group_maps = GRADIENT_METHODS[method](
                        activations[layer].detach()[pair_rows].float(), gradients[layer][index]
                    )
                else:  # class-independent work, once per image: unique rows, then back to pairs
                    unique_rows, pair_to_unique = pair_rows.unique(return_inverse=True)
                    unique_activations = activations[layer].detach()[unique_rows].float()
                    if method == "eigencam":
                        group_maps = eigen_cam(unique_activations)[pair_to_unique]
                    else:
                        images_of_rows = pair_image[index].unique()
                        group_maps = self._score_cam(
                            images[images_of_rows], unique_activations, pair_to_unique, pair_class[index]
                        )
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
            channels = activation.shape[0]
            if self.scorecam_channels and channels > self.scorecam_channels:
                chosen = activation.mean(dim=(1, 2)).topk(self.scorecam_channels).indices.sort().values
            else:
                chosen = torch.arange(channels, device=activation.device)
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
            maps.append((weights[:, None, None] * selections[image_row]).sum(dim=0))
        return torch.stack(maps)


class GradCAM:
    """Grad-CAM on one layer, for every image alike: ``GradCAM(model, "layer4")(images, targets)``.

    ``targets`` gives, per image, the classes to explain, or None for its top-1 predicted class.

    Example:
        >>> model = torchvision.models.resnet50().eval()
        >>> out = GradCAM(model, "layer4")(torch.rand(1, 3, 224, 224), targets=[[281]])
        >>> out.maps[0].shape
        torch.Size([1, 7, 7])
    """

    method = "gradcam"

    def __init__(self, model: nn.Module, layer: str = "layer4", autocast_dtype: torch.dtype | None = None) -> None:
        find_layer(model, layer)
        self.layer = layer
        self.engine = CamEngine(model, autocast_dtype=autocast_dtype)

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
