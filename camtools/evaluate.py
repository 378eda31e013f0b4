"""Which method for my model? Every method on a labelled image set: mean deletion, insertion and drop
(``camserve.faithfulness``), the pointing game where boxes are known, and the sanity check's full cascade
(:func:`cascade`). ``scripts/evaluate.py`` is its CLI.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from camserve.cam import METHODS, CamEngine, CamRequest, Classes, normalize_map
from camserve.cam.sanity import SANITY_SEED, at_input, randomised_copy, rank_correlation
from camserve.faithfulness import faithfulness
from camserve.imaging import decode_image
from camserve.model import images_to_batch
from camserve.spec import ModelSpec
from camserve.tasks import task_named
from camtools.road import road_combined

__all__ = [
    "CascadeStep",
    "LabelledImage",
    "MethodScore",
    "cascade",
    "cascade_blocks",
    "cascade_markdown",
    "evaluate",
    "load_labelled_images",
    "markdown",
    "plot",
    "plot_cascade",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
POINTING_TOLERANCE = 15
"""Pixels around the box within which the map's maximum still counts as a hit (Zhang et al., IJCV 2018)."""


@dataclass
class LabelledImage:
    name: str
    image: np.ndarray
    label: int
    box: tuple[int, int, int, int] | None = None
    """(x0, y0, x1, y1) in the image's pixels, or None."""


@dataclass
class MethodScore:
    method: str
    layer: str
    deletion: list[float] = field(default_factory=list)
    insertion: list[float] = field(default_factory=list)
    drop: list[float] = field(default_factory=list)
    increase: list[bool] = field(default_factory=list)
    hits: list[bool] = field(default_factory=list)
    road: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        mean = lambda values: float(np.mean(values)) if values else float("nan")  # noqa: E731
        return {
            "method": self.method,
            "layer": self.layer,
            "deletion": mean(self.deletion),
            "insertion": mean(self.insertion),
            "drop": mean(self.drop),
            "increase": mean(self.increase),
            "pointing": mean(self.hits) if self.hits else None,
            "road": mean(self.road) if self.road else None,
            "images": len(self.deletion),
        }


def _class_index(value: str, labels: Sequence[str]) -> int:
    if value in labels:
        return labels.index(value)
    if value.isdigit() and int(value) < len(labels):
        return int(value)
    raise ValueError(f"class {value!r} is neither one of the model's labels nor an index below {len(labels)}")


def load_labelled_images(source: Path, labels: Sequence[str]) -> list[LabelledImage]:
    """A folder with one subfolder per class (named by label or index), or a CSV of ``file,class`` rows with an
    optional box ``x0,y0,x1,y1`` (files relative to the CSV)."""
    items = []
    if source.is_file():
        with open(source, newline="") as handle:
            for row in csv.reader(handle):
                if not row or row[0].startswith("#") or row[0] == "file":
                    continue
                box = tuple(int(float(v)) for v in row[2:6]) if len(row) >= 6 else None
                path = source.parent / row[0]
                items.append(LabelledImage(row[0], decode_image(path.read_bytes()), _class_index(row[1], labels), box))
        return items
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        label = _class_index(folder.name, labels)
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            items.append(LabelledImage(f"{folder.name}/{path.name}", decode_image(path.read_bytes()), label))
    return items


