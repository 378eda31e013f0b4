"""The served network, built from its spec: a torchvision builder or the user's own model file, its weights loaded
safely, and the input tensor its spec describes."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from camserve.spec import ModelSpec

__all__ = [
    "PRECISIONS",
    "autocast_dtype",
    "build_network",
    "channels_last_from",
    "images_to_batch",
    "load_model",
    "model_square",
    "model_class_from_file",
    "output_part",
    "select_output",
    "read_state_dict",
    "select_device",
]


def model_class_from_file(path: str | Path) -> type[nn.Module]:
    """The one ``nn.Module`` subclass that the Python file at ``path`` defines (TorchServe's ``--model-file``
    convention), imported under the file's own name."""
    path = Path(path)
    name = f"camserve_model_file_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    classes = [
        value
        for value in vars(module).values()
        if inspect.isclass(value) and issubclass(value, nn.Module) and value.__module__ == name
    ]
    if len(classes) != 1:
        found = ", ".join(c.__name__ for c in classes) or "none"
        raise TypeError(
            f"{path.name} must define exactly one nn.Module subclass, built with no arguments; found {found}"
        )
    return classes[0]


def build_network(spec: ModelSpec, model_dir: str | Path | None = None) -> nn.Module:
    """The spec's network with fresh (untrained) parameters, returning its logits as a tensor: ``model_dir`` holds
    the spec's model file or Hugging Face config, if any. A zero-shot or embedding model returns its scores against
    the columns its task sets (:class:`camserve.embeddings.ColumnScores`)."""
    if spec.embedding is None:
        return _build_source(spec, model_dir)
    from camserve.embeddings import ColumnScores

    encoder = str(spec.embedding["encoder"])
    return ColumnScores(_build_source(spec, model_dir), encoder, scaled=spec.embedding.get("scores") == "logits")


def _build_source(spec: ModelSpec, model_dir: str | Path | None) -> nn.Module:
    if spec.arch.startswith(MONAI_PREFIX):
        import monai.networks.nets

        return getattr(monai.networks.nets, spec.arch.removeprefix(MONAI_PREFIX))(**spec.arch_kwargs)
    if spec.arch.startswith(OPEN_CLIP_PREFIX):
        import open_clip

        return open_clip.create_model(spec.arch.removeprefix(OPEN_CLIP_PREFIX), pretrained=None)
    if spec.model_file:
        model = model_class_from_file(Path(model_dir or ".") / spec.model_file)()
    elif spec.arch.startswith(TIMM_PREFIX):
        import timm

        model = timm.create_model(spec.arch.removeprefix(TIMM_PREFIX), pretrained=False, **spec.arch_kwargs)
    elif spec.arch.startswith(HF_PREFIX):
        from transformers import AutoConfig, AutoModelForImageClassification

        config = AutoConfig.from_pretrained(Path(model_dir or ".") / spec.hf_config, local_files_only=True)
        if spec.embedding is not None:  # CLIPModel, SiglipModel, or a vision model's pooled output
            from transformers import AutoModel

            model = AutoModel.from_config(config)
        else:
            model = AutoModelForImageClassification.from_config(config)
    else:
        from torchvision.models import get_model_builder

        model = get_model_builder(spec.arch)(weights=None, **spec.arch_kwargs)
    return select_output(model, spec.output)


TIMM_PREFIX, HF_PREFIX, OPEN_CLIP_PREFIX, MONAI_PREFIX = "timm:", "hf:", "open_clip:", "monai:"
"""How the spec's ``arch`` names a timm model (``timm:convnext_tiny``), a Hugging Face class
(``hf:ViTForImageClassification``), an open_clip model (``open_clip:ViT-B-32``) and one of MONAI's networks
(``monai:DenseNet121``)."""


def output_part(output: object, key: str) -> object:
    """The part ``key`` of a network's output: a tuple index (``0``), a mapping key or an attribute (``logits``)."""
    if key.isdigit():
        return output[int(key)]
    if isinstance(output, Mapping) or hasattr(output, "keys"):  # dicts and transformers' ModelOutput
        return output[key]
    return getattr(output, key)


