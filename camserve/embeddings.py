"""Models whose output is a vector, as the engine explains them: an image–text model (CLIP, SigLIP) scored against
prompts, and an embedding model scored against references.

The engine explains a scalar of a model's output. Here the output is each image's score against the batch's
*columns*: unit vectors that the task sets before each pass, a prompt's text embedding or a reference's embedding.
:class:`ColumnScores` is the model the engine sees: ``scale · cos(e(x), c_k) + bias`` for each column c_k, where
e(x) is the image's embedding. With a CLIP model's ``logit_scale`` (and a SigLIP model's ``logit_bias``) that is its
``logits_per_image``; with scale 1 and no bias, the cosine similarity that pytorch-grad-cam's
``SimilarityToConceptTarget`` differentiates. Its submodules are the model's own, under their own names
(``vision_model.encoder.layers.11.layer_norm1``), and its state_dict is the model's.

:class:`PromptEmbeddings` gives prompts' text embeddings through the model's text tower, each prompt once: an LRU
cache of a bounded size keeps them, so that a repeated prompt list costs no text forward pass.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.errors import ClientError

__all__ = [
    "ENCODERS",
    "ColumnScores",
    "Columns",
    "Encoder",
    "PromptEmbeddings",
    "hf_tokenizer",
    "open_clip_tokenizer",
    "with_prompts",
]


class Columns:
    """What a batch's images are scored against: (K, D) unit vectors, set by the task before each pass. A model's
    randomised copies (the sanity check) share it: a copy is scored against the same columns."""

    def __init__(self) -> None:
        self.vectors: Tensor | None = None
        self.lock = threading.Lock()
        """Held while a batch's columns are set and its passes run."""

    def __deepcopy__(self, memo: dict) -> Columns:
        return self


@dataclass(frozen=True)
class Encoder:
    """How a source's model gives an image's embedding and, with a text tower, a text's embedding."""

    image: Callable[[nn.Module, Tensor], Tensor]
    text: Callable[[nn.Module, dict[str, Tensor]], Tensor] | None = None
    """The text tower on tokenised prompts; None for a model without one."""


def _pooled(output: object) -> Tensor:
    """transformers' ``get_*_features`` give the projected embedding, bare or as a ModelOutput's pooler_output."""
    return output if isinstance(output, Tensor) else output.pooler_output


ENCODERS: dict[str, Encoder] = {
    "hf": Encoder(
        image=lambda model, images: _pooled(model.get_image_features(pixel_values=images)),
        text=lambda model, tokens: _pooled(model.get_text_features(**tokens)),
    ),
    "open_clip": Encoder(
        image=lambda model, images: model.encode_image(images),
        text=lambda model, tokens: model.encode_text(tokens["input_ids"]),
    ),
    "vector": Encoder(image=lambda model, images: model(images)),
}
"""By the spec's ``image_text["encoder"]``: a transformers ``CLIPModel``/``SiglipModel``, an open_clip model, or
a network whose output is the embedding (``vector``)."""


class ColumnScores(nn.Module):
    """``model`` as the engine explains it: images to (N, K) scores against the :class:`Columns`, ``scale ·
    cos(e(x), c_k) + bias``. ``scaled``: the model's ``logit_scale`` (exp) and ``logit_bias``, when it has them,
    make the scores its image–text logits; else they are cosine similarities."""

    def __init__(self, model: nn.Module, encoder: str, scaled: bool) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, parameter in model.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in model._non_persistent_buffers_set)
        object.__setattr__(self, "source", model)  # not a submodule: its submodules are this module's own
        self.encoder = ENCODERS[encoder]
        self.scaled = scaled
        self.columns = Columns()

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)`` and the like, on the model's own parameters and buffers too (they are shared)."""
        super()._apply(fn, recurse)
        self.source._parameters.update((name, self._parameters[name]) for name in self.source._parameters)
        self.source._buffers.update((name, self._buffers[name]) for name in self.source._buffers)
        return self

    @property
    def sigmoid(self) -> bool:
        """Its scores are independent logits read through a sigmoid (SigLIP's bias), not a softmax over columns."""
        return self.scaled and getattr(self.source, "logit_bias", None) is not None

    def embed(self, images: Tensor) -> Tensor:
        """(N, D) image embeddings, as the model gives them (not normalised)."""
        return self.encoder.image(self.source, images)

    def forward(self, images: Tensor) -> Tensor:
        embedded = F.normalize(self.embed(images).float(), dim=-1)
        columns = self.columns.vectors
        if columns is None:  # no columns yet (the probe at load): every image scores against none
            return embedded[:, :0]
        scores = embedded @ columns.to(embedded.device, torch.float32).T
        if self.scaled:
            scores = scores * self.source.logit_scale.float().exp()
            bias = getattr(self.source, "logit_bias", None)
            if bias is not None:
                scores = scores + bias.float()
        return scores