def _hit(heat: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    x0, y0, x1, y1 = box
    dx = max(x0 - x, 0, x - (x1 - 1))
    dy = max(y0 - y, 0, y - (y1 - 1))
    return bool(np.hypot(dx, dy) <= POINTING_TOLERANCE)


def evaluate(
    model: torch.nn.Module,
    spec: ModelSpec,
    images: list[LabelledImage],
    methods: Sequence[str] = METHODS,
    layers: Sequence[str] | None = None,
    steps: int = 16,
    batch_size: int = 16,
    progress=None,
    road: bool = False,
) -> list[MethodScore]:
    """Every (layer, method) on every image, for its labelled class; with ``road``, ROAD too
    (:func:`camtools.road.road_combined`, on the task's scores, a second or more per map at 224 pixels)."""
    task = task_named(spec.task)
    engine = CamEngine(model, input_size=spec.input_size, default_layer=spec.default_layer, head=task.head)
    side = spec.input_size
    scores = {
        (layer, method): MethodScore(method, layer) for layer in layers or [spec.default_layer] for method in methods
    }
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = images_to_batch([item.image for item in chunk], spec)
        classes = torch.tensor([item.label for item in chunk])
        for (layer, method), score in scores.items():
            output = engine(
                batch, [CamRequest(targets=Classes([item.label]), layer=layer, method=method) for item in chunk]
            )
            p_x = task.scores(output.logits)[torch.arange(len(chunk)), classes]
            maps = torch.cat([normalize_map(m, (side, side)) for m in output.maps])
            for result in faithfulness(engine.logits, batch, maps, classes, p_x, steps=steps, scores=task.scores):
                score.deletion.append(result.deletion)
                score.insertion.append(result.insertion)
                score.drop.append(result.drop)
                score.increase.append(result.increase)
            if road:
                score.road += road_combined(
                    engine.logits, batch, maps.numpy(), classes.tolist(), scores=task.scores
                ).tolist()
            for item, cam in zip(chunk, output.maps, strict=True):
                if item.box is not None:
                    heat = normalize_map(cam, item.image.shape[:2])[0].numpy()
                    score.hits.append(_hit(heat, item.box))
            if progress is not None:
                progress.update(len(chunk))
    return list(scores.values())


def markdown(scores: list[MethodScore]) -> str:
    rows = [score.summary() for score in scores]
    rows.sort(key=lambda row: row["insertion"] - row["deletion"], reverse=True)
    pointing = any(row["pointing"] is not None for row in rows)
    road = any(row["road"] is not None for row in rows)
    header = "| method | layer | deletion ↓ | insertion ↑ | drop ↓ | increase | " + ("pointing ↑ |" if pointing else "")
    header += " ROAD ↑ |" if road else ""
    lines = [header, "|---|---|---:|---:|---:|---:|" + ("---:|" if pointing else "") + ("---:|" if road else "")]
    for row in rows:
        cells = [
            f"`{row['method']}`",
            f"`{row['layer']}`",
            f"{row['deletion']:.3f}",
            f"{row['insertion']:.3f}",
            f"{row['drop']:.3f}",
            f"{row['increase']:.0%}",
        ]
        if pointing:
            cells.append(f"{row['pointing']:.0%}" if row["pointing"] is not None else "")
        if road:
            cells.append(f"{row['road']:.3f}" if row["road"] is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(scores: list[MethodScore], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [score.summary() for score in scores]
    names = [f"{row['method']}" + (f"\n{row['layer']}" if len({r["layer"] for r in rows}) > 1 else "") for row in rows]
    metrics = [("deletion", "deletion AUC (lower is better)"), ("insertion", "insertion AUC (higher is better)")]
    metrics.append(("drop", "average drop (lower is better)"))
    if any(row["pointing"] is not None for row in rows):
        metrics.append(("pointing", "pointing game (higher is better)"))
    if any(row["road"] is not None for row in rows):
        metrics.append(("road", "ROAD (higher is better)"))
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.35 * len(rows) + 1.6), sharey=True)
    for axis, (key, label) in zip(np.atleast_1d(axes), metrics, strict=True):
        values = [row[key] if row[key] is not None else 0.0 for row in rows]
        colours = ["#999999" if row["method"] == "randomcam" else "#3b75af" for row in rows]
        axis.barh(range(len(rows)), values, color=colours)
        axis.set_title(label, fontsize=10)
        if key != "road":  # ROAD is a change of score: it may be negative
            axis.set_xlim(0, 1)
        axis.grid(axis="x", alpha=0.3)
    np.atleast_1d(axes)[0].set_yticks(range(len(rows)), names, fontsize=8)
    np.atleast_1d(axes)[0].invert_yaxis()
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- The sanity check's full cascade ---


@dataclass(frozen=True)
class CascadeStep:
    method: str
    block: str
    """The block randomised at this step, with every block above it."""
    correlation: float
    """The mean over the images of Spearman's rank correlation with the trained model's map (NaN maps left out)."""


def cascade_blocks(model: torch.nn.Module) -> list[str]:
    """The model's blocks from the top down, as the cascade randomises them: the modules with
    ``reset_parameters``, grouped by their first two name parts (``layer4.2``, ``fc``, ``features.6``), ordered by
    where their first module is in ``named_modules``, reversed (Quantus's top-down order, block by block)."""
    blocks: dict[str, None] = {}
    for name, module in model.named_modules():
        if name and hasattr(module, "reset_parameters"):
            blocks.setdefault(".".join(name.split(".")[:2]), None)
    return list(reversed(blocks))


def cascade(
    model: torch.nn.Module,
    spec: ModelSpec,
    images: list[LabelledImage],
    methods: Sequence[str],
    layer: str | None = None,
    batch_size: int = 16,
    seed: int = SANITY_SEED,
    progress=None,
) -> list[CascadeStep]:
    """Adebayo et al.'s cascading randomisation (NeurIPS 2018), as Quantus's MPRT runs it: from the top block down
    to the input, one more block re-initialised at each step (``torch.manual_seed(seed + 1)``, then
    ``reset_parameters()``, as :func:`camserve.cam.sanity.randomised_copy` does), and at each step each method's map
    at ``layer`` (the default layer) for the labelled class, compared with the trained model's by Spearman's rank
    correlation at the model input's size. The step at the block after the layer is what the served ``sanity``
    option reports; the steps below it randomise the layer's own activations too."""
    task = task_named(spec.task)
    layer = layer or spec.default_layer
    side = spec.input_size
    batches = [images[start : start + batch_size] for start in range(0, len(images), batch_size)]
    inputs = [images_to_batch([item.image for item in chunk], spec) for chunk in batches]

    def maps_of(network: torch.nn.Module, method: str) -> list[torch.Tensor]:
        engine = CamEngine(network, input_size=side, default_layer=spec.default_layer, head=task.head)
        found = []
        for chunk, batch in zip(batches, inputs, strict=True):
            requests = [CamRequest(Classes([item.label]), layer, method) for item in chunk]
            found += [at_input(cam, (side, side))[0] for cam in engine(batch, requests).maps]
        return found

    originals = {method: torch.stack(maps_of(model, method)) for method in methods}
    blocks = cascade_blocks(model)
    steps = []
    for depth in range(1, len(blocks) + 1):
        randomised = randomised_copy(model, blocks[:depth], seed)
        for method in methods:
            values = rank_correlation(originals[method], torch.stack(maps_of(randomised, method)))
            steps.append(CascadeStep(method, blocks[depth - 1], float(np.nanmean(values.numpy()))))
            if progress is not None:
                progress.update(len(images))
    return steps


def cascade_markdown(steps: list[CascadeStep]) -> str:
    """Methods as rows, the cascade's blocks as columns (top first): each cell the mean rank correlation."""
    blocks = list(dict.fromkeys(step.block for step in steps))
    methods = list(dict.fromkeys(step.method for step in steps))
    value = {(step.method, step.block): step.correlation for step in steps}
    lines = ["| method | " + " | ".join(f"→ `{block}`" for block in blocks) + " |"]
    lines.append("|---|" + "---:|" * len(blocks))
    for method in methods:
        lines.append(f"| `{method}` | " + " | ".join(f"{value[method, block]:.2f}" for block in blocks) + " |")
    return "\n".join(lines) + "\n"


def plot_cascade(steps: list[CascadeStep], path: Path, title: str) -> None:
    """Adebayo et al.'s figure: each method's rank correlation as the randomisation reaches down, block by block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(dict.fromkeys(step.block for step in steps))
    figure, axis = plt.subplots(figsize=(max(5.0, 0.5 * len(blocks) + 3), 3.6))
    for method in dict.fromkeys(step.method for step in steps):
        values = [next(s.correlation for s in steps if s.method == method and s.block == block) for block in blocks]
        axis.plot(range(len(blocks)), values, marker="o", label=method)
    axis.set_xticks(range(len(blocks)), blocks, rotation=45, ha="right", fontsize=8)
    axis.set_xlabel("randomised from the top down to")
    axis.set_ylabel("rank correlation with the trained map")
    axis.set_ylim(-1, 1.05)
    axis.axhline(0, color="#999999", linewidth=0.8)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower left")
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