def select_output(model: nn.Module, key: str | None) -> nn.Module:
    """``model`` returning the part ``key`` of its output (None: as it is), by a forward hook on the model itself,
    so that its layers keep their names."""
    if key is not None:
        model.register_forward_hook(lambda _module, _inputs, output: output_part(output, key))
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict saved with ``torch.save``, loaded with ``weights_only=True`` onto the CPU: no pickled code runs."""
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise TypeError(f"{path} holds a {type(state_dict).__name__}, not a state_dict")
    return state_dict


def load_model(
    spec: ModelSpec,
    weights: str | Path,
    model_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> nn.Module:
    """The spec's network with the state_dict at ``weights`` loaded strictly, in eval mode, parameters frozen."""
    model = build_network(spec, model_dir)
    model.load_state_dict(read_state_dict(weights))
    model = model.to(device)
    if spec.embedding is not None:  # a zero-shot model's prompts, through its own tokenizer
        from camserve import settings
        from camserve.embeddings import with_prompts

        with_prompts(model, spec.embedding, Path(model_dir or ".") / (spec.hf_config or ""), settings.PROMPT_CACHE_SIZE)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)


def model_square(image: np.ndarray, side: int) -> torch.Tensor:
    """An (H, W, C) image as the model's (C, ``side``, ``side``) input, the whole image squashed, in its own dtype:
    antialiased bilinear, the filter of torchvision's ``Resize(antialias=True)`` and of PIL's ``BILINEAR``; as is when
    it is that size already.

    On 8-bit RGB this is torch's AVX2 kernel for uint8 pixels: 2.5 ms for a 1080p photo on one thread, against 11 ms
    for OpenCV's area filter (``scripts/bench.py``, "Image work"). It runs where the batch is built, in the thread of
    the forward pass: a torch operator in a request thread would start a second OpenMP team
    (:func:`camserve.overlays.map_at`).
    """
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # Pillow's arrays: torch warns on a read-only array, though it only reads this one
        image = image.copy()
    tensor = torch.from_numpy(image).movedim(-1, 0)  # (C, H, W), channels last in memory
    if tuple(tensor.shape[1:]) == (side, side):
        return tensor
    return torch.nn.functional.interpolate(tensor[None], size=(side, side), mode="bilinear", antialias=True)[0]


def images_to_batch(
    images: Sequence[np.ndarray], spec: ModelSpec, device: torch.device | str = "cpu", channels_last: bool = False
) -> torch.Tensor:
    """Decoded images to a normalised (N, C, H, W) float batch on ``device``: each (H, W, C) image squashed to the
    model's input square (:func:`model_square`), uint8 pixels (RGB) as x = (pixel / 255 − mean) / std and float32 ones
    in [0, 1] (a DICOM's window, a 16-bit grayscale, a luminance) as x = (value − mean) / std, with the spec's
    per-channel mean and std. A one-channel image fills each of the model's channels. (D, H, W, C) volumes, already
    at the model's size, make an (N, C, D, H, W) batch."""
    if all(image.ndim == 3 for image in images):
        squares = [model_square(image, spec.input_size) for image in images]
        squares = [square.expand(spec.channels, -1, -1) if len(square) == 1 else square for square in squares]
        if all(square.dtype == torch.uint8 for square in squares):
            batch = torch.stack(squares).to(device).float().div_(255.0)
        else:
            floats = [square.float().div_(255.0) if square.dtype == torch.uint8 else square for square in squares]
            batch = torch.stack(floats).to(device).float()
    else:  # volumes
        floats = [image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image for image in images]
        batch = torch.from_numpy(np.stack(floats).astype(np.float32, copy=False)).to(device).movedim(-1, 1)
    shape = (1, batch.shape[1]) + (1,) * (batch.dim() - 2)
    mean = torch.tensor(spec.mean, device=batch.device, dtype=batch.dtype).view(shape)
    std = torch.tensor(spec.std, device=batch.device, dtype=batch.dtype).view(shape)
    batch = batch.sub_(mean).div_(std)
    if batch.dim() != 4:
        return batch.contiguous()
    return batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Serving precisions: fp32 as is, or the network under ``torch.autocast`` with that dtype."""


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name, refusing what the device cannot do well."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    return PRECISIONS[precision]


def channels_last_from(setting: bool | int | str | None) -> int:
    """The smallest batch that runs in the channels_last memory format, from the handler's ``channels_last``
    setting: ``true`` is 1 (every batch, and the model's weights are converted once), ``false`` or 0 never, and
    N > 1 the batches of N images or more (their inputs are converted; the weights stay as they are).

    On two CPU cores channels_last is 1.2x slower for one image and 1.1-1.2x faster from four images on, whether or
    not the weights are converted (``scripts/bench.py``, "channels_last by batch size")."""
    if isinstance(setting, bool) or setting is None:
        return int(bool(setting))
    value = int(setting)
    if value < 0:
        raise ValueError(f"channels_last must be true, false or a batch size (0 = never), got {setting!r}")
    return value


def select_device(gpu_id: int | str | None) -> torch.device:
    """``cuda:<gpu_id>`` when TorchServe assigned a GPU and CUDA exists, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")
