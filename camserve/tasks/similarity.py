"""Models without a fixed class list: a zero-shot image–text model (CLIP, SigLIP) scores the image against the
sentences a request gives, and an embedding model against reference images or embeddings.

Both explain a column of :class:`~camserve.embeddings.ColumnScores`: the image's score against one prompt's text
embedding (CLIP's logit ``logits_per_image[:, k]``, pytorch-grad-cam's ``ClassifierOutputTarget(k)`` on those
logits) or its cosine similarity to one reference's embedding (pytorch-grad-cam's ``SimilarityToConceptTarget``).
The task sets the batch's columns, then explains the batch with one pass of the engine as any classifier's is: every
method, faithfulness and the sanity check score the same scalar.

- Zero-shot: the requests of a batch that give the same prompts (the archive's, most often) share one pass; the
  text embeddings come from the worker's cache (:class:`~camserve.embeddings.PromptEmbeddings`).
- Embedding: every reference of the batch is embedded in one pass without autograd; the batch's references are
  the columns of one explained pass, each request's after those of the requests before it
  (:attr:`~camserve.work.PreparedRequest.first`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from camserve import settings
from camserve.api import ExplainOptions, ExplainResponse
from camserve.batch import explain_with_engine
from camserve.cam import SOFTMAX, Classes, Target
from camserve.errors import ClientError
from camserve.imaging import open_image
from camserve.model import images_to_batch
from camserve.tasks.base import Task
from camserve.tasks.classification import RAW, SIGMOID, Multilabel
from camserve.work import PreparedRequest, RowResult, Section, ServiceView, Terms, contained

__all__ = ["EMBEDDING", "ZERO_SHOT", "Embedding", "SigmoidZeroShot", "ZeroShot"]


def _explain_against(service: ServiceView, task: Task, prepared: list[PreparedRequest], columns: Tensor):
    """The batch explained with ``columns`` (K, D) as what its images are scored against."""
    model = service.engine.model
    with model.columns.lock:
        model.columns.vectors = columns
        try:
            return explain_with_engine(service, task, prepared)
        finally:
            model.columns.vectors = None


@dataclass(frozen=True)
class ZeroShot(Task):
    """A CLIP model: the image scored against each prompt, ``logits_per_image`` = scale · cos(image, text), the
    prompts ranked by their softmax; a prompt's explanation differentiates its logit."""

    kind: ClassVar[str] = "zero-shot"
    options: ClassVar[frozenset[str]] = Task.options | {"prompts"}
    unit: ClassVar[str] = "prompt"
    what: ClassVar[str] = "prompts"
    one: ClassVar[str] = "a prompt"

    def serving(self, model, spec) -> Task:
        """A model with a logit bias (SigLIP) was trained with a sigmoid per prompt: it is read as one."""
        return SIGMOID_ZERO_SHOT if model.sigmoid else self

    def default_labels(self, classes: int) -> list[str]:
        return [f"prompt_{i}" for i in range(classes)]

    def terms(self, options: ExplainOptions, service: ServiceView) -> Terms:
        """The request's prompts, or the archive's; each within the model's context."""
        prompts = options.prompts or service.spec.labels
        service.engine.model.texts.check(prompts)
        return Terms(tuple(prompts), passes=int(options.prompts is not None))

    def explain(self, service: ServiceView, prepared: list[PreparedRequest]) -> list[RowResult]:
        """One pass per distinct prompt list in the batch, with those prompts' embeddings as the columns."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for n, item in enumerate(prepared):
            groups.setdefault(tuple(item.terms.labels), []).append(n)
        results: list[RowResult] = [None] * len(prepared)
        for prompts, rows in groups.items():
            columns = service.engine.model.texts(prompts)
            answered = _explain_against(service, self, [prepared[n] for n in rows], columns)
            for n, result in zip(rows, answered, strict=True):
                results[n] = result
        return results


@dataclass(frozen=True)
class SigmoidZeroShot(ZeroShot):
    """A SigLIP model: logit = scale · cos(image, text) + bias, each prompt's probability σ(logit), read as a
    multi-label model's classes (``positive`` from ``threshold``)."""

    options: ClassVar[frozenset[str]] = ZeroShot.options | {"threshold"}

    def serving(self, model, spec) -> Task:
        return self

    default_target = Multilabel.default_target
    predictions = Multilabel.predictions


ZERO_SHOT = ZeroShot("zero-shot", SOFTMAX, exclusive=True)
SIGMOID_ZERO_SHOT = SigmoidZeroShot("zero-shot", SIGMOID)


@dataclass
class _References:
    """An embedding request's references: its images at the model's input size, and the embeddings it gives."""

    images: list = field(default_factory=list)
    vectors: tuple[tuple[float, ...], ...] = ()
    units: list[Tensor] = field(default_factory=list)
    """The images' unit embeddings, once computed."""
    embedding: list[float] | None = None
    """The image's own embedding, once computed (``return_embedding``)."""


