"""Every CAM method as one record, in one registry. Dispatch, the work budget, the ``method`` option's accepted
values, the CLIs' choices, the docs' methods table and the parity tests all read :data:`METHODS`.

A record says what a method needs (gradients, activations alone, extra forward passes, its own autograd pass),
how it combines them, what a request costs, and whether it shares the batch's forward pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import partial

from torch import Tensor

from camserve.cam.augment import AUGMENTATIONS
from camserve.cam.capture import DEFAULT_METHOD, CamRequest, MapGroup, MethodEngine
from camserve.cam.methods import activation, attention, backprop, classifier, composite, gradient, perturbation
from camserve.cam.targets import TopPredicted

__all__ = ["DEFAULT_METHOD", "DETECTION_METHOD", "PYRAMID_METHOD", "Family", "METHODS", "Method", "method_record"]


class Family(StrEnum):
    """What a method reads, as torchcam splits its methods."""

    GRADIENT = "gradient"
    """The layer's activations and the gradient of the explained scalar with respect to them."""
    ACTIVATION = "activation"
    """The layer's activations alone: one map per image, whatever the class."""
    CLASSIFIER = "classifier"
    """The activations weighed by the model's own linear classifier for the class: no gradient, no extra pass."""
    PERTURBATION = "perturbation"
    """The activations, scored by extra forward passes of the network (one per scored channel)."""
    COMPOSITE = "composite"
    """Other methods' maps, or gradients from passes of its own: the whole network's, or noisy copies'."""


@dataclass(frozen=True)
class Method:
    """One CAM method."""

    name: str
    """The ``method`` option's value."""
    family: Family
    title: str
    """The method and its paper, as the docs cite it."""
    reference: str
    """The reference implementation it is matched to in the parity tests: a pytorch-grad-cam class, or a dotted
    path into torchcam or Captum."""
    combine: Callable | None = None
    """Gradient family: (A, g) → each channel's contribution; activation family: A → contributions or the map;
    perturbation family: (engine, :class:`~camserve.cam.methods.perturbation.Scoring`) → contributions."""
    second_order: Callable[[Tensor, Tensor], Tensor] | None = None
    """Its gradient corrected from a second differentiation: (g, A) → the gradient it combines (ShapleyCAM's
    g − ½·H·A)."""
    seeds: Callable | None = None
    """Its own scalar in place of the task's: (output rows, classes) → ∂scalar/∂outputs (Finer-CAM, which contrasts
    a class with its look-alikes under a softmax: it needs classes that exclude each other)."""
    parts: Callable[[CamRequest, str], list[CamRequest]] | None = None
    """Composite methods that share the forward pass: the requests whose maps it combines, given the request and
    the model's default layer."""
    merge: Callable | None = None
    """With ``parts``: (the parts' maps, the input's size) → the map."""
    run_apart: Callable[[MethodEngine, object, Sequence[CamRequest]], object] | None = None
    """Methods that cannot share the batch's forward pass: (engine, images, requests) → their output."""
    apart_passes: Callable[[int], int] | None = None
    """With ``run_apart``: the forward passes one image's request costs, given the model's input side."""
    channel_passes: int = 1
    """Perturbation family: the forward passes per scored channel."""
    applies: Callable[[MethodEngine, str], str | None] | None = None
    """For a method that needs a structure not every model has: (engine, layer) → None where it applies, else why
    not (the server's 400)."""

    @property
    def shares_forward_pass(self) -> bool:
        return self.run_apart is None

    @property
    def one_pass(self) -> bool:
        """Whether a plain request (no ``aug_smooth``) costs the one shared forward pass and nothing more."""
        return self.run_apart is None and self.parts is None and self.family is not Family.PERTURBATION

    @property
    def uses_gradients(self) -> bool:
        """It reads the gradient of the explained scalar at the layer, from the shared pass."""
        return self.family is Family.GRADIENT

    @property
    def activations_only(self) -> bool:
        """It reads the layer's activations alone: one map per image whatever the class, and nothing after the
        layer (its sanity figure is 1 by construction)."""
        return self.family is Family.ACTIVATION

    @property
    def any_dimensions(self) -> bool:
        """It reads the layer's positions as a set (a channel's mean, its sums, its principal components), so it
        explains a 3D network's map as well as a 2D one: the gradient and activation families, in the shared
        pass. The others resize, flip or mask the input in 2D."""
        return self.one_pass and self.family in (Family.GRADIENT, Family.ACTIVATION)

    @property
    def any_scalar(self) -> bool:
        """It explains any differentiable scalar of the output (a detection's box score), with no class scores: an
        activation-only method, or a gradient method with neither its own scalar nor a second derivative."""
        return self.activations_only or (self.uses_gradients and self.seeds is None and self.second_order is None)

    def maps(self, engine: MethodEngine, group: MapGroup) -> Tensor:
        """Each pair's contributions (pairs, K, h, w) or map (pairs, h, w) of one group of the shared pass, before
        ``eigen_smooth``'s reduction and the ReLU: a gradient method per pair; the others once per distinct image,
        then back to pairs."""
        if self.family is Family.GRADIENT:
            gradients = group.corrected if self.second_order else group.gradients
            return self.combine(group.activations[group.rows].float(), gradients)
        unique_rows, pair_to_unique = group.rows.unique(return_inverse=True)
        unique = group.activations[unique_rows].float()
        if self.family is Family.ACTIVATION:
            return self.combine(unique)[pair_to_unique]
        images_of_rows = group.pair_image.unique()
        scoring = perturbation.Scoring(
            module=group.module,
            layout=group.layout,
            images=group.images[images_of_rows],
            activations=unique,
            raw=group.raw[unique_rows],
            logits=group.logits[images_of_rows],
            pair_to_image=pair_to_unique,
            classes=group.classes,
        )
        return self.combine(engine, scoring)

    @property
    def formula(self) -> str:
        """The first paragraph of the docstring that carries the method's formula and paper, for the docs."""
        source = self.seeds or self.second_order or self.merge or self.run_apart or self.combine
        source = getattr(source, "func", source)  # a functools.partial
        text = " ".join((source.__doc__ or "").split("\n\n")[0].split())
        return re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")

    @property
    def needs(self) -> str:
        """What it needs, in words, for the docs."""
        if self.run_apart is not None:
            return "its own forward and autograd passes"
        if self.family is Family.PERTURBATION:
            return "activations; one forward pass per scored channel"
        if self.parts is not None:
            return "its parts' rows in the shared forward pass, with gradients"
        if self.family is Family.ACTIVATION:
            return "activations only"
        if self.family is Family.CLASSIFIER:
            return "activations and the classifier's weights"
        return "activations and a second-order gradient" if self.second_order else "activations and gradients"

    def forward_passes(self, engine: MethodEngine, request: CamRequest) -> int:
        """The forward passes one image's ``request`` costs: 1 for most methods; a perturbation method's 1 plus one
        per scored channel; a composite's per part; its own count for a method that runs apart. ``aug_smooth``
        multiplies a method that shares the forward pass by its 6 copies, plus one pass to rank the classes when
        the request names none."""
        if self.run_apart is not None:
            return self.apart_passes(engine.input_size)
        passes = 1
        if self.family is Family.PERTURBATION:
            channels = engine.spatial_layer(request.layer).grid[0]
            passes += self.channel_passes * perturbation.scored_channels(engine, channels)
        if self.parts is not None:
            passes = len(self.parts(request, engine.default_layer))
        if request.aug_smooth:
            passes = len(AUGMENTATIONS) * passes + isinstance(request.targets, TopPredicted)
        return passes


