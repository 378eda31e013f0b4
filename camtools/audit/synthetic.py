"""The audit's acceptance case: ShapesNet trained with a planted shortcut (a corner tag decides one class), its
archive, and held-out images with the shapes' boxes, as a CSV and as class subfolders."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2

from camtools.synthetic import CLASSES, shortcut_samples, trained_shortcut_model

__all__ = ["shortcut_dataset"]


def shortcut_dataset(folder: Path, count: int = 90, seed: int = 7) -> tuple[Path, Path, Path, float]:
    """Train the shortcut model, build its archive, and write ``count`` held-out images into ``folder``: return the
    archive, ``boxes.csv`` (file, class, the shape's box), the folder of class subfolders, and the held-out
    accuracy."""
    from camtools.archive import build_archive

    folder.mkdir(parents=True, exist_ok=True)
    prepared, accuracy = trained_shortcut_model(folder / "model", progress=True)
    archive = build_archive(prepared, folder / "model_store")
    classes = folder / "images"
    lines = [("file", "class", "x0", "y0", "x1", "y1")]
    for n, sample in enumerate(shortcut_samples(count, seed)):
        name = CLASSES[sample.label]
        (classes / name).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(classes / name / f"{n:04d}.png"), cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR))
        lines.append((f"images/{name}/{n:04d}.png", name, *sample.box))
    with (folder / "boxes.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(lines)
    return archive, folder / "boxes.csv", classes, accuracy
