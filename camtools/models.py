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

from camserve.cam import CamEngine, CamRequest, LayerInfo, LayerNotFoundError, default_layer, describe_layers
from camserve.model import build_network, model_class_from_file
from camserve.spec import ModelSpec

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
_MODEL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


class BuildError(ValueError):
    """A model that cannot be served as asked; the message says what is wrong and how to fix it."""


class WeightsUnavailableError(BuildError):
    """The requested weights could not be obtained."""


@dataclass
class PreparedModel:
    """A model that passed validation: its spec, the network (eval, frozen), its weights and its model file."""

    spec: ModelSpec
    model: nn.Module
    state_dict: dict[str, torch.Tensor]
    model_file: Path | None = None


def torchvision_archs() -> list[str]:
    """Every classification builder of torchvision (``torchvision.models.list_models(module=torchvision.models)``)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file, loaded with ``weights_only=True``: a bare state_dict, ``{"state_dict": ...}`` or
    ``{"model": ...}`` (training checkpoints), with DataParallel's ``module.`` or torch.compile's ``_orig_mod.``
    prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"no weights file at {path}: give --weights imagenet, random or a file's path")
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
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise BuildError(
            f"{path} holds a {type(loaded).__name__} that is not a state_dict (a dict of tensors, possibly under "
            "'state_dict' or 'model'): save it with torch.save(model.state_dict(), 'weights.pt')"
        )
    for prefix in ("module.", "_orig_mod."):
        if loaded and all(key.startswith(prefix) for key in loaded):
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
    transforms = _default_weights(arch).transforms()
    return int(transforms.crop_size[0]), tuple(transforms.mean), tuple(transforms.std)


def _arch_kwargs(arch: str, input_size: int, pretrained: bool) -> dict[str, object]:
    """Builder arguments that the arch's weights imply: a ViT's image size; GoogLeNet's and Inception's input
    transform and auxiliary heads as torchvision builds them for its own weights."""
    kwargs: dict[str, object] = {}
    if arch.startswith("vit_"):
        kwargs["image_size"] = input_size
    if arch in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False
        if pretrained:
            kwargs |= {"transform_input": True, "aux_logits": True}
    return kwargs


def _seeded(build, seed: int, input_size: int) -> nn.Module:
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
            with torch.no_grad():
                for _ in range(2):
                    model(torch.randn(4, 3, input_size, input_size))
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


def _imagenet_state_dict(arch: str, progress: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    weights = _default_weights(arch)
    try:
        state_dict = weights.get_state_dict(progress=progress, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad hash is a RuntimeError
        raise WeightsUnavailableError(
            f"could not download the ImageNet weights of {arch} ({weights.url}): {error}.\n"
            "Offline, choose one of the other two: --weights PATH (a state_dict file, e.g. one copied from "
            "torch.hub's cache on a machine that has it) or --weights random (seeded, for tests only: its "
            "predictions mean nothing)."
        ) from error
    return state_dict, list(weights.meta["categories"])


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
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    model_name: str | None = None
    version: str = "1.0"
    seed: int = 0
    progress: bool = True


@dataclass
class _Source:
    """Where the network comes from, resolved: a torchvision arch or a model file's class, and its input."""

    arch: str
    model_path: Path | None
    model_class: type[nn.Module] | None
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    given_labels: list[str] | None


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
    layers, num_classes = _probe(model, source)
    names = _label(source, request, default_labels, num_classes)
    layer, spatial = _validate(model, source, request.layer, layers)
    name = request.model_name or source.arch.lower()
    if not _MODEL_NAME.fullmatch(name):
        raise BuildError(f"--model-name must be a letter then letters, digits, '_' or '-' (64 at most), got {name!r}")
    spec = ModelSpec(
        name=name,
        arch=source.arch,
        labels=tuple(names),
        input_size=source.input_size,
        mean=source.mean,
        std=source.std,
        default_layer=layer,
        layers=spatial,
        weights=request.weights if request.weights in ("imagenet", "random") else _file_label(request.weights),
        version=request.version,
        model_file=source.model_path.name if source.model_path else None,
        arch_kwargs=kwargs,
    )
    return PreparedModel(spec, model, model.state_dict(), source.model_path)


