"""What the service's steps share: one request's result and the containment that makes it, the prepared request,
the response's size accounting, and the rendering of one explanation. No task and no runtime in here."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from camserve import settings
from camserve.api import ExplainOptions, Explanation, ModelInfo, Segment, WorkBudget
from camserve.cam import CamEngine, CamRequest
from camserve.cam.sanity import Sanity
from camserve.errors import ClientError
from camserve.imaging import DecodeLimits, encode_heatmap_png16, encode_image, to_base64
from camserve.overlays import LEVEL_OVERLAYS, clip_map, levels_at, map_at, render_overlay
from camserve.spec import ModelSpec

logger = logging.getLogger(__name__)

__all__ = [
    "BatchBytes",
    "PreparedRequest",
    "ResponseSize",
    "RowResult",
    "Section",
    "ServiceView",
    "Terms",
    "contained",
    "internal_error",
    "render",
]


@dataclass(frozen=True)
class RowResult:
    """The HTTP status and JSON body for one request."""

    status: int
    body: dict[str, object]

    def with_id(self, request_id: str | None) -> dict[str, object]:
        """The body as a door sends it: an error names the runtime's request id, when it has one."""
        if self.status == 200 or request_id is None:
            return self.body
        return {**self.body, "request_id": request_id}


def internal_error(what: str) -> RowResult:
    """A 500 for one request; the traceback is in the log, next to the request id the door adds."""
    return RowResult(500, {"code": 500, "type": "InternalError", "message": f"{what} failed on the server"})


def contained(step: str, work: Callable[[], object]) -> object | RowResult:
    """``work()``, or the request's own error result: a ClientError's 4xx, or a 500 for anything else (logged)."""
    try:
        return work()
    except ClientError as error:
        return RowResult(error.status, error.to_dict())
    except Exception:
        logger.exception("%s failed for one request; its batch neighbours are answered", step)
        return internal_error(step)


@dataclass(frozen=True)
class Terms:
    """What one request names beside its image, as its task reads it: the names of the indices that its targets
    run over (a classifier's labels, a zero-shot request's prompts, an embedding request's references), the forward
    passes they cost beside the explanation's, and the task's own data of them (reference images, decoded)."""

    labels: Sequence[str]
    passes: int = 0
    data: object = None


@dataclass
class PreparedRequest:
    """A decoded request: its options, what the engine explains, the image at output size (released once rendered)
    and the pixels the model reads, which the batch squashes to its input (often the same array)."""

    options: ExplainOptions
    cam: CamRequest
    display: np.ndarray | None
    model_input: np.ndarray
    width: int
    """The uploaded image's upright size."""
    height: int
    terms: Terms
    depth: int | None = None
    """A volume's third side (``width`` and ``height`` are its first two): its ``display`` is the scaled volume."""
    affine: np.ndarray | None = None
    """A volume's voxel-to-world affine."""
    first: int = 0
    """The model output's column of its index 0: an embedding request's references follow those of the requests
    before it in the batch (:mod:`camserve.tasks.similarity`)."""


@dataclass(frozen=True)
class Section:
    """A task's own part of one image's response, beside its explanations: a segmenter's segments, its class mask,
    and for each explained class the outline drawn on its overlay."""

    segments: list[Segment] | None = None
    mask: str | None = None
    outline: Callable[[int], Callable[[np.ndarray], np.ndarray]] | None = None
    similarities: list[dict[str, object]] | None = None
    """An embedding model's cosine similarity to each reference."""
    embedding: list[float] | None = None
    """An embedding model's embedding of the image, when asked."""


class ServiceView(Protocol):
    """What a task's batch reads of the service that runs it (:class:`camserve.pipeline.ExplanationService`)."""

    engine: CamEngine
    spec: ModelSpec
    limits: DecodeLimits
    device: torch.device
    budget: WorkBudget
    channels_last_from: int
    stage_seconds: dict[str, float]
    sanity: Sanity
    model_info: ModelInfo
    pool: Executor


class BatchBytes:
    """The bytes a batch's responses add up to, under a limit (TorchServe passes a batch's responses to its
    frontend as one message, which must fit ``max_response_size``); thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit, self.total, self._lock = limit, 0, threading.Lock()

    def reserve(self, size: int) -> None:
        with self._lock:
            if self.total + size > self.limit:
                raise ClientError(
                    "ResponseTooLarge",
                    f"this response ({size} bytes) and those of the requests served in the same batch would exceed "
                    f"{self.limit} bytes together, TorchServe's limit for one batch: ask for a smaller max_side, "
                    "format jpeg or no heatmap, or send it again",
                )
            self.total += size


class ResponseSize:
    """One response's bytes, counted as it is rendered: it stops at the budget's limit as soon as it is reached."""

    def __init__(self, budget: WorkBudget) -> None:
        self.budget, self.total = budget, settings.RESPONSE_OVERHEAD_BYTES

    def add(self, text: str | None) -> None:
        self.total += len(text or "")

    def add_explanation(self, explanation: Explanation) -> None:
        self.total += len(explanation.overlay) + len(explanation.heatmap or "") + settings.EXPLANATION_OVERHEAD_BYTES
        self.budget.check_response(self.total)


def render(
    item: PreparedRequest,
    target: int,
    label: str,
    figure: dict[str, float],
    cam: np.ndarray,
    decorate: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Explanation:
    """One explanation: its overlay (drawn on by ``decorate``: a segment's outline, a detection's box), heatmap and
    the explained class's own ``figure``, from its map ``cam`` on the layer's grid.

    The map is brought to the image's output size as uint8 levels when the overlay is all that is drawn from it
    (:func:`camserve.overlays.levels_at`), else as the float map that a clip, a heatmap PNG, a mask or an outline
    needs (:func:`camserve.overlays.map_at`)."""
    options = item.options
    size = item.display.shape[:2]
    if options.clip is None and not options.heatmap and options.overlay in LEVEL_OVERLAYS:
        heatmap = levels_at(cam, size)
    else:
        heatmap = map_at(cam, size)
    if options.clip is not None:
        heatmap = clip_map(heatmap, *options.clip)
    overlay = render_overlay(item.display, heatmap, options.alpha, options.colormap, options.overlay, options.region)
    if decorate is not None:
        overlay = decorate(overlay)
    return Explanation(
        index=target,
        label=label,
        **figure,
        method=options.method,
        layer=options.layer,
        format=options.format,
        width=overlay.shape[1],
        height=overlay.shape[0],
        overlay=to_base64(encode_image(overlay, options.format)),
        heatmap=to_base64(encode_heatmap_png16(heatmap)) if options.heatmap else None,
    )