def _gradient(name: str, title: str, reference: str, combine: Callable, **extra) -> Method:
    return Method(name, Family.GRADIENT, title, reference, combine, **extra)


def _activation(name: str, title: str, reference: str, combine: Callable) -> Method:
    return Method(name, Family.ACTIVATION, title, reference, combine)


DETECTION_METHOD = "hirescam"
"""The method a detector's explanations use when a request names none. A box's score reaches the backbone only
near the box, so an element-wise method keeps it there, where Grad-CAM's channel weights, averaged over the whole
map, light every object alike: on the synthetic task's trained detector, HiResCAM's maps peak inside the explained
box 52 times in 52, Grad-CAM's 7 times (``tests/test_dense.py``)."""

PYRAMID_METHOD = "eigencam"
"""The method at a feature pyramid (an FPN detector's ``backbone``) when a request names none: gradient methods need
one tensor, and EigenCAM reads activations alone."""
_REFINE_INNER = "gradcam++"
_SESS_INNER = DEFAULT_METHOD


def _refine_parts(request: CamRequest, default_layer: str) -> list[CamRequest]:
    return [replace(request, method=_REFINE_INNER), replace(request, method=_REFINE_INNER, layer=default_layer)]


_RECORDS = (
    _gradient(DEFAULT_METHOD, "Grad-CAM (Selvaraju et al., ICCV 2017)", "GradCAM", gradient.grad_cam),
    _gradient(
        _REFINE_INNER, "Grad-CAM++ (Chattopadhay et al., WACV 2018)", "GradCAMPlusPlus", gradient.grad_cam_plus_plus
    ),
    _gradient("xgradcam", "XGrad-CAM (Fu et al., BMVC 2020)", "XGradCAM", gradient.x_grad_cam),
    _gradient("hirescam", "HiResCAM (Draelos & Carin, 2020)", "HiResCAM", gradient.hires_cam),
    _gradient("layercam", "LayerCAM (Jiang et al., TIP 2021)", "LayerCAM", gradient.layer_cam),
    _gradient(
        "gradcam-elementwise",
        "Element-wise Grad-CAM (pytorch-grad-cam)",
        "GradCAMElementWise",
        gradient.grad_cam_elementwise,
    ),
    _gradient("eigengradcam", "EigenGrad-CAM (pytorch-grad-cam)", "EigenGradCAM", gradient.eigen_grad_cam),
    _gradient(
        "finercam", "Finer-CAM (Zhang et al., CVPR 2025)", "FinerCAM", gradient.grad_cam, seeds=gradient.finer_seeds
    ),
    _gradient(
        "shapleycam",
        "ShapleyCAM (Cai et al., 2025)",
        "ShapleyCAM",
        gradient.grad_cam,
        second_order=gradient.minus_half_hvp,
    ),
    Method(
        "cam",
        Family.CLASSIFIER,
        "CAM (Zhou et al., CVPR 2016)",
        "torchcam.methods.CAM",
        classifier.cam,
        applies=classifier.cam_applies,
    ),
    _activation("eigencam", "EigenCAM (Muhammad & Yeasin, IJCNN 2020)", "EigenCAM", activation.eigen_cam),
    _activation("kpcacam", "KPCA-CAM (Karmani et al., 2024)", "KPCA_CAM", activation.kpca_cam),
    _activation("fem", "FEM (Fuad et al., IPTA 2020)", "FEM", activation.fem),
    _activation("randomcam", "RandomCAM, a baseline (pytorch-grad-cam)", "RandomCAM", activation.random_cam),
    Method(
        "scorecam",
        Family.PERTURBATION,
        "Score-CAM (Wang et al., CVPRW 2020)",
        "ScoreCAM",
        perturbation.score_cam,
    ),
    Method(
        "sscam",
        Family.PERTURBATION,
        "SS-CAM, Smoothed Score-CAM (Wang et al., 2020)",
        "torchcam.methods.SSCAM",
        perturbation.smoothed_score_cam,
        channel_passes=perturbation.SSCAM_SAMPLES,
    ),
    Method(
        "iscam",
        Family.PERTURBATION,
        "IS-CAM, Integrated Score-CAM (Naidu et al., 2020)",
        "torchcam.methods.ISCAM",
        perturbation.integrated_score_cam,
        channel_passes=perturbation.ISCAM_SAMPLES,
    ),
    Method(
        "ablationcam",
        Family.PERTURBATION,
        "Ablation-CAM (Desai & Ramaswamy, WACV 2020)",
        "AblationCAM",
        perturbation.ablation_cam,
    ),
    Method(
        "refinecam",
        Family.COMPOSITE,
        "RefineCAM (pytorch-grad-cam): Grad-CAM++ at the layer times at the default layer",
        "RefineCAM",
        parts=_refine_parts,
        merge=composite.refine,
    ),
    Method(
        "fullgrad",
        Family.COMPOSITE,
        "FullGrad (Srinivas & Fleuret, NeurIPS 2019)",
        "FullGrad",
        run_apart=composite.full_grad,
        apart_passes=lambda side: 1,
    ),
    Method(
        "smoothgradcam++",
        Family.COMPOSITE,
        "Smooth Grad-CAM++ (Omeiza et al., 2019)",
        "torchcam.methods.SmoothGradCAMpp",
        run_apart=backprop.smooth_grad_cam_pp,
        apart_passes=lambda side: 1 + backprop.SMOOTH_SAMPLES,
    ),
    Method(
        "guided-gradcam",
        Family.COMPOSITE,
        "Guided Grad-CAM (Selvaraju et al., ICCV 2017)",
        "captum.attr.GuidedGradCam",
        run_apart=backprop.guided_grad_cam,
        apart_passes=lambda side: 1,
    ),
    Method(
        "legrad",
        Family.COMPOSITE,
        "LeGrad (Bousselham et al., 2024), for vision transformers",
        "torchcam.methods.LeGrad",
        run_apart=attention.legrad,
        apart_passes=lambda side: 1,
        applies=attention.legrad_applies,
    ),
    Method(
        "sess",
        Family.COMPOSITE,
        "SESS (Tursun et al., 2022)",
        "SESS",
        run_apart=partial(composite.sess, inner=_SESS_INNER),
        apart_passes=lambda side: 2 * composite.sess_windows(side) + 1,
    ),
)

METHODS: dict[str, Method] = {record.name: record for record in _RECORDS}
"""Every method the engine takes, by name, in the order the docs list them."""


def method_record(name: str) -> Method:
    """The record of the method ``name``, or a ValueError that lists every method."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}") from None
