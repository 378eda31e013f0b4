"""From what a user has (an architecture name or a model file, weights, labels) to a validated model and its spec.

Build-time only: the build, the offline CLI and the benchmark use it; the archive carries only the result.
Every failure is a :class:`BuildError` whose message names the problem and the fix.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from camserve.cam import (
    CamEngine,
    CamRequest,
    Classes,
    LayerInfo,
    LayerNotFoundError,
    default_layer,
    describe_layers,
)
from camserve.cam.detection import DetectionRequest, explain_detections
from camserve.cam.layers import backbone_stage
from camserve.model import (
    HF_PREFIX,
    MONAI_PREFIX,
    OPEN_CLIP_PREFIX,
    TIMM_PREFIX,
    build_network,
    model_class_from_file,
    output_part,
    select_output,
)
from camserve.spec import ModelSpec
from camserve.tasks import TASKS, task_named
from camtools.errors import BuildError, WeightsUnavailableError

__all__ = [
    "BuildError",
    "PreparedModel",
    "WeightsUnavailableError",
    "add_model_arguments",
    "model_for_cli",
    "prepare_model",
    "read_checkpoint",
    "read_labels",
    "torchvision_archs",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = 224
DEFAULT_ARCH = "resnet50"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
"""Where ``save_pretrained`` writes the weights."""
HF_CONFIG_DIR = "hf"
"""The archive folder that holds a Hugging Face model's config.json."""
_MODEL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


@dataclass
class PreparedModel:
    """A model that passed validation: its spec, the network (eval, frozen), its weights and its model file."""

    spec: ModelSpec
    model: nn.Module
    state_dict: dict[str, torch.Tensor]
    model_file: Path | None = None
    hf_config: Path | None = None
    """A Hugging Face model's ``config.json``, packed into the archive's ``spec.hf_config`` folder."""
    hf_files: tuple[Path, ...] = ()
    """Further files packed beside it: a CLIP or SigLIP model's tokenizer."""


def torchvision_archs(kind: str = "classification") -> list[str]:
    """Every builder of torchvision for a kind of task: its classifiers
    (``torchvision.models.list_models(module=torchvision.models)``), detectors (``module=
    torchvision.models.detection``) or segmenters (``module=torchvision.models.segmentation``)."""
    import torchvision

    module = {"detection": torchvision.models.detection, "segmentation": torchvision.models.segmentation}
    return sorted(torchvision.models.list_models(module=module.get(kind, torchvision.models)))


DENSE_DEFAULT_ARCHS = {"detection": "fasterrcnn_resnet50_fpn", "segmentation": "deeplabv3_resnet50"}
"""The arch a detection or segmentation build takes when it names none."""
DETECTOR_INPUT_SIDE = 1333
"""A detector's images are given at their own size, their longer side at most this (torchvision's detectors'
``max_size``); their transform resizes them further."""


CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
"""Where training checkpoints keep the weights: Lightning's and the classic ``{"state_dict": ...}``, PyTorch's
tutorial's ``{"model_state_dict": ..., "optimizer_state_dict": ..., "epoch": ...}``, and ``{"model": ...}``."""
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Prefixes that wrappers add to every key: DataParallel's, torch.compile's; and a LightningModule's ``model.``
(its ``self.model``) in a Lightning checkpoint."""


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file: ``.safetensors`` through safetensors, anything else with ``torch.load(...,
    weights_only=True)``, as a bare state_dict or a training checkpoint (:data:`CHECKPOINT_KEYS`), with a wrapper's
    prefix (:data:`WRAPPER_PREFIXES`) removed when every key has it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"no weights file at {path}: give --weights imagenet, random or a file's path")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded = load_file(path, device="cpu")
        except (SafetensorError, OSError) as error:
            raise BuildError(f"{path} could not be read as a safetensors file: {error}") from None
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            reason = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().split(".")[0][:200]
            raise BuildError(
                f"{path} is not a plain state_dict: torch.load(weights_only=True) refused it ({reason}). If it is a "
                "whole pickled model, save its weights instead: torch.save(model.state_dict(), 'weights.pt')"
            ) from None
        except (RuntimeError, EOFError, OSError) as error:
            raise BuildError(f"{path} could not be read as a torch.save file: {error}") from None
    prefixes = WRAPPER_PREFIXES
    if isinstance(loaded, dict) and "pytorch-lightning_version" in loaded:
        prefixes += ("model.",)
    for key in CHECKPOINT_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        found = ", ".join(map(repr, list(loaded)[:12])) if isinstance(loaded, dict) else type(loaded).__name__
        raise BuildError(
            f"{path} holds no state_dict (a dict of tensors, bare or under {', '.join(CHECKPOINT_KEYS)}); it has: "
            f"{found}. Save the weights with torch.save(model.state_dict(), 'weights.pt')"
        )
    for prefix in prefixes:
        if all(key.startswith(prefix) for key in loaded):
            loaded = {key[len(prefix) :]: value for key, value in loaded.items()}
    return loaded


def read_labels(path: str | Path) -> list[str]:
    """Class names from a JSON list, a JSON object ``{"0": "cat", ...}``, TorchServe's ``index_to_name.json``
    (``{"0": ["n01440764", "tench"], ...}``) or a text file with one name per line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BuildError(f"cannot read the labels file {path}: {error}") from None
    if path.suffix.lower() != ".json" and not text.lstrip().startswith(("[", "{")):
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BuildError(f"the labels file {path} is not valid JSON: {error}") from None

    def name(value: object) -> str:
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            return value[1]  # index_to_name.json's [wnid, name]
        if isinstance(value, str):
            return value
        raise BuildError(f"labels in {path} must be names or [id, name] pairs, got {value!r:.60}")

    if isinstance(data, list):
        return [name(value) for value in data]
    if isinstance(data, dict):
        if sorted(data) != sorted(str(i) for i in range(len(data))):
            raise BuildError(f"the keys of {path} must be the class indices 0 to {len(data) - 1}")
        return [name(data[str(i)]) for i in range(len(data))]
    raise BuildError(f"the labels file {path} must hold a JSON list or object, got {type(data).__name__}")


def _imagenet_categories() -> list[str]:
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def _default_weights(arch: str):
    from torchvision.models import get_model_weights

    return get_model_weights(arch).DEFAULT


def _input_defaults(arch: str | None) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(input size, mean, std) from the arch's default torchvision weights' transforms, else 224 and ImageNet's."""
    if arch is None:
        return DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD
    if arch.startswith(TIMM_PREFIX):  # timm's data config for the model's default pretrained tag
        import timm

        config = timm.get_pretrained_cfg(arch.removeprefix(TIMM_PREFIX))
        if config is None:
            return DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD
        return int(config.input_size[-1]), tuple(config.mean), tuple(config.std)
    if arch in torchvision_archs("detection"):  # its transform normalises and resizes: the input is [0, 1] RGB
        return DETECTOR_INPUT_SIDE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    transforms = _default_weights(arch).transforms()
    if arch in torchvision_archs("segmentation"):  # SemanticSegmentation: a resize, no crop
        return int(transforms.resize_size[0]), tuple(transforms.mean), tuple(transforms.std)
    return int(transforms.crop_size[0]), tuple(transforms.mean), tuple(transforms.std)


