"""A batch explained with one pass of the engine, and each request's response: what classifiers and segmenters
share. The task (``camserve.tasks``) gives its predictions, its class per pixel, its faithfulness measure and its
own section of the response; nothing here asks which task it is."""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import numpy as np
import torch

from camserve.api import ExplainResponse
from camserve.cam import normalize_map
from camserve.cam.sanity import SanityFigure
from camserve.faithfulness import Faithfulness, faithfulness
from camserve.model import images_to_batch
from camserve.work import BatchBytes, PreparedRequest, ResponseSize, RowResult, ServiceView, contained

__all__ = ["explain_with_engine"]


def explain_with_engine(service: ServiceView, task, prepared: list[PreparedRequest]) -> list[RowResult]:
    """One forward pass of the engine for the whole batch, the sanity figures and faithfulness of those that ask,
    then each request's response, rendered on the service's threads."""
    started = time.perf_counter()
    channels_last = 0 < service.channels_last_from <= len(prepared)
    batch = images_to_batch([item.model_input for item in prepared], service.spec, service.device, channels_last)
    squashed = time.perf_counter()  # the model's resize, part of the decode stage (metrics.yaml's DecodeTime)
    service.stage_seconds["decode"] = service.stage_seconds.get("decode", 0.0) + squashed - started
    checked = [item.cam if item.options.sanity else None for item in prepared]
    keep = service.sanity.keep([cam for cam in checked if cam is not None])
    output = service.engine(batch, [item.cam for item in prepared], keep=keep)
    checks = service.sanity.figures(batch, checked, output) if any(c is not None for c in checked) else {}
    scores = task.scores(output.logits).cpu()  # one copy off the device for the whole batch
    service.stage_seconds["forward"] = output.seconds["forward"]
    service.stage_seconds["cam"] = time.perf_counter() - squashed - output.seconds["forward"]
    started = time.perf_counter()
    predictions = [
        task.image_predictions(row, item.options, item.terms.labels) for item, row in zip(prepared, scores, strict=True)
    ]
    target_scores = [scores[n, targets].tolist() for n, targets in enumerate(output.targets)]
    measured = _faithfulness(service, task, prepared, batch, output, target_scores)
    pixels = task.pixel_classes(output.logits)
    # The maps leave the device here, at the layer's resolution: the render threads only call NumPy and OpenCV.
    maps = [m.float().cpu().numpy() for m in output.maps]
    sent = BatchBytes(service.budget.max_response_bytes)

    def respond(n: int) -> RowResult:
        return contained(
            "rendering the explanation",
            lambda: _respond(
                service, task, prepared[n], predictions[n], output.targets[n], target_scores[n], maps[n], sent,
                measured.get(n), (None if pixels is None else pixels[n], scores[n]), checks.get(n),
            ),
        )  # fmt: skip

    results = list(service.pool.map(respond, range(len(prepared))))
    service.stage_seconds["encode"] = time.perf_counter() - started
    return results


def _faithfulness(
    service: ServiceView, task, prepared: list[PreparedRequest], batch: torch.Tensor, output, target_scores
) -> dict[int, list[Faithfulness]]:
    """Each asking request's explanations measured (``camserve.faithfulness``), in one batched run per step
    count across the whole batch: the maps at the model's input size, the input, p(x) from the forward pass."""
    asking: dict[int, list[int]] = {}
    for n, item in enumerate(prepared):
        if item.options.faithfulness:
            asking.setdefault(item.options.faithfulness_steps, []).append(n)
    measured: dict[int, list[Faithfulness]] = {}
    side = (batch.shape[-2], batch.shape[-1])
    for steps, rows in asking.items():
        counts = [len(output.targets[n]) for n in rows]
        image_of_pair = torch.repeat_interleave(torch.tensor(rows, device=batch.device), torch.tensor(counts))
        maps = torch.cat([normalize_map(output.maps[n], side) for n in rows])
        classes = torch.tensor([c for n in rows for c in output.targets[n]], device=batch.device)
        p_x = torch.tensor([p for n in rows for p in target_scores[n]])
        measure = task.measure(output.logits[image_of_pair], classes)
        if measure is not None:
            measure, p_x = measure
        results = faithfulness(
            service.engine.logits, batch[image_of_pair], maps, classes, p_x, steps=steps, scores=task.scores,
            measure=measure,
        )  # fmt: skip
        results = iter(results)
        for n, count in zip(rows, counts, strict=True):
            measured[n] = [next(results) for _ in range(count)]
    return measured


def _respond(
    service: ServiceView,
    task,
    item: PreparedRequest,
    predictions,
    targets: list[int],
    target_scores: list[float],
    maps: np.ndarray,
    sent: BatchBytes,
    measured: list[Faithfulness] | None,
    pixels: tuple[np.ndarray | None, torch.Tensor],
    checked: list[SanityFigure] | None,
) -> RowResult:
    """Render one target at a time at the output size, stopping as soon as the response would be too large."""
    size = ResponseSize(service.budget)
    try:
        shape = (item.display.shape[0], item.display.shape[1])
        section = task.section(item, *pixels, shape)
        size.add(section.mask)
        explanations = []
        for index, (target, score, cam) in enumerate(zip(targets, target_scores, maps, strict=True)):
            outline = None if section.outline is None else section.outline(target)
            figure = task.explained(score)
            own = target - item.first  # the request's own index of the explained column
            explanation = task.render_explanation(service, item, own, item.terms.labels[own], figure, cam, outline)
            if measured is not None:
                explanation = replace(explanation, faithfulness=asdict(measured[index]))
            if checked is not None:
                figure = checked[index]
                sanity = {"rank_correlation": figure.rank_correlation, "randomised": list(figure.randomised)}
                explanation = replace(explanation, sanity=sanity)
            size.add_explanation(explanation)
            explanations.append(explanation)
        sent.reserve(size.total)
    finally:
        item.display = None  # the image is rendered (or refused): release it before the batch is done
    response = ExplainResponse(
        service.model_info, item.width, item.height, predictions, explanations, segments=section.segments,
        mask=section.mask, similarities=section.similarities, embedding=section.embedding, depth=item.depth,
    )  # fmt: skip
    return RowResult(200, response.to_dict())
