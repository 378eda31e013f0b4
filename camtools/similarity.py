"""The build of the models without a fixed class list (``--task zero-shot`` and ``--task embedding``): the image–text
model or the embedding network wrapped as the engine explains it (:class:`camserve.embeddings.ColumnScores`), its
default prompts, its embedding's size, and one explanation validated.

Build-time only, as :mod:`camtools.models` is; every failure is a :class:`~camtools.errors.BuildError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from camserve import settings
from camserve.cam import CamEngine, CamRequest, Classes
from camserve.embeddings import ColumnScores, with_prompts
from camtools.errors import BuildError

__all__ = ["IMAGE_TEXT_TYPES", "TEMPLATE", "default_prompts", "hf_files", "validate", "wrap"]

IMAGE_TEXT_TYPES = {"clip": "zero-shot", "siglip": "zero-shot"}
"""The transformers model types that have an image and a text tower, and the task they are built as by default."""
TEMPLATE = "a photo of a {}."
"""The prompt made of each label when the build gives labels but no prompts (``--template``), CLIP's own."""
HF_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "spiece.model",
    "added_tokens.json", "preprocessor_config.json",
)  # fmt: skip
"""What ``save_pretrained`` writes beside a CLIP or SigLIP model's weights that its worker reads: the tokenizer."""


def hf_files(directory: Path) -> tuple[Path, ...]:
    """The files an archive carries of a transformers image–text directory, beside its config: its tokenizer's."""
    return tuple(directory / name for name in HF_SIDE_FILES if (directory / name).is_file())


def default_prompts(prompts: Path | None, labels: Sequence[str] | None, template: str | None) -> list[str]:
    """The archive's prompts: ``--prompts FILE`` (one per line), else each label in ``template``."""
    if prompts is not None:
        try:
            lines = [line.strip() for line in Path(prompts).read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as error:
            raise BuildError(f"cannot read the prompts file {prompts}: {error}") from None
        found = [line for line in lines if line]
        if not found:
            raise BuildError(f"the prompts file {prompts} has no prompt: write one sentence per line")
        return found
    if labels:
        template = template or TEMPLATE
        if "{}" not in template:
            raise BuildError(f"--template must contain {{}} where the label goes, got {template!r}")
        return [template.format(label) for label in labels]
    raise BuildError(
        "a zero-shot model needs its default prompts: give --prompts FILE (one sentence per line) or --labels FILE "
        f"(each label becomes {TEMPLATE.format('<label>')!r}, or --template's sentence)"
    )


def wrap(model: nn.Module, encoder: str, scored: bool) -> ColumnScores:
    """The model as the engine explains it: scored against columns (its logits with ``scored``, else cosines)."""
    return ColumnScores(model, encoder, scaled=scored).eval().requires_grad_(False)


def embedding_size(model: ColumnScores, side: int) -> int:
    """The length of the model's image embedding, from one blank image."""
    with torch.no_grad():
        embedded = model.embed(torch.zeros(1, 3, side, side))
    if not isinstance(embedded, torch.Tensor) or embedded.ndim != 2:
        raise BuildError(
            f"an embedding model must return (N, D) vectors; this one returns {getattr(embedded, 'shape', embedded)}: "
            "name the part that holds them with --output"
        )
    return int(embedded.shape[1])


def validate(
    model: ColumnScores, embedding: dict, directory: Path | None, prompts: Sequence[str], layer: str, side: int
):
    """One explanation of a synthetic image at ``layer``: against the default prompts (through the model's own
    tokenizer), or its similarity to itself; it must be a finite map. Returns the model, with its prompts."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        image = torch.rand(1, 3, side, side)
    if prompts:
        try:
            with_prompts(model, embedding, directory, settings.PROMPT_CACHE_SIZE)
            columns = model.texts(prompts)
        except Exception as error:  # the tokenizer's files, a prompt too long for the context
            raise BuildError(f"the default prompts could not be embedded: {error}") from None
    else:
        with torch.no_grad():
            columns = F.normalize(model.embed(image).float(), dim=-1)
    model.columns.vectors = columns
    try:
        output = CamEngine(model, input_size=side, default_layer=layer)(image, [CamRequest(Classes([0]), layer)])
    finally:
        model.columns.vectors = None
    if not torch.isfinite(output.maps[0]).all() or not torch.isfinite(output.logits).all():
        raise BuildError(f"the explanation at layer {layer} is not finite")
    return model