def _arch_kwargs(arch: str, input_size: int, pretrained: bool) -> dict[str, object]:
    """Builder arguments that the arch's weights imply: a ViT's image size; GoogLeNet's and Inception's input
    transform and auxiliary heads as torchvision builds them for its own weights."""
    kwargs: dict[str, object] = {}
    if arch in torchvision_archs("detection") or arch in torchvision_archs("segmentation"):
        kwargs["weights_backbone"] = None  # the whole model's weights come next: no ImageNet backbone download
        if arch in torchvision_archs("segmentation") and pretrained and not arch.startswith("lraspp"):
            kwargs["aux_loss"] = True  # its weights carry the auxiliary classifier
    if arch.startswith("vit_"):
        kwargs["image_size"] = input_size
    if arch in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False
        if pretrained:
            kwargs |= {"transform_input": True, "aux_logits": True}
    return kwargs


def _seeded(build, seed: int, input_size: int, channels: int = 3, volume: tuple[int, ...] | None = None) -> nn.Module:
    """A model built under ``seed``, the same on every machine, and made well-conditioned so that its maps are
    numbers rather than rounding noise: weights initialised to zero (a ViT's head) are drawn from N(0, 0.02²), and
    batch-norm statistics are measured on two seeded batches of noise (fresh statistics of 0 and 1 let activations
    vanish through a deep EfficientNet)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.any():
                nn.init.normal_(module.weight, std=0.02)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if norms:
            momenta = [m.momentum for m in norms]
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # a cumulative average over the batches below
            model.train()
            # A detector in training mode wants targets: its backbone alone sets the statistics, on smaller images.
            detector = hasattr(model, "transform") and hasattr(model, "backbone")
            trunk, side = (model.backbone, min(input_size, 320)) if detector else (model, input_size)
            with torch.no_grad():
                for _ in range(2):
                    trunk(torch.randn(4, channels, *(volume or (side, side))))
            for norm, momentum in zip(norms, momenta, strict=True):
                norm.momentum = momentum
    return model.eval()


def _describe_keys(keys: set[str], limit: int = 6) -> str:
    shown = sorted(keys)[:limit]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


def _suggest_archs(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The torchvision archs whose parameter names are exactly these, those with the most tensors of the right shape
    first (built on the meta device: no memory)."""
    matches = []
    for arch in torchvision_archs():
        try:
            with torch.device("meta"):
                reference = build_network(_spec_stub(arch, _arch_kwargs(arch, _input_defaults(arch)[0], False)))
        except Exception:  # an arch that cannot be built on meta is simply not suggested
            continue
        expected = reference.state_dict()
        if expected.keys() == state_dict.keys():
            matches.append((sum(expected[k].shape == state_dict[k].shape for k in expected), arch))
    return [arch for _, arch in sorted(matches, key=lambda match: -match[0])]  # most tensors of the right shape


def _spec_stub(arch: str, kwargs: dict[str, object]) -> ModelSpec:
    return ModelSpec(
        name="stub", arch=arch, labels=(), input_size=0, mean=(0, 0, 0), std=(1, 1, 1), default_layer="",
        layers={}, weights="", arch_kwargs=kwargs,
    )  # fmt: skip


def _fit_torchvision(arch: str, state_dict: dict[str, torch.Tensor], kwargs: dict[str, object]) -> dict[str, object]:
    """The builder kwargs that make ``arch`` take this state_dict strictly: the head's size is read from the
    tensors. Raises a :class:`BuildError` naming the keys that do not fit and the archs the shapes suggest."""
    with torch.device("meta"):
        expected = build_network(_spec_stub(arch, kwargs)).state_dict()
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    mismatched = {k for k in expected.keys() & state_dict.keys() if expected[k].shape != state_dict[k].shape}
    classes = {state_dict[k].shape[0] for k in mismatched}
    head_only = (
        len(classes) == 1
        and all(expected[k].shape[0] == kwargs.get("num_classes", 1000) for k in mismatched)
        and all(expected[k].shape[1:] == state_dict[k].shape[1:] for k in mismatched)
    )
    if not missing and not unexpected and (not mismatched or head_only):
        return kwargs | ({"num_classes": classes.pop()} if mismatched else {})
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe_keys(unexpected)}")
    if mismatched and not head_only:
        shapes = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})" for k in sorted(mismatched)]
        more = f" and {len(shapes) - 4} more" if len(shapes) > 4 else ""
        problems.append(f"shapes that do not fit: {', '.join(shapes[:4])}{more}")
    suggestions = _suggest_archs(state_dict)
    advice = (
        f"the keys fit --arch {' or --arch '.join(suggestions[:3])}"
        if suggestions
        else "no torchvision arch has these keys: for a network of your own, give its class with --model-file"
    )
    raise BuildError(f"these weights do not fit --arch {arch}: {'; '.join(problems)}. {advice}")


def _with_batch_norm_counters(
    arch: str, state_dict: dict[str, torch.Tensor], kwargs: dict[str, object]
) -> dict[str, torch.Tensor]:
    """``state_dict`` with the ``num_batches_tracked`` counters that the arch's batch norms expect and the weights
    lack. torchvision's pretrained detectors (and models fine-tuned from them) use ``FrozenBatchNorm2d``, which keeps
    no counter; built without weights they have ``BatchNorm2d``, whose counter is then all that a strict load misses.
    The counters are 0: in eval mode both normalise with the same running statistics, and the counter is unused."""
    with torch.device("meta"):
        expected = build_network(_spec_stub(arch, kwargs)).state_dict().keys()
    missing = [
        key
        for key in expected
        if key.endswith(".num_batches_tracked")
        and key not in state_dict
        and key.removesuffix("num_batches_tracked") + "running_mean" in state_dict
    ]
    return state_dict | {key: torch.tensor(0, dtype=torch.long) for key in missing} if missing else state_dict


def _dense_classes(arch: str, state_dict: dict[str, torch.Tensor], kwargs: dict[str, object]) -> dict[str, object]:
    """A detector's or segmenter's builder kwargs with ``num_classes`` read from the weights: the model is built on
    the meta device with 2 and with 3 classes, and each tensor whose size grows with the classes (a box predictor's
    ``cls_score``, a RetinaNet's anchors × classes, a segmenter's classifier) gives the number; an auxiliary
    classifier in the weights is built too."""
    if any(key.startswith("aux_classifier.") for key in state_dict):
        kwargs = kwargs | {"aux_loss": True}
    with torch.device("meta"):
        two, three = (build_network(_spec_stub(arch, kwargs | {"num_classes": n})).state_dict() for n in (2, 3))
    counts = set()
    for key, tensor in two.items():
        per_class = three[key].numel() - tensor.numel()
        if per_class and key in state_dict:
            classes, rest = divmod(state_dict[key].numel() - (tensor.numel() - 2 * per_class), per_class)
            counts.add(classes if rest == 0 and classes > 0 else -1)
    if len(counts) == 1 and min(counts) > 0:
        return kwargs | {"num_classes": counts.pop()}
    return kwargs  # the strict fit below names what does not fit


