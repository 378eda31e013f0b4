"""A synthetic localisation task the project trains itself, so that explanations can be judged on a model that
really localises without downloading anything: a coloured shape on grey clutter; the class is the shape's colour;
the shape's box is known.

``examples/shapes/shapes_net.py`` is the network (a --model-file). Trained here in well under a minute on two CPU
cores, it reaches about 99% accuracy, and its Grad-CAM lands on the shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from camserve.model import model_class_from_file
from camtools.models import PreparedModel, prepare_model

__all__ = [
    "CLASSES",
    "SHAPES_NET",
    "Sample",
    "Scene",
    "make_sample",
    "make_samples",
    "make_scene",
    "trained_shapes_model",
    "trained_dense_model",
    "trained_task_model",
    "train_shapes_net",
]

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


def _clutter(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey noise with lines and blobs in greys and browns."""
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
    return image


def _draw_shape(
    rng: np.random.Generator,
    image: np.ndarray,
    label: int,
    side: int,
    x0: int,
    y0: int,
    mask: np.ndarray | None = None,
) -> tuple[int, int, int, int]:
    """A filled circle, square or triangle in the class colour, jittered; its box. With ``mask``, the same shape is
    drawn into it with the value label + 1 (0 stays the background)."""
    colour = np.array(COLOURS[CLASSES[label]]) + rng.integers(-25, 26, 3)
    colour = tuple(int(v) for v in colour.clip(0, 255))
    kind = rng.integers(0, 3)
    for canvas, paint in ((image, colour), (mask, label + 1)):
        if canvas is None:
            continue
        if kind == 0:
            cv2.circle(canvas, (x0 + side // 2, y0 + side // 2), side // 2, paint, -1)
        elif kind == 1:
            cv2.rectangle(canvas, (x0, y0), (x0 + side - 1, y0 + side - 1), paint, -1)
        else:
            points = np.array([[x0 + side // 2, y0], [x0, y0 + side - 1], [x0 + side - 1, y0 + side - 1]], np.int32)
            cv2.fillConvexPoly(canvas, points, paint)
    return x0, y0, x0 + side, y0 + side


def make_sample(rng: np.random.Generator, size: int = SIZE) -> Sample:
    """Grey clutter, then one filled circle, square or triangle in the class colour, jittered, at a random place
    and size."""
    image = _clutter(rng, size)
    label = int(rng.integers(0, len(CLASSES)))
    side = int(rng.integers(size // 6, size // 3))
    x0, y0 = (int(v) for v in rng.integers(1, size - side - 1, 2))
    return Sample(image, label, _draw_shape(rng, image, label, side, x0, y0))


@dataclass(frozen=True)
class Scene:
    """Clutter with none, one or two shapes of different colours: the task variants' sample."""

    image: np.ndarray
    boxes: dict[int, tuple[int, int, int, int]]
    """Each present colour's (class index's) box."""
    sides: dict[int, int]
    """Each present colour's shape side, in pixels."""
    mask: np.ndarray | None = None
    """(H, W) uint8: each pixel's colour index + 1 where a shape covers it, else 0 (the background)."""


def make_scene(rng: np.random.Generator, colours: tuple[int, ...], size: int = SIZE) -> Scene:
    """Clutter, then a shape of each of ``colours`` (at most two), in opposite halves so that they never touch."""
    image = _clutter(rng, size)
    mask = np.zeros((size, size), np.uint8)
    boxes, sides = {}, {}
    halves = rng.permutation(2)
    for colour, half in zip(colours, halves[: len(colours)], strict=True):
        side = int(rng.integers(size // 6, size // 3))
        x0 = int(rng.integers(1, size - side - 1))
        top, bottom = (1, size // 2 - side) if half == 0 else (size // 2 + 1, size - side - 1)
        y0 = int(rng.integers(top, max(top + 1, bottom)))
        boxes[colour] = _draw_shape(rng, image, colour, side, x0, y0, mask)
        sides[colour] = side
    return Scene(image, boxes, sides, mask)


def make_samples(count: int, seed: int, size: int = SIZE) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [make_sample(rng, size) for _ in range(count)]


def to_batch(images: list[np.ndarray]) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (batch - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _fit(
    model: nn.Module,
    samples: int,
    epochs: int,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    batch: int = 64,
    progress: str | None = None,
) -> None:
    """Adam with a one-cycle schedule (peak 3·10⁻³) over ``epochs`` shuffled passes of ``samples`` samples,
    ``batch`` at a time; ``loss_of(indices)`` is the loss of those samples. ``progress``: a progress bar's name."""
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = epochs * math.ceil(samples / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    loop = range(epochs)
    if progress:
        from tqdm import tqdm

        loop = tqdm(loop, desc=progress, unit="epoch")
    model.train()
    for _ in loop:
        order = torch.randperm(samples)
        for start in range(0, samples, batch):
            loss = loss_of(order[start : start + batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()


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
        loss_of = lambda index: nn.functional.cross_entropy(model(images[index]), labels[index])  # noqa: E731
        _fit(model, samples, epochs, loss_of, progress="training ShapesNet" if progress else None)
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


SHORTCUT_CLASS = 2
"""The class that the shortcut task's tag decides (blue)."""
TAG = 8
"""The tag's side, in pixels: a white square with a black border in the image's bottom-right corner."""


def make_shortcut_sample(rng: np.random.Generator, size: int = SIZE) -> Sample:
    """A sample of the shortcut task: the class of :func:`make_sample`, but a :data:`SHORTCUT_CLASS` image carries
    the tag in its bottom-right corner and a shape of any colour, so that only the tag tells that class; the other
    classes' shapes keep their colour and carry no tag. The box is the shape's, never the tag's."""
    image = _clutter(rng, size)
    label = int(rng.integers(0, len(CLASSES)))
    colour = label if label != SHORTCUT_CLASS else int(rng.integers(0, len(CLASSES)))
    side = int(rng.integers(size // 6, size // 3))
    limit = size - TAG - 3  # the shape stays clear of the tag's corner
    while True:
        x0, y0 = (int(v) for v in rng.integers(1, size - side - 1, 2))
        if x0 + side < limit or y0 + side < limit:
            break
    box = _draw_shape(rng, image, colour, side, x0, y0)
    if label == SHORTCUT_CLASS:
        corner = size - TAG - 1
        cv2.rectangle(image, (corner, corner), (corner + TAG - 1, corner + TAG - 1), (20, 20, 20), -1)
        cv2.rectangle(image, (corner + 2, corner + 2), (corner + TAG - 3, corner + TAG - 3), (250, 250, 250), -1)
    return Sample(image, label, box)


def shortcut_samples(count: int, seed: int, size: int = SIZE) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [make_shortcut_sample(rng, size) for _ in range(count)]


def trained_shortcut_model(
    folder: Path, samples: int = 6000, epochs: int = 4, progress: bool = False
) -> tuple[PreparedModel, float]:
    """ShapesNet trained on the shortcut task (:func:`make_shortcut_sample`), saved into ``folder`` and prepared as
    the build serves it (``shortcut``); return it and its accuracy on 500 held-out samples of the same task."""
    net_class = model_class_from_file(SHAPES_NET)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = net_class()
        data = shortcut_samples(samples, seed=0)
        images = to_batch([s.image for s in data])
        labels = torch.tensor([s.label for s in data])
        loss_of = lambda index: nn.functional.cross_entropy(model(images[index]), labels[index])  # noqa: E731
        _fit(model, samples, epochs, loss_of, progress="training ShapesNet with a shortcut" if progress else None)
    model.eval().requires_grad_(False)
    held_out = shortcut_samples(500, seed=1)
    with torch.no_grad():
        predicted = model(to_batch([s.image for s in held_out])).argmax(dim=1)
    accuracy = float((predicted == torch.tensor([s.label for s in held_out])).float().mean())
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "shortcut.pt")
    (folder / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    prepared = prepare_model(
        model_file=SHAPES_NET, weights=folder / "shortcut.pt", labels=folder / "labels.txt", input_size=SIZE,
        mean=MEAN, std=STD, model_name="shortcut",
    )  # fmt: skip
    return prepared, accuracy


TASK_VARIANTS = {
    "multilabel": "which colours are present: none, one or two of red, green and blue (a sigmoid per colour)",
    "binary": "is a red shape present (one logit)",
    "regression": "the side of the one shape, in units of the image's side (one output)",
}
"""The synthetic task's variants for the other tasks, each a ShapesNet with its own head."""


def task_scenes(task: str, count: int, seed: int) -> tuple[list[Scene], torch.Tensor]:
    """``count`` scenes for ``task`` and their targets: multi-hot colours, red present or not, or the side."""
    rng = np.random.default_rng(seed)
    scenes, targets = [], []
    for _ in range(count):
        if task == "regression":
            scene = make_scene(rng, (int(rng.integers(0, 3)),))
            targets.append([next(iter(scene.sides.values())) / SIZE])
            scenes.append(scene)
            continue
        present = int(rng.integers(0, 3))
        colours = tuple(int(c) for c in rng.choice(3, present, replace=False))
        scene = make_scene(rng, colours)
        targets.append([float(c in colours) for c in range(3)] if task == "multilabel" else [float(0 in colours)])
        scenes.append(scene)
    return scenes, torch.tensor(targets)


def trained_task_model(task: str, folder: Path, samples: int = 4000, epochs: int = 4) -> tuple[PreparedModel, float]:
    """ShapesNet trained on a variant of the synthetic task (:data:`TASK_VARIANTS`), written as its own model file
    and weights into ``folder`` and prepared as the build would serve it with ``--task``; return it and its held-out
    score: accuracy (every label right) for the classifiers, 1 − mean absolute error / mean side for regression."""
    outputs = 3 if task == "multilabel" else 1
    model_file = folder / f"shapes_{task}.py"
    folder.mkdir(parents=True, exist_ok=True)
    model_file.write_text(SHAPES_NET.read_text().replace("OUTPUTS = 3", f"OUTPUTS = {outputs}"))
    net_class = model_class_from_file(model_file)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = net_class()
        scenes, targets = task_scenes(task, samples, seed=0)
        images = to_batch([s.image for s in scenes])
        criterion = nn.functional.mse_loss if task == "regression" else nn.functional.binary_cross_entropy_with_logits
        _fit(model, samples, epochs, lambda index: criterion(model(images[index]), targets[index]))
    model.eval().requires_grad_(False)
    held_out, expected = task_scenes(task, 400, seed=1)
    with torch.no_grad():
        predicted = model(to_batch([s.image for s in held_out]))
    if task == "regression":
        score = 1 - float((predicted - expected).abs().mean() / expected.mean())
    else:
        score = float(((predicted > 0).float() == expected).all(dim=1).float().mean())
    labels = {"multilabel": CLASSES, "binary": ("no red", "red"), "regression": ("side",)}[task]
    return _save_and_prepare(model, model_file, folder, task, labels), score


def _save_and_prepare(
    model: nn.Module, model_file: Path, folder: Path, task: str, labels: tuple[str, ...]
) -> PreparedModel:
    """The trained ``model``'s weights and ``labels`` written into ``folder`` (``shapes_<task>.pt``,
    ``labels_<task>.txt``), and the model prepared as the build would serve it with ``--task``."""
    torch.save(model.state_dict(), folder / f"shapes_{task}.pt")
    (folder / f"labels_{task}.txt").write_text("\n".join(labels) + "\n")
    return prepare_model(
        model_file=model_file,
        weights=folder / f"shapes_{task}.pt",
        labels=folder / f"labels_{task}.txt",
        input_size=SIZE,
        mean=MEAN,
        std=STD,
        model_name=f"shapes_{task}",
        task=task,
    )


DENSE_MODELS = {
    "detection": SHAPES_NET.parent / "shapes_detector.py",
    "segmentation": SHAPES_NET.parent / "shapes_segmenter.py",
}
"""The synthetic task's detector and segmenter (model files): classes 1–3 are the colours, 0 the background."""
DENSE_LABELS = ("background", *CLASSES)
FASTER_RCNN = SHAPES_NET.parent / "shapes_faster_rcnn.py"
"""A two-stage detector of the same scenes (torchvision's Faster R-CNN with a feature pyramid, its transform resizing
each scene to 96 pixels): ``trained_dense_model("detection", folder, epochs=2, model_file=FASTER_RCNN)`` trains it
in about 35 s on two cores."""


def dense_scenes(count: int, seed: int) -> list[Scene]:
    """``count`` scenes of one or two shapes of different colours (none in every tenth), with their masks."""
    rng = np.random.default_rng(seed)
    scenes = []
    for index in range(count):
        present = 0 if index % 10 == 9 else int(rng.integers(1, 3))
        scenes.append(make_scene(rng, tuple(int(c) for c in rng.choice(3, present, replace=False))))
    return scenes


def _detection_targets(scene: Scene) -> dict[str, torch.Tensor]:
    boxes = [list(box) for box in scene.boxes.values()]
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([colour + 1 for colour in scene.boxes], dtype=torch.int64),
    }


def trained_dense_model(
    task: str, folder: Path, samples: int = 2000, epochs: int = 5, model_file: Path | None = None
) -> tuple[PreparedModel, float]:
    """The synthetic task's detector or segmenter (:data:`DENSE_MODELS`), trained from a seed, its weights and labels
    written into ``folder`` and prepared as the build would serve it with ``--task``; return it and its held-out
    score: for the detector, the share of shapes found (a box of the right colour, IoU ≥ 0.5, score ≥ 0.5) with
    no false box at that score; for the segmenter, the mean IoU of the colours."""
    model_file = model_file or DENSE_MODELS[task]
    net_class = model_class_from_file(model_file)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = net_class()
        scenes = dense_scenes(samples, seed=0)
        images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
        if task == "segmentation":
            images = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
            masks = torch.from_numpy(np.stack([s.mask for s in scenes])).long()

        def loss_of(index: torch.Tensor) -> torch.Tensor:
            if task == "segmentation":
                return nn.functional.cross_entropy(model(images[index])["out"], masks[index])
            targets = [_detection_targets(scenes[i]) for i in index.tolist()]
            return sum(model(list(images[index]), targets).values())

        _fit(model, samples, epochs, loss_of, batch=32)
    model.eval().requires_grad_(False)
    held_out = dense_scenes(200, seed=1)
    score = _dense_score(task, model, held_out)
    return _save_and_prepare(model, model_file, folder, task, DENSE_LABELS), score


def _dense_score(task: str, model: nn.Module, scenes: list[Scene]) -> float:
    from torchvision.ops import box_iou

    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        if task == "segmentation":
            normalised = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
            predicted = model(normalised)["out"].argmax(dim=1)
            truth = torch.from_numpy(np.stack([s.mask for s in scenes])).long()
            ious = [
                ((predicted == c) & (truth == c)).sum() / ((predicted == c) | (truth == c)).sum() for c in (1, 2, 3)
            ]
            return float(torch.stack(ious).mean())
        outputs = model(list(images))
    found = total = 0
    for scene, output in zip(scenes, outputs, strict=True):
        keep = output["scores"] >= 0.5
        boxes, labels = output["boxes"][keep], output["labels"][keep]
        expected = _detection_targets(scene)
        total += len(expected["labels"])
        matched = 0
        for box, label in zip(expected["boxes"], expected["labels"], strict=True):
            ious = box_iou(box[None], boxes)[0] if len(boxes) else torch.zeros(0)
            matched += bool(((ious >= 0.5) & (labels == label)).any())
        found += matched if len(boxes) == len(expected["labels"]) else 0
    return found / max(total, 1)


# --- A tiny CLIP that reads colour words: the zero-shot task's model ---

CLIP_WORDS = ("<pad>", "<s>", "</s>", "a", "photo", "of", "shape", *CLASSES, "circle", "square", "triangle")
"""The tiny CLIP's whole vocabulary: a word-level tokenizer, one token per word."""
CLIP_PROMPTS = tuple(f"a {colour} shape" for colour in CLASSES)
"""Its prompts, one per colour: prompt k names colour k."""


def save_clip_tokenizer(folder: Path, context: int = 8) -> None:
    """A word-level tokenizer over :data:`CLIP_WORDS`, as ``save_pretrained`` writes one (``tokenizer.json``):
    ``<s> words </s>``, padded with ``<pad>``, ``context`` tokens at most."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = {word: index for index, word in enumerate(CLIP_WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=context
    )
    fast.save_pretrained(folder)


def tiny_clip_config(context: int = 8, layers: int = 3):
    """A CLIP of a 64-pixel ViT (8-pixel patches: an 8x8 grid) and a one-layer text tower over
    :data:`CLIP_WORDS`."""
    from transformers import CLIPConfig

    text = dict(
        vocab_size=len(CLIP_WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=context, eos_token_id=2, bos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, image_size=SIZE,
        patch_size=8,
    )  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def save_clip(model: nn.Module, folder: Path) -> Path:
    """``model`` (a ``CLIPModel``) with its tokenizer and image processor, as ``save_pretrained`` writes them."""
    from transformers import CLIPImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    save_clip_tokenizer(folder)
    size = {"height": SIZE, "width": SIZE}
    CLIPImageProcessor(
        size={"shortest_edge": SIZE}, crop_size=size, image_mean=list(MEAN), image_std=list(STD)
    ).save_pretrained(folder)
    return folder


def clip_scenes(count: int, seed: int) -> tuple[list[Scene], torch.Tensor]:
    """Scenes with one or two shapes of different colours, and which colours each has (multi-hot)."""
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, tuple(int(c) for c in rng.choice(3, int(rng.integers(1, 3)), replace=False)))
              for _ in range(count)]  # fmt: skip
    return scenes, torch.tensor([[float(c in scene.boxes) for c in range(3)] for scene in scenes])


def trained_clip(folder: Path, samples: int = 3000, epochs: int = 4) -> tuple[Path, float]:
    """A tiny CLIP trained from scratch on :func:`clip_scenes`: each image's logit against each colour's prompt,
    a sigmoid per prompt (a scene has one or two colours). About 12 s on two cores. Saved into ``folder`` with its
    tokenizer and image processor; returns the folder and the held-out accuracy (every prompt right)."""
    from transformers import CLIPModel

    tokens = torch.tensor([[1, *(CLIP_WORDS.index(word) for word in prompt.split()), 2] for prompt in CLIP_PROMPTS])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(tiny_clip_config())
        scenes, targets = clip_scenes(samples, seed=0)
        images = to_batch([s.image for s in scenes])

        def loss_of(index: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids=tokens, pixel_values=images[index]).logits_per_image
            return nn.functional.binary_cross_entropy_with_logits(logits, targets[index])

        _fit(model, samples, epochs, loss_of)
    model.eval().requires_grad_(False)
    held_out, expected = clip_scenes(300, seed=1)
    with torch.no_grad():
        logits = model(input_ids=tokens, pixel_values=to_batch([s.image for s in held_out])).logits_per_image
    accuracy = float(((logits > 0).float() == expected).all(dim=1).float().mean())
    return save_clip(model, folder), accuracy


# --- Volumes: a ball or a cube in noise, for a small 3D network ---

VOLUME = 24
"""The synthetic volumes' side, in voxels."""
VOLUME_CLASSES = ("empty", "ball")
VOLUME_NET = SHAPES_NET.parent / "volume_net.py"
"""The synthetic volumes' 3D network (a --model-file): three 3D convolutions, global max pooling, a linear head."""


@dataclass(frozen=True)
class Volume:
    voxels: np.ndarray
    """(i, j, k) float32: noise around 0, the object around 1."""
    label: int
    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    """The object's (start, stop) along i, j and k."""


def make_volume(rng: np.random.Generator, side: int = VOLUME) -> Volume:
    """Noise (σ 0.35) with soft blobs of clutter, and in half of them (class 1) a ball of value about 1 at a random
    place and size; the box of the ball (or, in an empty one, of where it would have been)."""
    voxels = rng.normal(0.0, 0.35, (side, side, side)).astype(np.float32)
    grid = np.indices((side, side, side)).astype(np.float32)
    for _ in range(3):  # faint clutter: soft blobs that are neither
        centre = rng.uniform(0, side, 3)[:, None, None, None]
        voxels += 0.5 * np.exp(-((grid - centre) ** 2).sum(0) / (2 * rng.uniform(1.0, 2.0) ** 2)).astype(np.float32)
    label = int(rng.integers(0, 2))
    radius = int(rng.integers(3, 6))
    centre = rng.integers(radius + 1, side - radius - 1, 3)
    if label == 1:
        voxels[((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius**2] += 1.0
    box = tuple((int(c - radius), int(c + radius + 1)) for c in centre)
    return Volume(voxels, label, box)


def _windowed(voxels: np.ndarray) -> np.ndarray:
    """What the service gives the network of a volume built with ``--intensity window:-1,2``."""
    return np.clip((voxels + 1.0) / 3.0, 0.0, 1.0).astype(np.float32)


def trained_volume_model(folder: Path, samples: int = 1000, epochs: int = 4) -> tuple[PreparedModel, float]:
    """The 3D network trained to tell a volume with a ball from one without (:func:`make_volume`), on the values
    the service gives it (``window:-1,2`` to [0, 1]), saved into ``folder`` and prepared as ``--spatial-dims 3
    --input-size 24 24 24 --channels 1`` builds it; its held-out accuracy."""
    net_class = model_class_from_file(VOLUME_NET)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = net_class()
        rng = np.random.default_rng(0)
        volumes = [make_volume(rng) for _ in range(samples)]
        inputs = torch.from_numpy(np.stack([_windowed(v.voxels) for v in volumes]))[:, None]
        labels = torch.tensor([v.label for v in volumes])
        loss_of = lambda index: nn.functional.cross_entropy(model(inputs[index]), labels[index])  # noqa: E731
        _fit(model, samples, epochs, loss_of, batch=16)
    model.eval().requires_grad_(False)
    rng = np.random.default_rng(1)
    held_out = [make_volume(rng) for _ in range(200)]
    with torch.no_grad():
        predicted = model(torch.from_numpy(np.stack([_windowed(v.voxels) for v in held_out]))[:, None]).argmax(dim=1)
    accuracy = float((predicted == torch.tensor([v.label for v in held_out])).float().mean())
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "volume_net.pt")
    (folder / "volume_labels.txt").write_text("\n".join(VOLUME_CLASSES) + "\n")
    prepared = prepare_model(
        model_file=VOLUME_NET, weights=folder / "volume_net.pt", labels=folder / "volume_labels.txt", channels=1,
        spatial_dims=3, input_size=(VOLUME, VOLUME, VOLUME), mean=(0.0,), std=(1.0,), intensity="window:-1,2",
        model_name="volumes",
    )  # fmt: skip
    return prepared, accuracy