class PromptEmbeddings:
    """Prompts to unit text embeddings through the model's text tower, batched, each distinct prompt computed once
    and kept in an LRU cache of ``size`` prompts. ``tokenize(prompts)`` gives the tower's inputs, or says which
    prompt is too long for the model's context."""

    def __init__(self, model: ColumnScores, tokenize: Callable[[Sequence[str]], dict[str, Tensor]], size: int) -> None:
        if model.encoder.text is None:
            raise ValueError("this model has no text tower: it takes no prompts")
        self.model, self.tokenize, self.size = model, tokenize, size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.text_passes = 0
        """Text forward passes so far (one per batch of prompts not in the cache)."""

    def __deepcopy__(self, memo: dict) -> PromptEmbeddings:
        return self  # a randomised copy of the model (the sanity check) reads the same prompts' embeddings

    def check(self, prompts: Sequence[str]) -> None:
        """Refuse a prompt that the model cannot read whole (a ClientError names it), before any pass runs."""
        with self._lock:
            missing = [prompt for prompt in prompts if prompt not in self._cache]
        if missing:
            self.tokenize(missing)

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        """(K, D) unit embeddings of ``prompts``, in order."""
        with self._lock:
            missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
            if missing:
                device = next(self.model.parameters()).device
                tokens = {key: value.to(device) for key, value in self.tokenize(missing).items()}
                with torch.no_grad():
                    vectors = F.normalize(self.model.encoder.text(self.model.source, tokens).float(), dim=-1)
                self.text_passes += 1
                for prompt, vector in zip(missing, vectors, strict=True):
                    self._cache[prompt] = vector
            for prompt in prompts:
                self._cache.move_to_end(prompt)
            found = torch.stack([self._cache[prompt] for prompt in prompts])
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
            return found


def with_prompts(model: ColumnScores, embedding: dict, directory, size: int) -> ColumnScores:
    """``model`` with its prompts' embeddings (``model.texts``), when it has a text tower: the tokenizer saved in
    ``directory`` (transformers), or open_clip's own for its model name."""
    if model.encoder.text is not None:
        context = int(embedding["context"])
        if embedding["encoder"] == "open_clip":
            tokenize = open_clip_tokenizer(str(embedding["open_clip"]))
        else:
            tokenize = hf_tokenizer(directory, context)
        model.texts = PromptEmbeddings(model, tokenize, size)
    return model


def hf_tokenizer(directory, context: int) -> Callable[[Sequence[str]], dict[str, Tensor]]:
    """A transformers tokenizer saved beside the model, refusing a prompt of more tokens than ``context``. SigLIP
    was trained on prompts padded to its full context, and is given them so."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    pad_to_context = "siglip" in type(tokenizer).__name__.lower()

    def tokenize(prompts: Sequence[str]) -> dict[str, Tensor]:
        lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
        _check_lengths(prompts, lengths, context)
        padding = {"padding": "max_length", "max_length": context} if pad_to_context else {"padding": True}
        tokens = tokenizer(list(prompts), return_tensors="pt", **padding)
        return {key: tokens[key] for key in ("input_ids", "attention_mask") if key in tokens}

    return tokenize


def open_clip_tokenizer(name: str) -> Callable[[Sequence[str]], dict[str, Tensor]]:
    """open_clip's tokenizer for model ``name`` (its own BPE, bundled with the package: offline), refusing a prompt
    of more tokens than its context (open_clip itself would cut it silently)."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(name)
    context = tokenizer.context_length
    encode = getattr(tokenizer, "encode", None)

    def tokenize(prompts: Sequence[str]) -> dict[str, Tensor]:
        if encode is not None:  # its start and end tokens come on top of the text's
            _check_lengths(prompts, [len(encode(prompt)) + 2 for prompt in prompts], context)
        return {"input_ids": tokenizer(list(prompts))}

    return tokenize


def _check_lengths(prompts: Sequence[str], lengths: Sequence[int], context: int) -> None:
    for index, (prompt, length) in enumerate(zip(prompts, lengths, strict=True)):
        if length > context:
            raise ClientError(
                "InvalidOption",
                f"prompt {index} ({prompt[:40]!r}...) is {length} tokens long; this model reads at most {context} "
                "tokens per prompt: shorten it",
            )