def _imagenet_state_dict(arch: str, progress: bool) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """The arch's pretrained weights through its library's own download and cache (torchvision's, or timm's from the
    Hugging Face Hub), and their labels when the library gives them."""
    if arch.startswith(TIMM_PREFIX):
        import timm

        name = arch.removeprefix(TIMM_PREFIX)
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as error:  # the Hub client raises its own connection and lookup errors
            raise WeightsUnavailableError(
                f"could not download the pretrained weights of timm's {name} through timm.create_model(pretrained="
                f"True): {type(error).__name__}: {str(error)[:300]}.\nOffline, choose one of the other two: "
                "--weights PATH (a state_dict or .safetensors file) or --weights random (seeded, for tests only: its "
                "predictions mean nothing)."
            ) from None
        classes = model.num_classes
        return model.state_dict(), _imagenet_categories() if classes == 1000 else None
    weights = _default_weights(arch)
    try:
        state_dict = weights.get_state_dict(progress=progress, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad hash is a RuntimeError
        raise WeightsUnavailableError(
            f"could not download the {_trained_on(weights)} weights of {arch} ({weights.url}): {error}.\n"
            "Offline, choose one of the other two: --weights PATH (a state_dict file, e.g. one copied from "
            "torch.hub's cache on a machine that has it) or --weights random (seeded, for tests only: its "
            "predictions mean nothing)."
        ) from error
    return state_dict, list(weights.meta["categories"])


def _trained_on(weights) -> str:
    """What torchvision's ``weights`` were trained on, in words: ImageNet-1K, COCO, COCO with VOC's labels."""
    metric = next(iter(weights.meta.get("_metrics", {})), "")
    name = metric.split("-val")[0] if metric else "pretrained"
    return f"{name} (VOC's labels)" if "VOC" in metric else name


def _file_label(path: str | Path) -> str:
    """``file:<first 12 hex digits of the file's sha256>``, the name responses give file weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"file:{digest.hexdigest()[:12]}"


@dataclass(frozen=True)
class BuildRequest:
    """What the build was asked for: the model flags of ``scripts/build_mar.py``."""

    arch: str | None = None
    model_file: str | Path | None = None
    weights: str = "imagenet"
    labels: str | Path | None = None
    layer: str | None = None
    input_size: int | tuple[int, ...] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    model_name: str | None = None
    version: str = "1.0"
    seed: int = 0
    progress: bool = True
    task: str | None = None
    """None: multiclass, or what a Hugging Face directory's ``problem_type`` says."""
    threshold: float = 0.5
    output: str | None = None
    """Which part of a non-tensor output holds the logits; None: found (a tuple's first item, ``logits``)."""
    hf: str | Path | None = None
    """A directory written by ``save_pretrained`` for an ``AutoModelForImageClassification`` model, a ``CLIPModel``
    or ``SiglipModel`` (zero-shot), or a vision model whose pooled output is an embedding."""
    prompts: str | Path | None = None
    """A zero-shot model's default prompts, one per line."""
    channels: int = 3
    """The network's input channels: 3 (RGB) or 1 (grayscale)."""
    spatial_dims: int = 2
    """2 for images, 3 for a network of volumes (then ``input_size`` is (D, H, W))."""
    intensity: str = "minmax"
    """A volume's values to [0, 1]: ``minmax`` or ``window:LOW,HIGH`` (clipped, then scaled)."""
    template: str | None = None
    """A zero-shot model's prompt made of each label, ``{}`` for the label (default: CLIP's ``a photo of a {}.``)."""


@dataclass
class _Source:
    """Where the network comes from, resolved: a torchvision or timm arch, a model file's class or a Hugging Face
    directory, its input and its task."""

    arch: str
    model_path: Path | None
    model_class: type[nn.Module] | None
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    given_labels: list[str] | None
    task: str = "multiclass"
    hf_dir: Path | None = None
    hf_labels: list[str] | None = None
    encoder: str | None = None
    """How an image–text model gives its image embedding (``camserve.embeddings.ENCODERS``): ``hf``, ``open_clip``;
    None for any other network."""
    context: int | None = None
    """An image–text model's tokens per prompt."""
    channels: int = 3
    """The network's input channels (``--channels``)."""
    volume: tuple[int, int, int] | None = None
    """A 3D network's input (D, H, W) (``--spatial-dims 3 --input-size D H W``)."""
    intensity: str = "minmax"
    """How a volume's values become [0, 1] (``--intensity``)."""


def prepare_model(**flags) -> PreparedModel:
    """Build, load and validate a model, and describe it in a :class:`ModelSpec`: resolve the source, load the
    weights, probe the layers and the output, label the classes, validate one explanation.

    ``flags`` are :class:`BuildRequest`'s. Validation, before anything is written: the weights load strictly; the
    labels match the classes; the layer gives a spatial map; one explanation of a synthetic image at the default
    layer is finite and of the layer's shape.
    """
    request = BuildRequest(**flags)
    source = _resolve(request)
    model, kwargs, default_labels = _load(source, request)
    if task_named(source.task).kind in SIMILARITY_KINDS:
        return _prepare_similarity(request, source, model, kwargs)
    layers, outputs, output_key = _probe(model, source, request.output)
    select_output(model, output_key)
    if task_named(source.task).kind == "detection":  # its classes: the builder's, the weights' or the labels'
        outputs = kwargs.get("num_classes") or len(source.given_labels or default_labels or [])
        if not outputs:
            raise BuildError(f"a detector's output does not say how many classes {source.arch} has: give --labels")
    names = _label(source, request, default_labels or source.hf_labels, outputs)
    layer, spatial = _validate(model, source, request.layer, layers, len(names))
    default_name = source.hf_dir.resolve().name if source.hf_dir else source.arch.removeprefix(TIMM_PREFIX)
    name = _model_name(request, default_name)
    spec = ModelSpec(
        name=name,
        arch=source.arch,
        labels=tuple(names),
        input_size=source.input_size,
        mean=source.mean,
        std=source.std,
        default_layer=layer,
        layers=spatial,
        weights=_weights_label(request),
        version=request.version,
        model_file=source.model_path.name if source.model_path else None,
        arch_kwargs=kwargs,
        task=source.task,
        threshold=request.threshold,
        output=output_key,
        hf_config=HF_CONFIG_DIR if source.hf_dir else None,
        channels=source.channels,
        volume=source.volume,
        intensity=source.intensity,
    )
    hf_config = source.hf_dir / "config.json" if source.hf_dir else None
    return PreparedModel(spec, model, model.state_dict(), source.model_path, hf_config)


SIMILARITY_KINDS = ("zero-shot", "embedding")
"""The tasks without a fixed class list (:mod:`camtools.similarity`)."""


def _prepare_similarity(request: BuildRequest, source: _Source, model: nn.Module, kwargs) -> PreparedModel:
    """A zero-shot or embedding model: wrapped to be scored against columns, its layers probed, its embedding's
    size measured, its default prompts made, one explanation validated."""
    from camtools import similarity

    scored = task_named(source.task).kind == "zero-shot"
    if scored and source.encoder is None:
        raise BuildError(
            "--task zero-shot needs an image–text model: --hf DIR of a CLIPModel or SiglipModel, or --arch "
            "open_clip:NAME"
        )
    side, output_key = source.input_size, None
    if source.encoder is None:  # the network's output is the embedding: a tensor, or the part --output names
        output_key = request.output or _vector_output(model, side)
        select_output(model, output_key)
    wrapped = similarity.wrap(model, source.encoder or "vector", scored)
    layers = describe_layers(wrapped, side)
    spatial = {name: info.layout for name, info in layers.items() if info.layout}
    if request.layer is not None and request.layer not in spatial:
        raise BuildError(
            f"layer {request.layer} gives no spatial map; {LayerNotFoundError(request.layer, list(spatial))}"
        )
    layer = request.layer or default_layer(wrapped, side, layers)
    embedding = {"encoder": source.encoder or "vector", "size": similarity.embedding_size(wrapped, side)}
    embedding["scores"] = "logits" if scored else "cosine"
    if source.context is not None:
        embedding["context"] = source.context
    if source.encoder == "open_clip":
        embedding["open_clip"] = source.arch.removeprefix(OPEN_CLIP_PREFIX)
    prompts = similarity.default_prompts(request.prompts, source.given_labels, request.template) if scored else []
    similarity.validate(wrapped, embedding, source.hf_dir, prompts, layer, side)
    default_name = source.hf_dir.resolve().name if source.hf_dir else source.arch.removeprefix(OPEN_CLIP_PREFIX)
    spec = ModelSpec(
        name=_model_name(request, default_name), arch=source.arch, labels=tuple(prompts), input_size=side,
        mean=source.mean, std=source.std, default_layer=layer, layers=spatial, weights=_weights_label(request),
        version=request.version, model_file=source.model_path.name if source.model_path else None,
        arch_kwargs=kwargs, task=source.task, output=output_key, hf_config=HF_CONFIG_DIR if source.hf_dir else None,
        embedding=embedding,
    )  # fmt: skip
    hf_config = source.hf_dir / "config.json" if source.hf_dir else None
    hf_files = similarity.hf_files(source.hf_dir) if source.hf_dir else ()
    return PreparedModel(spec, wrapped, wrapped.state_dict(), source.model_path, hf_config, hf_files)


def _vector_output(model: nn.Module, side: int) -> str | None:
    """Which part of an embedding network's output is the embedding: None for a tensor, a tuple's first item, or a
    transformers model's ``image_embeds`` or ``pooler_output``."""
    with torch.no_grad():
        probe = model(torch.zeros(1, 3, side, side))
    if isinstance(probe, torch.Tensor):
        return None
    if isinstance(probe, (tuple, list)):
        return "0"
    keys = set(probe.keys()) if hasattr(probe, "keys") else set()
    found = next((key for key in ("image_embeds", "pooler_output") if key in keys), None)
    if found is None:
        raise BuildError(
            f"this network returns a {type(probe).__name__}, not an embedding: name the part that holds it with "
            "--output"
        )
    return found


def _model_name(request: BuildRequest, default_name: str) -> str:
    name = request.model_name or re.sub(r"[^a-z0-9_-]", "_", default_name.lower())
    if not _MODEL_NAME.fullmatch(name):
        raise BuildError(f"--model-name must be a letter then letters, digits, '_' or '-' (64 at most), got {name!r}")
    return name


def _weights_label(request: BuildRequest) -> str:
    if request.weights in ("imagenet", "random") or not Path(request.weights).is_file():
        return request.weights  # a named set of pretrained weights (open_clip's tags)
    return _file_label(request.weights)


def _resolve(request: BuildRequest) -> _Source:
    """The network's source (a known torchvision arch, or a model file with one ``nn.Module``) and its input."""
    arch, model_path, model_class, task = request.arch, None, None, None
    if sum(bool(given) for given in (arch, request.model_file, request.hf)) > 1:
        raise BuildError(
            "give one of --arch (torchvision or timm:NAME), --model-file (your own network) or --hf DIR, not both"
        )
    if request.task is not None and request.task not in TASKS:
        raise BuildError(f"--task must be one of {', '.join(TASKS)}, got {request.task!r}")
    if not 0 <= request.threshold <= 1:
        raise BuildError(f"--threshold must be a probability from 0 to 1, got {request.threshold}")
    if request.spatial_dims == 3 or isinstance(request.input_size, (list, tuple)):
        request = _sized(request)
    if request.spatial_dims == 3:
        return _resolve_volume(request)
    if request.channels not in (1, 3):
        raise BuildError(f"--channels must be 1 (grayscale) or 3 (RGB), got {request.channels}")
    if request.channels != 3 and not request.model_file:
        raise BuildError(
            "--channels 1 takes a --model-file network whose first layer reads one channel; torchvision's, timm's "
            "and Hugging Face's image models read RGB: give those --channels 3 (a grayscale upload fills all three)"
        )
    if request.hf:
        return _resolve_hf(request)
    if (arch or "").startswith(OPEN_CLIP_PREFIX):
        return _resolve_open_clip(request)
    if request.model_file:
        model_path = Path(request.model_file)
        if not model_path.is_file():
            raise BuildError(f"no model file at {model_path}")
        try:
            model_class = model_class_from_file(model_path)
        except Exception as error:
            raise BuildError(f"cannot use the model file {model_path}: {error}") from None
        arch = model_class.__name__
        if request.weights == "imagenet":
            raise BuildError("--weights imagenet needs --arch; give a --model-file network its weights as a PATH")
    elif (arch or "").startswith(TIMM_PREFIX):
        import timm

        name, names = arch.removeprefix(TIMM_PREFIX), timm.list_models()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else "no name is close."
            raise BuildError(
                f"--arch {arch} is not a timm model: {hint} timm has {len(names)}; list them by pattern with "
                f"python -c \"import timm; print(timm.list_models('*{name[:4] or 'resnet'}*'))\""
            )
    else:
        kinds = {kind: torchvision_archs(kind) for kind in ("classification", "detection", "segmentation")}
        if request.task is None:  # a detector's or segmenter's builder says its task
            task = next((k for k in ("detection", "segmentation") if arch in kinds[k]), None)
        kind = task_named(request.task or task or "multiclass").kind
        arch = arch or DENSE_DEFAULT_ARCHS.get(kind, DEFAULT_ARCH)
        if arch not in kinds[kind]:
            other = next((k for k, archs in kinds.items() if arch in archs), None)
            close = difflib.get_close_matches(arch, kinds[kind], n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            if other:
                flag = other if other != "classification" else "multiclass"
                hint = f"it is a {other} model, built with --task {flag}; "
            if kind == "classification":  # 80 names: say where they are listed
                names = "docs/architectures.md lists them; a timm model is --arch timm:NAME"
            else:
                names = ", ".join(sorted(kinds[kind]))
            raise BuildError(
                f"--arch {arch} is not a torchvision {kind} model: {hint}the {len(kinds[kind])} are: {names}"
            )
    default_size, default_mean, default_std = _input_defaults(None if model_path else arch)
    if request.channels == 1:  # ImageNet's grey: the mean of its channels' means and standard deviations
        default_mean, default_std = GREY_MEAN, GREY_STD
    return _Source(
        arch=arch,
        model_path=model_path,
        model_class=model_class,
        input_size=request.input_size or default_size,
        mean=_per_channel("--mean", request.mean or default_mean, request.channels),
        std=_per_channel("--std", request.std or default_std, request.channels),
        given_labels=read_labels(request.labels) if request.labels is not None else None,
        task=request.task or task or "multiclass",
        channels=request.channels,
    )


GREY_MEAN, GREY_STD = (0.449,), (0.226,)
"""A grayscale model's default normalisation (``--channels 1``)."""


def _per_channel(flag: str, values, channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) != channels:
        raise BuildError(f"{flag} takes one value per input channel ({channels} with --channels {channels}): {values}")
    return values


def _sized(request: BuildRequest) -> BuildRequest:
    """``--input-size`` as the spatial dimensions want it: one side for an image model, D H W for a 3D one."""
    from dataclasses import replace

    size = request.input_size
    sizes = list(size) if isinstance(size, (list, tuple)) else ([] if size is None else [size])
    if request.spatial_dims not in (2, 3):
        raise BuildError(f"--spatial-dims must be 2 (images) or 3 (volumes), got {request.spatial_dims}")
    if request.spatial_dims == 3:
        if len(sizes) != 3 or min(sizes) < 2:
            raise BuildError(f"--spatial-dims 3 needs --input-size D H W, three sides of at least 2, got {sizes}")
        return replace(request, input_size=tuple(int(v) for v in sizes))
    if len(sizes) > 1:
        raise BuildError(f"--input-size takes one side for an image model, got {sizes} (a 3D one: --spatial-dims 3)")
    return replace(request, input_size=sizes[0] if sizes else None)


def _resolve_volume(request: BuildRequest) -> _Source:
    """A 3D network (``--spatial-dims 3``): MONAI's (``--arch monai:NAME``) or a model file; its input D H W, its
    channels, its intensity scaling."""
    arch, model_path, model_class = request.arch, None, None
    intensity = request.intensity
    if intensity != "minmax":
        low, _, high = intensity.removeprefix("window:").partition(",")
        try:
            valid = intensity.startswith("window:") and float(low) < float(high)
        except ValueError:
            valid = False
        if not valid:
            raise BuildError(f"--intensity must be minmax or window:LOW,HIGH with LOW < HIGH, got {intensity!r}")
    if request.model_file:
        model_path = Path(request.model_file)
        try:
            model_class = model_class_from_file(model_path)
        except Exception as error:
            raise BuildError(f"cannot use the model file {model_path}: {error}") from None
        arch = model_class.__name__
    elif not (arch or "").startswith(MONAI_PREFIX):
        raise BuildError("--spatial-dims 3 takes --arch monai:NAME (e.g. monai:DenseNet121) or a 3D --model-file")
    else:
        import monai.networks.nets

        if not callable(getattr(monai.networks.nets, arch.removeprefix(MONAI_PREFIX), None)):
            raise BuildError(f"--arch {arch}: monai.networks.nets has no {arch.removeprefix(MONAI_PREFIX)}")
    if request.weights == "imagenet":
        raise BuildError("a 3D network takes --weights PATH (its state_dict) or random; there is no imagenet")
    channels = request.channels
    return _Source(
        arch=arch, model_path=model_path, model_class=model_class, input_size=max(request.input_size),
        mean=_per_channel("--mean", request.mean or (0.0,) * channels, channels),
        std=_per_channel("--std", request.std or (1.0,) * channels, channels),
        given_labels=read_labels(request.labels) if request.labels is not None else None,
        task=request.task or "multiclass", channels=channels, volume=request.input_size, intensity=intensity,
    )  # fmt: skip


def _monai_kwargs(name: str, channels: int, classes: int) -> dict[str, object]:
    """The keyword arguments of MONAI's network ``name`` for a 3D network of ``channels`` inputs and ``classes``
    outputs: DenseNets and EfficientNets take ``in_channels``, ResNets ``n_input_channels``."""
    import inspect

    import monai.networks.nets

    parameters = set(inspect.signature(getattr(monai.networks.nets, name)).parameters)
    if "kwargs" in parameters:  # resnet18 and the like: ResNet's own arguments
        parameters |= set(inspect.signature(monai.networks.nets.ResNet).parameters)
    channel_key = "in_channels" if "in_channels" in parameters else "n_input_channels"
    class_key = "out_channels" if "out_channels" in parameters else "num_classes"
    return {"spatial_dims": 3, channel_key: channels, class_key: classes}


def _load_monai(source: _Source, request: BuildRequest) -> tuple[nn.Module, dict[str, object]]:
    """MONAI's network with ``--weights``: a state_dict (its number of classes read from it) or random (the labels'
    number of classes)."""
    name = source.arch.removeprefix(MONAI_PREFIX)
    task = task_named(source.task)
    stub = _spec_stub(source.arch, {})
    if request.weights == "random":
        kwargs = _monai_kwargs(name, source.channels, task.outputs(len(source.given_labels or task.default_labels(2))))
        build = lambda: build_network(replace_kwargs(stub, kwargs))  # noqa: E731
        return _seeded(build, request.seed, source.input_size, source.channels, source.volume), kwargs
    state_dict = read_checkpoint(request.weights)
    two, three = (_monai_kwargs(name, source.channels, n) for n in (2, 3))
    with torch.device("meta"):
        sizes = [build_network(replace_kwargs(stub, k)).state_dict() for k in (two, three)]
    grown = [key for key, tensor in sizes[0].items() if sizes[1][key].numel() != tensor.numel()]
    classes = next((state_dict[key].shape[0] for key in grown if key in state_dict), 2)
    kwargs = _monai_kwargs(name, source.channels, int(classes))
    model = build_network(replace_kwargs(stub, kwargs))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise BuildError(f"these weights do not fit {source.arch} with {source.channels} channel(s): {error}") from None
    return model, kwargs


def replace_kwargs(spec: ModelSpec, kwargs: dict[str, object]) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, arch_kwargs=kwargs)


def _resolve_open_clip(request: BuildRequest) -> _Source:
    """An open_clip model by name (``--arch open_clip:ViT-B-32``): its input from its config, its tokenizer's
    context; zero-shot unless ``--task embedding``."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    name = request.arch.removeprefix(OPEN_CLIP_PREFIX)
    config = open_clip.get_model_config(name)
    if config is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        hint = f"did you mean {', '.join(OPEN_CLIP_PREFIX + c for c in close)}? " if close else ""
        raise BuildError(f"--arch {request.arch} is not an open_clip model: {hint}open_clip.list_models() lists them")
    task = request.task or "zero-shot"
    if task not in SIMILARITY_KINDS:
        raise BuildError(f"an open_clip model is built with --task zero-shot or --task embedding, not {task}")
    vision, text = config["vision_cfg"], config.get("text_cfg", {})
    side = vision.get("image_size", DEFAULT_INPUT_SIZE)
    preprocess = config.get("preprocess_cfg", {})
    return _Source(
        arch=request.arch, model_path=None, model_class=None,
        input_size=request.input_size or (side if isinstance(side, int) else side[0]),
        mean=tuple(request.mean or preprocess.get("mean", OPENAI_DATASET_MEAN)),
        std=tuple(request.std or preprocess.get("std", OPENAI_DATASET_STD)),
        given_labels=read_labels(request.labels) if request.labels is not None else None,
        task=task, encoder="open_clip", context=int(text.get("context_length", 77)),
    )  # fmt: skip


def _resolve_hf(request: BuildRequest) -> _Source:
    """A ``save_pretrained`` directory, read with no network access: the architecture and labels from its
    ``config.json`` (``id2label``), the task from its ``problem_type``, the input from its image processor's
    config."""
    from transformers import AutoConfig, AutoImageProcessor

    directory = Path(request.hf)
    if not (directory / "config.json").is_file():
        raise BuildError(f"--hf {directory} has no config.json: give a directory written by save_pretrained")
    weights = [name for name in HF_WEIGHTS if (directory / name).is_file()]
    if not weights:
        raise BuildError(
            f"--hf {directory} has no weights ({' or '.join(HF_WEIGHTS)}): save the model with save_pretrained"
        )
    if request.weights not in ("imagenet", "random"):
        raise BuildError("--hf reads the weights from its directory: leave out --weights")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    image_text = config.model_type in similarity_types()
    if image_text or request.task in SIMILARITY_KINDS:  # a CLIP or SigLIP model, or a vision model's embedding
        task = request.task or similarity_types()[config.model_type]
        size, mean, std = _hf_input(AutoImageProcessor, directory)
        if image_text and config.vision_config.image_size:
            size = config.vision_config.image_size
        return _Source(
            arch=HF_PREFIX + (config.architectures or [type(config).__name__.removesuffix("Config") + "Model"])[0],
            model_path=None, model_class=None, input_size=request.input_size or size,
            mean=tuple(request.mean or mean), std=tuple(request.std or std),
            given_labels=read_labels(request.labels) if request.labels is not None else None, task=task,
            hf_dir=directory, encoder="hf" if image_text else None,
            context=config.text_config.max_position_embeddings if image_text else None,
        )  # fmt: skip
    problem = {"multi_label_classification": "multilabel", "single_label_classification": "multiclass"}
    task = problem.get(config.problem_type, "regression" if config.problem_type == "regression" else None)
    task = request.task or task or ("regression" if config.num_labels == 1 else "multiclass")
    labels = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else None
    size, mean, std = _hf_input(AutoImageProcessor, directory)
    return _Source(
        arch=HF_PREFIX + (config.architectures or ["AutoModelForImageClassification"])[0],
        model_path=None,
        model_class=None,
        input_size=request.input_size or size,
        mean=tuple(request.mean or mean),
        std=tuple(request.std or std),
        given_labels=read_labels(request.labels) if request.labels is not None else None,
        task=task,
        hf_dir=directory,
        hf_labels=labels,
    )


def similarity_types() -> dict[str, str]:
    from camtools.similarity import IMAGE_TEXT_TYPES

    return IMAGE_TEXT_TYPES


def _hf_input(processor_class, directory: Path) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(side, mean, std) from the directory's image processor config, else 224 and ImageNet's."""
    if not (directory / "preprocessor_config.json").is_file():
        return DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD
    processor = processor_class.from_pretrained(directory, local_files_only=True)
    size = getattr(processor, "crop_size", None) or getattr(processor, "size", None) or {}
    side = size.get("height") or size.get("shortest_edge") or DEFAULT_INPUT_SIZE
    mean = getattr(processor, "image_mean", None) or IMAGENET_MEAN
    std = getattr(processor, "image_std", None) or IMAGENET_STD
    return int(side), tuple(mean), tuple(std)


def _load(source: _Source, request: BuildRequest) -> tuple[nn.Module, dict[str, object], list[str] | None]:
    """The network with its weights (seeded for ``random``), in eval mode and frozen; the builder's keyword
    arguments; the weights' own labels, if they carry any."""
    weights, default_labels = request.weights, None
    if source.hf_dir is not None:
        from transformers import AutoModel, AutoModelForImageClassification

        loader = AutoModel if task_named(source.task).kind in SIMILARITY_KINDS else AutoModelForImageClassification
        try:
            model = loader.from_pretrained(source.hf_dir, local_files_only=True)
        except (OSError, ValueError) as error:
            raise BuildError(f"--hf {source.hf_dir} could not be loaded: {error}") from None
        return model.eval().requires_grad_(False), {}, None
    if source.encoder == "open_clip":
        return _load_open_clip(source, request), {}, None
    if source.arch.startswith(MONAI_PREFIX):
        model, kwargs = _load_monai(source, request)
        return model.eval().requires_grad_(False), kwargs, None
    if source.model_class is not None:
        kwargs: dict[str, object] = {}
        if weights == "random":
            model = _seeded(source.model_class, request.seed, source.input_size, source.channels, source.volume)
        else:
            model = source.model_class()
            try:
                model.load_state_dict(read_checkpoint(weights))
            except RuntimeError as error:
                raise BuildError(
                    f"these weights do not fit {source.arch} from {source.model_path.name}: {error}"
                ) from None
    else:
        kwargs = _arch_kwargs(source.arch, source.input_size, pretrained=weights == "imagenet")
        if source.arch.startswith(TIMM_PREFIX) and task_named(source.task).kind == "embedding":
            kwargs["num_classes"] = 0  # timm's pooled features: the embedding
        if weights == "imagenet":
            state_dict, default_labels = _imagenet_state_dict(source.arch, request.progress)
            state_dict = _with_batch_norm_counters(source.arch, state_dict, kwargs)
            kwargs = _fit_torchvision(source.arch, state_dict, kwargs) if default_labels is None else kwargs
            kwargs.setdefault("num_classes", len(default_labels or []) or 1000)
        elif weights == "random":
            task = task_named(source.task)
            if task.kind in SIMILARITY_KINDS:  # no class list: the network's output is the embedding
                pass
            elif not task.classifies and source.given_labels is None:  # the default weights' classes (COCO, VOC)
                default_labels = list(_default_weights(source.arch).meta["categories"])
                kwargs["num_classes"] = len(default_labels)
            elif source.given_labels is not None or task.outputs(2) == 1:
                kwargs["num_classes"] = task.outputs(len(source.given_labels or task.default_labels(2)))
        else:
            state_dict = _with_batch_norm_counters(source.arch, read_checkpoint(weights), kwargs)
            if task_named(source.task).kind in ("detection", "segmentation"):
                kwargs = _dense_classes(source.arch, state_dict, kwargs)
            kwargs = _fit_torchvision(source.arch, state_dict, kwargs)
        stub = _spec_stub(source.arch, kwargs)
        if weights == "random":
            model = _seeded(lambda: build_network(stub), request.seed, source.input_size)
        else:
            model = build_network(stub)
            model.load_state_dict(state_dict)
    return model.eval().requires_grad_(False), kwargs, default_labels


def _load_open_clip(source: _Source, request: BuildRequest) -> nn.Module:
    """``open_clip.create_model(NAME)`` with ``--weights``: a state_dict file, ``random`` (seeded), or one of
    open_clip's pretrained tags for the model, downloaded through open_clip."""
    import open_clip

    name = source.arch.removeprefix(OPEN_CLIP_PREFIX)
    weights, tags = request.weights, open_clip.list_pretrained_tags_by_model(name)
    if weights == "random":
        return _seeded(lambda: open_clip.create_model(name, pretrained=None), request.seed, source.input_size)
    if weights in tags:
        try:
            return open_clip.create_model(name, pretrained=weights)
        except Exception as error:  # the Hub client raises its own connection and lookup errors
            raise WeightsUnavailableError(
                f"could not download open_clip's {name} weights {weights!r}: {type(error).__name__}: "
                f"{str(error)[:300]}.\nOffline, give --weights PATH (the model's state_dict, saved where it was "
                "downloaded) or --weights random (tests only: its predictions mean nothing)."
            ) from None
    if weights == "imagenet" or not Path(weights).is_file():
        offered = f"one of its pretrained tags ({', '.join(tags[:6])})" if tags else "no pretrained tag (it has none)"
        raise BuildError(f"--arch {source.arch} takes --weights PATH (a state_dict), random or {offered}")
    model = open_clip.create_model(name, pretrained=None)
    try:
        model.load_state_dict(read_checkpoint(weights))
    except RuntimeError as error:
        raise BuildError(f"these weights do not fit open_clip's {name}: {str(error)[:600]}") from None
    return model


def _probe(model: nn.Module, source: _Source, output: str | None) -> tuple[dict[str, LayerInfo], int, str | None]:
    """The model's layers, its number of outputs, and which part of its output holds the logits (``output``, or
    found: None for a tensor, a tuple's first item, ``logits`` of a dict or a ``ModelOutput``), from one forward
    pass of a blank image. A detector's number of classes is not in its output: it comes back as 0."""
    side = _probe_side(source)
    kind = task_named(source.task).kind
    try:
        blank = torch.zeros(1, source.channels, *(source.volume or (side, side)))
        layers = describe_layers(model, side, blank)
        with torch.no_grad():
            probe = model(blank)
    except Exception as error:
        raise BuildError(f"{source.arch} does not run on a {side}x{side} image: {error}") from None
    if kind == "detection":
        fields = {"boxes", "labels", "scores"}
        if not isinstance(probe, (list, tuple)) or not probe or not fields <= set(getattr(probe[0], "keys", list)()):
            raise BuildError(
                f"a detector must return torchvision's detections, a list of {{boxes, labels, scores}} per image; "
                f"{source.arch} returns a {type(probe).__name__}"
            )
        return layers, 0, None
    if output is None and kind == "segmentation" and "out" in (probe.keys() if hasattr(probe, "keys") else ()):
        output = "out"  # torchvision's segmenters: {"out": N×C×H×W, "aux": ...}
    if output is None and not isinstance(probe, torch.Tensor):
        if isinstance(probe, (tuple, list)):
            output = "0"
        elif "logits" in (probe.keys() if hasattr(probe, "keys") else ()) or hasattr(probe, "logits"):
            output = "logits"
        else:
            raise BuildError(
                f"{source.arch} returns a {type(probe).__name__}, not a tensor: name the part that holds the logits "
                "with --output (a key, an attribute or a tuple index)"
            )
    if output is not None:
        try:
            probe = output_part(probe, output)
        except (KeyError, IndexError, AttributeError, TypeError) as error:
            raise BuildError(f"--output {output} names no part of {source.arch}'s output: {error!r}") from None
    dims = 4 if kind == "segmentation" else 2
    if not isinstance(probe, torch.Tensor) or probe.ndim != dims:
        wanted = "{'out': N×C×H×W} or N×C×H×W logits" if dims == 4 else "(N, classes) logits"
        raise BuildError(f"{source.arch} must return {wanted}, got {getattr(probe, 'shape', type(probe))}")
    return layers, probe.shape[1], output


def _probe_side(source: _Source) -> int:
    """The square a build probes the model with: its input side, or for a detector (whose transform resizes any
    image) a small one."""
    return min(source.input_size, 320) if task_named(source.task).kind == "detection" else source.input_size


def _label(source: _Source, request: BuildRequest, default_labels: list[str] | None, outputs: int) -> list[str]:
    """One name per class a request may name, after the task's check of the outputs: the labels file's, the
    weights' own, ImageNet's for a single-label model of 1000 classes, a binary model's ``negative`` and
    ``positive``, else ``class_i`` (``output_i`` for a regression model)."""
    task = task_named(source.task)
    problem = task.check_outputs(outputs, source.arch)
    if problem:
        raise BuildError(problem)
    classes = task.classes(outputs)
    if source.given_labels is not None:
        names = source.given_labels
    elif default_labels is not None and len(default_labels) == classes:
        names = default_labels
    elif classes == 1000 and task.exclusive:
        names = _imagenet_categories()
    else:
        names = task.default_labels(classes)
    if len(names) != classes:
        raise BuildError(
            f"{len(names)} labels for {classes} {task.what}: the labels file {request.labels} must name every one of "
            f"the model's {task.what} ({', '.join(task.default_labels(classes)[:2])}, ...), in index order"
        )
    return names


def _validate(
    model: nn.Module, source: _Source, layer: str | None, layers: dict[str, LayerInfo], classes: int
) -> tuple[str, dict[str, str]]:
    """The default layer and the layers a request may name, after one explanation of a synthetic image at it is a
    finite map of the layer's shape, from finite logits."""
    spatial = {name: info.layout for name, info in layers.items() if info.layout}
    if task_named(source.task).kind == "detection":  # a detector's heads map proposals, not images: its backbone
        spatial = {name: layout for name, layout in spatial.items() if name.split(".")[0] == "backbone"} or spatial
    if not spatial:
        raise BuildError(f"{source.arch} has no layer that gives a spatial map: nothing to explain")
    side = _probe_side(source)
    task = task_named(source.task)
    if layer is None:
        layer = (not task.classifies and backbone_stage(layers, side)) or default_layer(model, side, layers)
    elif layer not in spatial:
        reason = "gives no spatial map" if layer in dict(model.named_modules()) else "is not a module of the model"
        raise BuildError(f"layer {layer} {reason}; {LayerNotFoundError(layer, list(spatial))}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        channels = source.channels
        extent = source.volume or (side, side)
        mean, std = (torch.tensor(v).view(1, channels, *(1 for _ in extent)) for v in (source.mean, source.std))
        image = (torch.rand(1, channels, *extent) - mean) / std
    if task.kind == "detection":  # one synthetic image through the whole path: detections, and one explained
        request = DetectionRequest(layer, task.default_method(spatial[layer]), score_threshold=0.0, explain=1)
        found = explain_detections(model, [image[0]], [request], spatial)
        if not all(torch.isfinite(m).all() for m in found.maps):
            raise BuildError(f"the explanation at layer {layer} is not finite")
        return layer, spatial
    engine = CamEngine(model, input_size=side, default_layer=layer, head=task.head)
    engine.input_channels, engine.input_spatial = source.channels, source.volume
    target = Classes([0]) if task.kind == "segmentation" else task.default_target(None, 0.5, classes)
    output = engine(image, [CamRequest(target)])
    cam = output.maps[0]
    if tuple(cam.shape[1:]) != layers[layer].grid[1:] or not torch.isfinite(cam).all():
        raise BuildError(f"the explanation at layer {layer} is not a finite {layers[layer].grid[1:]} map")
    if not torch.isfinite(output.logits).all():
        raise BuildError(f"{source.arch} gives non-finite logits on a synthetic image")
    return layer, spatial


RANDOM_WARNING = """
################################################################################
#  WARNING: --weights random. The model is seeded random noise. Its predictions #
#  and heatmaps mean NOTHING; every response says "weights": "random".         #
#  Use --weights imagenet (download) or --weights PATH (a state_dict file).    #
################################################################################
"""


RANDOM_DETECTOR = """#  A DETECTOR on random weights scores no box at the default score_threshold   #
#  of 0.5: its responses say "detections": [] and explain nothing. Send        #
#  -F score_threshold=0 to see its boxes (as meaningless as its scores).       #
################################################################################
"""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say which model: the same in the build, the offline CLI, the KServe layout and the bench."""
    group = parser.add_argument_group("the model")
    group.add_argument(
        "--arch",
        help=f"a torchvision classification model, e.g. resnet50, convnext_tiny, vit_b_16, swin_t, or a timm model "
        f"as timm:NAME, e.g. timm:convnext_tiny, or an open_clip model as open_clip:NAME, e.g. open_clip:ViT-B-32 "
        f"(default: {DEFAULT_ARCH} unless --model-file or --hf)",
    )
    group.add_argument(
        "--hf",
        type=Path,
        metavar="DIR",
        help="a Hugging Face image classifier saved with save_pretrained (config.json, model.safetensors, "
        "preprocessor_config.json): architecture, weights, labels, task and input all come from it, offline",
    )
    group.add_argument(
        "--model-file",
        type=Path,
        help="your own network: a .py file defining exactly one nn.Module subclass, built with no arguments",
    )
    group.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (the arch's default torchvision weights, downloaded and cached), random (seeded, tests "
        "only: predictions mean nothing) or PATH, a state_dict with any number of classes (default: imagenet)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed for --weights random (default: 0)")
    group.add_argument(
        "--labels",
        type=Path,
        help='class names: a JSON list, {"0": "cat"}, index_to_name.json or one name per line '
        "(default: ImageNet's for a single-label model of 1000 classes, else class_0, class_1, ...)",
    )
    group.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="a zero-shot model's default prompts, one sentence per line (default: each --labels label in --template)",
    )
    group.add_argument(
        "--template",
        help="a zero-shot model's prompt made of each label, {} for the label (default: 'a photo of a {}.')",
    )
    group.add_argument("--layer", help="the layer explained by default (default: found for the model)")
    group.add_argument(
        "--task",
        choices=tuple(TASKS),
        help="how the outputs read: multiclass (softmax), multilabel (a sigmoid per class), binary (one logit), "
        "regression, detection, segmentation, zero-shot (a CLIP or SigLIP model scoring prompts) or embedding "
        "(similarity to references) (default: multiclass, what an --hf directory's problem_type says, zero-shot for "
        "a CLIP or SigLIP model)",
    )
    group.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="a multi-label model's default probability for a positive class (default: %(default)s)",
    )
    group.add_argument(
        "--output",
        help="which part of the network's output holds the logits when it is not a tensor: a key, an attribute or "
        "a tuple index (default: found: a tuple's first item, or logits)",
    )
    group.add_argument(
        "--input-size",
        type=int,
        nargs="+",
        metavar="N",
        help="model input side in pixels (default: the arch's weights' crop, else 224); a 3D network's D H W",
    )
    group.add_argument(
        "--spatial-dims",
        type=int,
        default=2,
        choices=(2, 3),
        help="3: a network of volumes (NIfTI requests), --arch monai:NAME or a 3D --model-file (default: 2)",
    )
    group.add_argument(
        "--intensity",
        default="minmax",
        help="a volume's values to [0, 1] before --mean/--std: minmax (its own range) or window:LOW,HIGH (clipped "
        "then scaled; CT in Hounsfield units) (default: minmax)",
    )
    group.add_argument(
        "--channels",
        type=int,
        default=3,
        choices=(1, 3),
        help="the network's input channels: 3 (RGB) or 1 (grayscale: a radiograph; an RGB upload becomes its "
        "luminance) (default: 3)",
    )
    group.add_argument(
        "--mean", type=float, nargs="+", metavar="M", help="one per channel (default: the arch's, else ImageNet's)"
    )
    group.add_argument(
        "--std", type=float, nargs="+", metavar="S", help="one per channel (default: the arch's, else ImageNet's)"
    )


def model_for_cli(args: argparse.Namespace, model_name: str | None = None, version: str = "1.0") -> PreparedModel:
    """:func:`prepare_model` from :func:`add_model_arguments`' flags: a loud warning for random weights, and the
    error's message with exit status 2 when the model cannot be served. The arguments are checked first: the warning
    comes only for a model that builds."""
    try:
        prepared = prepare_model(
            arch=args.arch,
            model_file=args.model_file,
            weights=args.weights,
            labels=args.labels,
            layer=args.layer,
            input_size=args.input_size,
            mean=args.mean,
            std=args.std,
            model_name=model_name,
            version=version,
            seed=args.seed,
            task=args.task,
            threshold=args.threshold,
            output=args.output,
            hf=args.hf,
            prompts=args.prompts,
            template=args.template,
            channels=args.channels,
            spatial_dims=args.spatial_dims,
            intensity=args.intensity,
        )
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.weights == "random":
        print(RANDOM_WARNING + (RANDOM_DETECTOR if prepared.spec.task == "detection" else ""), file=sys.stderr)
    return prepared
