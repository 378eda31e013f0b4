"""A synthetic localisation task the project trains itself, so that explanations can be judged on a model that
really localises without downloading anything: a coloured shape on grey clutter; the class is the shape's colour;
the shape's box is known.

``examples/shapes/shapes_net.py`` is the network (a --model-file). Trained here in well under a minute on two CPU
cores, it reaches about 99% accuracy, and its Grad-CAM lands on the shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from camserve.model import model_class_from_file
from camtools.models import PreparedModel, prepare_model

__all__ = ["CLASSES", "SHAPES_NET", "Sample", "make_sample", "make_samples", "trained_shapes_model", "train_shapes_net"]

SHAPES_NET = Path(__file__).resolve().parent.parent / "examples" / "shapes" / "shapes_net.py"
CLASSES = ("red", "green", "blue")
COLOURS = {"red": (215, 45, 40), "green": (45, 170, 60), "blue": (45, 80, 215)}
SIZE = 64
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class Sample:
    image: np.ndarray
    """(H, W, 3) uint8 RGB."""
    label: int
    box: tuple[int, int, int, int]
    """The shape's (x0, y0, x1, y1), inclusive-exclusive pixels."""


def make_sample(rng: np.random.Generator, size: int = SIZE) -> Sample:
    """Grey clutter (noise, lines and blobs in greys and browns), then one filled circle, square or triangle in
    the class colour, jittered, at a random place and size."""
    grey = int(rng.integers(90, 166)) + rng.integers(-25, 26, (size, size, 1))
    image = np.repeat(grey, 3, axis=2).clip(0, 255).astype(np.uint8)
    for _ in range(rng.integers(4, 9)):
        grey = int(rng.integers(40, 220))
        tint = rng.integers(-20, 21, 3)
        colour = tuple(int(v) for v in np.clip(grey + tint * np.array([1, 0.6, 0.2]), 0, 255))
        if rng.random() < 0.5:
            p0 = tuple(int(v) for v in rng.integers(0, size, 2))
            p1 = tuple(int(v) for v in rng.integers(0, size, 2))
            cv2.line(image, p0, p1, colour, int(rng.integers(1, 4)))
        else:
            centre = tuple(int(v) for v in rng.integers(0, size, 2))
            axes = tuple(int(v) for v in rng.integers(3, 10, 2))
            cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    label = int(rng.integers(0, len(CLASSES)))
    colour = np.array(COLOURS[CLASSES[label]]) + rng.integers(-25, 26, 3)
    colour = tuple(int(v) for v in colour.clip(0, 255))
    side = int(rng.integers(size // 6, size // 3))
    x0, y0 = (int(v) for v in rng.integers(1, size - side - 1, 2))
    kind = rng.integers(0, 3)
    if kind == 0:
        cv2.circle(image, (x0 + side // 2, y0 + side // 2), side // 2, colour, -1)
    elif kind == 1:
        cv2.rectangle(image, (x0, y0), (x0 + side - 1, y0 + side - 1), colour, -1)
    else:
        points = np.array([[x0 + side // 2, y0], [x0, y0 + side - 1], [x0 + side - 1, y0 + side - 1]], np.int32)
        cv2.fillConvexPoly(image, points, colour)
    return Sample(image, label, (x0, y0, x0 + side, y0 + side))


def make_samples(count: int, seed: int, size: int = SIZE) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [make_sample(rng, size) for _ in range(count)]


def to_batch(images: list[np.ndarray]) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (batch - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def train_shapes_net(
    samples: int = 6000, epochs: int = 4, seed: int = 0, progress: bool = False
) -> tuple[nn.Module, float]:
    """Train ``ShapesNet`` on fresh synthetic samples; return it (eval mode) and its accuracy on 500 held-out ones."""
    net_class = model_class_from_file(SHAPES_NET)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = net_class()
        data = make_samples(samples, seed)
        images = to_batch([s.image for s in data])
        labels = torch.tensor([s.label for s in data])
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        steps = epochs * math.ceil(samples / 64)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
        loop = range(epochs)
        if progress:
            from tqdm import tqdm

            loop = tqdm(loop, desc="training ShapesNet", unit="epoch")
        model.train()
        for _ in loop:
            order = torch.randperm(samples)
            for start in range(0, samples, 64):
                index = order[start : start + 64]
                loss = nn.functional.cross_entropy(model(images[index]), labels[index])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
    model.eval().requires_grad_(False)
    held_out = make_samples(500, seed + 1)
    with torch.no_grad():
        predicted = model(to_batch([s.image for s in held_out])).argmax(dim=1)
    accuracy = float((predicted == torch.tensor([s.label for s in held_out])).float().mean())
    return model, accuracy


def trained_shapes_model(folder: Path, progress: bool = False) -> tuple[PreparedModel, float]:
    """Train ShapesNet, save its weights and labels into ``folder``, and prepare it as the build would serve it
    (``--model-file``, 64-pixel input, its own normalisation); return it and its held-out accuracy."""
    model, accuracy = train_shapes_net(progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "shapes_net.pt")
    (folder / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    prepared = prepare_model(
        model_file=SHAPES_NET,
        weights=folder / "shapes_net.pt",
        labels=folder / "labels.txt",
        input_size=SIZE,
        mean=MEAN,
        std=STD,
        model_name="shapes",
    )
    return prepared, accuracy