@dataclass(frozen=True)
class Embedding(Task):
    """An embedding model: each reference's cosine similarity to the image, explained as pytorch-grad-cam's
    ``SimilarityToConceptTarget`` explains it."""

    probabilities: bool = False
    kind: ClassVar[str] = "embedding"
    options: ClassVar[frozenset[str]] = frozenset(
        {"reference", "reference_embedding", "return_embedding", "aug_smooth", "sanity"}
    )
    figure: ClassVar[str] = "similarity"
    unit: ClassVar[str] = "reference"
    what: ClassVar[str] = "references"
    one: ClassVar[str] = "a reference"

    def terms(self, options: ExplainOptions, service: ServiceView) -> Terms:
        """The reference images, decoded at the model's input size, and the reference embeddings, checked."""
        images, vectors = options.reference or (), options.reference_embedding or ()
        if len(images) + len(vectors) > settings.MAX_REFERENCES:
            raise ClientError(
                "InvalidOption", f"give at most {settings.MAX_REFERENCES} references, images and embeddings together"
            )
        if not images and not vectors and not options.return_embedding:
            raise ClientError(
                "MissingReference",
                "an embedding model explains the image's similarity to a reference: give reference (an image: a "
                "multipart field or base64 in JSON) or reference_embedding (a list of numbers), or ask only for "
                "return_embedding",
            )
        size = int(service.spec.embedding["size"])
        for index, vector in enumerate(vectors):
            if len(vector) != size:
                raise ClientError(
                    "InvalidOption",
                    f"reference_embedding {index} has {len(vector)} numbers; this model's embeddings have {size}",
                )
        references = _References([self._reference(index, data, service) for index, data in enumerate(images)], vectors)
        labels = [f"reference {index}" for index in range(len(images) + len(vectors))]
        return Terms(tuple(labels), passes=len(images) + int(options.return_embedding), data=references)

    def _reference(self, index: int, data: bytes, service: ServiceView):
        try:
            opened = open_image(data, service.limits)
        except ClientError as error:
            raise ClientError(error.kind, f"reference {index}: {error.message}", error.status) from None
        side = service.spec.input_size
        return self.model_input(opened, (side, side), side, service.spec.channels)[1]

    def targets(self, options: ExplainOptions, classes: int) -> Target:
        """Every reference, in order (one placeholder for a request that asks only for its embedding)."""
        return Classes(range(max(classes, 1)))

    def explain(self, service: ServiceView, prepared: list[PreparedRequest]) -> list[RowResult]:
        """The batch's references (and the images that ask for their embedding) embedded in one pass without
        autograd, then every request that has references explained in one pass against all of them."""
        self._embed(service, prepared)
        explained = [item for item in prepared if item.terms.labels]
        columns, first = [], 0
        for item in explained:
            references = item.terms.data
            item.first, first = first, first + len(item.terms.labels)
            item.cam = replace(item.cam, targets=Classes(range(item.first, first)))  # its columns among the batch's
            given = torch.tensor(references.vectors, dtype=torch.float32).view(-1, service.spec.embedding["size"])
            columns += [*references.units, *F.normalize(given, dim=-1).to(service.device)]
        answered = iter(_explain_against(service, self, explained, torch.stack(columns)) if explained else ())
        return [
            next(answered)
            if item.terms.labels
            else contained("answering with the embedding", lambda item=item: self._embedding_only(service, item))
            for item in prepared
        ]

    @staticmethod
    def _embed(service: ServiceView, prepared: list[PreparedRequest]) -> None:
        """Each request's reference images become unit embeddings, and its own embedding is kept when asked."""
        images = [image for item in prepared for image in item.terms.data.images]
        own = [item for item in prepared if item.options.return_embedding]
        if not images and not own:
            return
        batch = images_to_batch([*images, *(item.model_input for item in own)], service.spec, service.device)
        engine = service.engine
        with torch.no_grad(), engine.autocast(batch.device):
            embedded = engine.model.embed(batch).float()
        units = iter(F.normalize(embedded[: len(images)], dim=-1))
        for item in prepared:
            item.terms.data.units = [next(units) for _ in item.terms.data.images]
        for item, vector in zip(own, embedded[len(images) :], strict=True):
            item.terms.data.embedding = vector.cpu().tolist()

    @staticmethod
    def _embedding_only(service: ServiceView, item: PreparedRequest) -> RowResult:
        item.display = None
        embedding = item.terms.data.embedding
        response = ExplainResponse(service.model_info, item.width, item.height, None, [], embedding=embedding)
        return RowResult(200, response.to_dict())

    def image_predictions(self, scores, options, labels):
        return None

    def section(self, item: PreparedRequest, pixels, scores: Tensor, size: tuple[int, int]) -> Section:
        """The similarity to each of the request's references, and its embedding when asked."""
        labels: Sequence[str] = item.terms.labels
        own = scores[item.first : item.first + len(labels)].tolist()
        similarities = [
            {"index": index, "label": label, "similarity": round(value, 6)}
            for index, (label, value) in enumerate(zip(labels, own, strict=True))
        ]
        return Section(similarities=similarities, embedding=item.terms.data.embedding)


EMBEDDING = Embedding("embedding", RAW)
