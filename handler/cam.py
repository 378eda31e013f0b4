"""Class activation maps for torch image classifiers, at the price of about one forward pass.

Pure torch: no TorchServe, no image library. Give it a model, a layer name, a batch and the targets;
it gives back the logits and one map per target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CamOutput",
    "GradCAM",
    "LayerNotFoundError",
    "find_layer",
    "layer_names",
    "normalize_map",
]

Targets = Sequence[Sequence[int] | None]
"""Per image: the class indices to explain, or None for the top-1 predicted class."""


class LayerNotFoundError(ValueError):
    """The requested layer name does not name a submodule of the model."""

    def __init__(self, name: str, valid: Sequence[str]) -> None:
        self.name = name
        self.valid = list(valid)
        shown = ", ".join(self.valid[:12]) + (", ..." if len(self.valid) > 12 else "")
        super().__init__(f"layer {name!r} is not a submodule of the model; valid layers include: {shown}")


def layer_names(model: nn.Module) -> list[str]:
    """Every named submodule of ``model``, in definition order (``conv1``, ``layer4``, ``layer4.2.conv3``, ...)."""
    return [name for name, _ in model.named_modules() if name]


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule that the dotted ``name`` points at, or :class:`LayerNotFoundError`."""
    try:
        if name:
            return model.get_submodule(name)
    except AttributeError:
        pass
    raise LayerNotFoundError(name, layer_names(model))


@dataclass(frozen=True)
class CamOutput:
    """What one call of a CAM explainer returns for a batch of N images.

    ``logits`` is (N, classes). For image ``n``, ``targets[n]`` lists the explained classes in the order asked,
    and ``maps[n]`` is a (len(targets[n]), h, w) tensor at the layer's resolution, after ReLU, not yet normalised.
    """

    logits: Tensor
    targets: list[list[int]]
    maps: list[Tensor]


class _CAM:
    """A gradient-based CAM over one layer, with a split forward pass.

    The part of the network before ``layer`` runs without autograd. The layer's output becomes the only leaf that
    requires a gradient, the rest of the network runs with autograd, and ``torch.autograd.grad`` differentiates the
    raw logits y_c with respect to that activation alone: no parameter gradient is computed and nothing is written
    to ``.grad``. The hook that does the split lives only for the duration of the call.

    Several targets per image share the one forward pass: their gradients come from one batched gradient call
    (``is_grads_batched``). Subclasses supply :meth:`combine`, which turns (activations, gradients) into a map.
    """

    method = ""

    def __init__(self, model: nn.Module, layer: str = "layer4", autocast_dtype: torch.dtype | None = None) -> None:
        """``autocast_dtype`` (``torch.bfloat16`` or ``torch.float16``) runs the network under ``torch.autocast``;
        the maps are still combined in float32."""
        self.model = model
        self.layer = layer
        self.module = find_layer(model, layer)
        self.autocast_dtype = autocast_dtype

    @staticmethod
    def combine(activations: Tensor, gradients: Tensor) -> Tensor:
        """(B, K, h, w) activations and gradients to (B, h, w) maps, before ReLU."""
        raise NotImplementedError

    def __call__(self, images: Tensor, targets: Targets | None = None) -> CamOutput:
        """Explain ``images`` (N, 3, H, W); ``targets`` defaults to the top-1 predicted class of each image."""
        targets = [None] * len(images) if targets is None else list(targets)
        if len(targets) != len(images):
            raise ValueError(f"got {len(targets)} target lists for {len(images)} images")
        autocast = torch.autocast(
            images.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )
        # One row per (image, target) pair; a class of -1 stands for the image's top-1 prediction.
        counts = [1 if wanted is None else len(wanted) for wanted in targets]
        if not counts or min(counts) == 0:
            raise ValueError("every image needs at least one target (or None for its top-1 class)")
        pair_image = torch.repeat_interleave(torch.arange(len(targets)), torch.tensor(counts)).to(images.device)
        pair_slot = torch.cat([torch.arange(count) for count in counts]).to(images.device)
        asked = [int(c) for wanted in targets for c in (wanted if wanted is not None else [-1])]
        pair_class = torch.tensor(asked, dtype=torch.long).to(images.device)
        with torch.inference_mode(False):
            if images.is_inference():
                images = images.clone()
            with autocast:
                logits, activations = self._split_forward(images)
                if max(asked) >= logits.shape[1] or min(asked) < -1:
                    raise ValueError(f"target classes must be in [0, {logits.shape[1]}), got {asked}")
                pair_class = torch.where(pair_class < 0, logits.argmax(dim=1)[pair_image], pair_class)
                gradients = self._target_gradients(logits, activations, max(counts), pair_slot, pair_image, pair_class)
            with torch.no_grad():
                pair_activations = activations.detach()[pair_image].float()
                pair_gradients = gradients[pair_slot, pair_image].float()
                maps = F.relu(self.combine(pair_activations, pair_gradients)).split(counts)
        classes = iter(pair_class.tolist())
        chosen = [[next(classes) for _ in range(count)] for count in counts]
        return CamOutput(logits=logits.detach().float(), targets=chosen, maps=list(maps))

    def _split_forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []

        def start_graph_here(module: nn.Module, inputs: object, output: Tensor) -> Tensor:
            activation = output.detach().requires_grad_(True)
            captured.append(activation)
            torch.set_grad_enabled(True)  # from here on; the enclosing no_grad() restores the mode on exit
            # A clone, so that in-place ops downstream (``out += identity``) cannot touch the leaf.
            return activation.clone()

        handle = self.module.register_forward_hook(start_graph_here)
        try:
            with torch.no_grad():
                logits = self.model(images)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"layer {self.layer!r} ran {len(captured)} times in one forward pass; expected once")
        return logits, captured[0]

    @staticmethod
    def _target_gradients(
        logits: Tensor, activations: Tensor, slots: int, pair_slot: Tensor, pair_image: Tensor, pair_class: Tensor
    ) -> Tensor:
        """∂y_c/∂A for every (target slot t, image n), as a (T, N, K, h, w) tensor; T is the longest target list.

        Row t of the seed selects, for each image, the logit of its t-th target; slots an image does not use stay 0.
        """
        selectors = torch.zeros((slots, *logits.shape), dtype=logits.dtype, device=logits.device)
        selectors[pair_slot, pair_image, pair_class] = 1.0
        if slots == 1:
            (gradients,) = torch.autograd.grad(logits, activations, grad_outputs=selectors[0])
            return gradients.unsqueeze(0)
        (gradients,) = torch.autograd.grad(logits, activations, grad_outputs=selectors, is_grads_batched=True)
        return gradients


class GradCAM(_CAM):
    """Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017).

    With A^k the layer's activation maps and y^c the raw logit of class c:

        α_k^c = (1/Z) Σ_i Σ_j ∂y^c/∂A^k_ij        L^c = ReLU(Σ_k α_k^c A^k)

    Example:
        >>> model = torchvision.models.resnet50().eval()
        >>> out = GradCAM(model, "layer4")(torch.rand(1, 3, 224, 224), targets=[[281]])
        >>> out.maps[0].shape
        torch.Size([1, 7, 7])
    """

    method = "gradcam"

    @staticmethod
    def combine(activations: Tensor, gradients: Tensor) -> Tensor:
        channel_weights = gradients.mean(dim=(-2, -1), keepdim=True)
        return (channel_weights * activations).sum(dim=1)


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