def _resolve(request: BuildRequest) -> _Source:
    """The network's source (a known torchvision arch, or a model file with one ``nn.Module``) and its input."""
    arch, model_path, model_class = request.arch, None, None
    if arch and request.model_file:
        raise BuildError("give --arch (a torchvision architecture) or --model-file (your own network), not both")
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
    else:
        arch = arch or DEFAULT_ARCH
        archs = torchvision_archs()
        if arch not in archs:
            close = difflib.get_close_matches(arch, archs, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise BuildError(f"--arch {arch} is not a torchvision classification model: {hint}(one of {len(archs)})")
    default_size, default_mean, default_std = _input_defaults(None if model_path else arch)
    return _Source(
        arch=arch,
        model_path=model_path,
        model_class=model_class,
        input_size=request.input_size or default_size,
        mean=tuple(request.mean or default_mean),
        std=tuple(request.std or default_std),
        given_labels=read_labels(request.labels) if request.labels is not None else None,
    )


def _load(source: _Source, request: BuildRequest) -> tuple[nn.Module, dict[str, object], list[str] | None]:
    """The network with its weights (seeded for ``random``), in eval mode and frozen; the builder's keyword
    arguments; the weights' own labels, if they carry any."""
    weights, default_labels = request.weights, None
    if source.model_class is not None:
        kwargs: dict[str, object] = {}
        if weights == "random":
            model = _seeded(source.model_class, request.seed, source.input_size)
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
        if weights == "imagenet":
            state_dict, default_labels = _imagenet_state_dict(source.arch, request.progress)
            kwargs["num_classes"] = len(default_labels)
        elif weights == "random":
            if source.given_labels is not None:
                kwargs["num_classes"] = len(source.given_labels)
        else:
            state_dict = read_checkpoint(weights)
            kwargs = _fit_torchvision(source.arch, state_dict, kwargs)
        stub = _spec_stub(source.arch, kwargs)
        if weights == "random":
            model = _seeded(lambda: build_network(stub), request.seed, source.input_size)
        else:
            model = build_network(stub)
            model.load_state_dict(state_dict)
    return model.eval().requires_grad_(False), kwargs, default_labels


def _probe(model: nn.Module, source: _Source) -> tuple[dict[str, LayerInfo], int]:
    """The model's layers and its number of classes, from one forward pass of a blank image."""
    side = source.input_size
    try:
        layers = describe_layers(model, side)
        with torch.no_grad():
            probe = model(torch.zeros(1, 3, side, side))
    except Exception as error:
        raise BuildError(f"{source.arch} does not run on a {side}x{side} image: {error}") from None
    if not isinstance(probe, torch.Tensor) or probe.ndim != 2:
        raise BuildError(f"{source.arch} must return (N, classes) logits, got {getattr(probe, 'shape', type(probe))}")
    return layers, probe.shape[1]


def _label(source: _Source, request: BuildRequest, default_labels: list[str] | None, classes: int) -> list[str]:
    """One name per class: the labels file's, the weights' own, ImageNet's for 1000 classes, else ``class_i``."""
    if source.given_labels is not None:
        names = source.given_labels
    elif default_labels is not None:
        names = default_labels
    elif classes == 1000:
        names = _imagenet_categories()
    else:
        names = [f"class_{i}" for i in range(classes)]
    if len(names) != classes:
        raise BuildError(
            f"{len(names)} labels for {classes} classes: the labels file {request.labels} must name every class of "
            f"the model's head, in index order"
        )
    return names


def _validate(
    model: nn.Module, source: _Source, layer: str | None, layers: dict[str, LayerInfo]
) -> tuple[str, dict[str, str]]:
    """The default layer and the layers a request may name, after one explanation of a synthetic image at it is a
    finite map of the layer's shape, from finite logits."""
    spatial = {name: info.layout for name, info in layers.items() if info.layout}
    if not spatial:
        raise BuildError(f"{source.arch} has no layer that gives a spatial map: nothing to explain")
    side = source.input_size
    if layer is None:
        layer = default_layer(model, side, layers)
    elif layer not in spatial:
        reason = "gives no spatial map" if layer in dict(model.named_modules()) else "is not a module of the model"
        raise BuildError(f"layer {layer} {reason}; {LayerNotFoundError(layer, list(spatial))}")
    engine = CamEngine(model, input_size=side, default_layer=layer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mean, std = torch.tensor(source.mean).view(1, 3, 1, 1), torch.tensor(source.std).view(1, 3, 1, 1)
        image = (torch.rand(1, 3, side, side) - mean) / std
    output = engine(image, [CamRequest()])
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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say which model: the same in the build, the offline CLI, the KServe layout and the bench."""
    group = parser.add_argument_group("the model")
    group.add_argument(
        "--arch",
        help=f"a torchvision classification model, e.g. resnet50, convnext_tiny, vit_b_16, swin_t "
        f"(default: {DEFAULT_ARCH} unless --model-file)",
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
        "(default: ImageNet's for 1000 classes, else class_0, class_1, ...)",
    )
    group.add_argument("--layer", help="the layer explained by default (default: found for the model)")
    group.add_argument(
        "--input-size", type=int, help="model input side in pixels (default: the arch's weights' crop, else 224)"
    )
    group.add_argument(
        "--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="default: the arch's, else ImageNet's"
    )
    group.add_argument(
        "--std", type=float, nargs=3, metavar=("R", "G", "B"), help="default: the arch's, else ImageNet's"
    )


def model_for_cli(args: argparse.Namespace, model_name: str | None = None, version: str = "1.0") -> PreparedModel:
    """:func:`prepare_model` from :func:`add_model_arguments`' flags: a loud warning for random weights, and the
    error's message with exit status 2 when the model cannot be served."""
    if args.weights == "random":
        print(RANDOM_WARNING, file=sys.stderr)
    try:
        return prepare_model(
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
        )
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
