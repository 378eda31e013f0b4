"""The request options, declared once: each option's type and range, default, error text and documentation line.

Parsing is a loop over :data:`OPTIONS`; :class:`ExplainOptions` is made from them, and the README's options table
is generated from them (:func:`options_table`, checked by a test).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, make_dataclass

from camserve.api.readers import (
    MAX_LAYER_NAME,
    MAX_OPTION_TEXT,
    MAX_TARGETS,
    boolean,
    center_width,
    choice,
    embeddings,
    integer,
    layer_name,
    number,
    percentiles,
    references,
    sentences,
    shown,
    targets,
    text_of,
)
from camserve.cam import DEFAULT_METHOD, DETECTION_METHOD, METHODS, PYRAMID_METHOD
from camserve.errors import ClientError
from camserve.imaging import OUTPUT_FORMATS
from camserve.overlays import COLORMAPS, OVERLAYS
from camserve.settings import (
    DEFAULT_MAX_DETECTIONS,
    DEFAULT_SCORE_THRESHOLD,
    MAX_DETECTIONS,
    MAX_EMBEDDING_SIZE,
    MAX_OUTPUT_SIDE,
    MAX_PROMPT_CHARACTERS,
    MAX_PROMPTS,
    MAX_REFERENCES,
    MIN_OUTPUT_SIDE,
)

__all__ = [
    "DEFAULT_MAX_DETECTIONS",
    "DEFAULT_SCORE_THRESHOLD",
    "DEFAULT_TOPK",
    "OPTIONS",
    "OPTION_NAMES",
    "ExplainOptions",
    "Option",
    "options_table",
    "parse_options",
]

DEFAULT_TOPK = 5
MAX_TOPK = 20
MAX_EXPLAIN = 5


@dataclass(frozen=True)
class Option:
    """One request option."""

    name: str
    type: object
    """Its Python type in :class:`ExplainOptions`."""
    default: object
    accepted: str
    """What it accepts, in words: the error text is ``"<name> must be <accepted>, got <value>"``."""
    doc: str
    """Its documentation line (the README's options table)."""
    read: Callable[[object], object | None]
    """The value as given (JSON, or multipart text) to its parsed value; None when it is not accepted."""
    shown_default: str | None = None
    """The default as the docs show it, when its value alone would not say it."""
    longest: int = MAX_OPTION_TEXT
    """The longest value as text (a multipart field, a JSON string), refused before any parsing."""
    raw: bool = False
    """Its value is read as given, bytes included (an image file in a multipart field), not as UTF-8 text."""

    def read_given(self, value: object) -> object:
        """The value as a request gives it (JSON, or a multipart field's bytes) to its parsed value."""
        return self.parse(value if self.raw else text_of(self.name, value, self.longest))

    def parse(self, value: object) -> object:
        parsed = self.read(value)
        if parsed is None:
            raise ClientError("InvalidOption", f"{self.name} must be {self.accepted}, got {shown(value)}")
        return parsed


# --- The declarations ---

OPTIONS: tuple[Option, ...] = (
    Option(
        "topk",
        int | None,
        None,
        f"an integer from 1 to {MAX_TOPK}",
        f"How many predictions to return, 1–{MAX_TOPK}, at most the model's number of classes.",
        integer(1, MAX_TOPK),
        shown_default=f"{DEFAULT_TOPK} (or every class of a model with fewer)",
    ),
    Option(
        "target",
        tuple[int, ...] | None,
        None,
        f"a class index (0 to the model's number of classes - 1) or a list of at most {MAX_TARGETS} of them",
        "Class indices to explain, each with its own explanation: `281` or `[281, 282]`; of a segmenter, the "
        "segments of these classes.",
        targets,
        shown_default="the top `explain` predicted classes",
    ),
    Option(
        "prompts",
        tuple[str, ...] | None,
        None,
        f"a list of 1 to {MAX_PROMPTS} sentences of at most {MAX_PROMPT_CHARACTERS} characters each (in a multipart "
        'form, the list as JSON text: ["a photo of a cat", "a photo of a dog"])',
        f"A zero-shot model's sentences to score the image against, 1–{MAX_PROMPTS}; `target` names them by index "
        "([docs/zero-shot.md](docs/zero-shot.md)).",
        sentences(MAX_PROMPTS, MAX_PROMPT_CHARACTERS),
        shown_default="the archive's prompts",
        longest=MAX_PROMPTS * (MAX_PROMPT_CHARACTERS + 8),
    ),
    Option(
        "reference",
        tuple[bytes, ...] | None,
        None,
        f"an image file (a multipart field), its base64 text, or a JSON list of at most {MAX_REFERENCES} base64 images",
        "An embedding model's reference images: each gets its cosine similarity and an explanation of it "
        "([docs/zero-shot.md](docs/zero-shot.md#similarity)).",
        references(MAX_REFERENCES),
        shown_default="none",
        raw=True,
    ),
    Option(
        "reference_embedding",
        tuple[tuple[float, ...], ...] | None,
        None,
        f"a list of finite numbers of the model's embedding size, or a list of at most {MAX_REFERENCES} such lists",
        "An embedding model's reference embeddings, explained as reference images are.",
        embeddings(MAX_REFERENCES, MAX_EMBEDDING_SIZE),
        shown_default="none",
        longest=MAX_REFERENCES * MAX_EMBEDDING_SIZE * 32,
    ),
    Option(
        "return_embedding",
        bool,
        False,
        "true or false",
        "An embedding model's image embedding in the response, as `embedding`.",
        boolean,
    ),
    Option(
        "detection",
        tuple[int, ...] | None,
        None,
        f"a detection index (0 for the highest score) or a list of at most {MAX_TARGETS} of them",
        "A detector's detections to explain, by their index in `detections`: `0` or `[0, 2]`.",
        targets,
        shown_default="the top `explain` detections",
    ),
    Option(
        "score_threshold",
        float | None,
        None,
        "a number from 0 to 1",
        "A detector's lowest score of a detection returned, 0–1.",
        number(0.0, 1.0),
        shown_default=f"{DEFAULT_SCORE_THRESHOLD}",
    ),
    Option(
        "max_detections",
        int | None,
        None,
        f"an integer from 1 to {MAX_DETECTIONS}",
        f"A detector's most detections returned, the highest scores first, 1–{MAX_DETECTIONS}.",
        integer(1, MAX_DETECTIONS),
        shown_default=f"{DEFAULT_MAX_DETECTIONS}",
    ),
    Option(
        "explain",
        int | None,
        None,
        f"an integer from 1 to {MAX_EXPLAIN}",
        f"Without `target`: explain the N top predicted classes, 1–{MAX_EXPLAIN}; of a multi-label model, its "
        "positive classes, at most N (or its top one when none is positive); of a regression model, outputs 0 to N−1;"
        " of a detector, its N top detections; of a segmenter, its N largest segments that are not background.",
        integer(1, MAX_EXPLAIN),
        shown_default="1 (a multi-label model's: 5, a detector's: 3)",
    ),
    Option(
        "threshold",
        float | None,
        None,
        "a number from 0 to 1",
        "A multi-label model's probability from which a class is positive, 0–1.",
        number(0.0, 1.0),
        shown_default="the build's `--threshold` (0.5)",
    ),
    Option(
        "method",
        str | None,
        None,
        f"one of {', '.join(METHODS)}",
        "The CAM method: " + ", ".join(f"`{name}`" for name in METHODS) + " ([docs/methods.md](docs/methods.md)).",
        choice(tuple(METHODS)),
        shown_default=f"`{DEFAULT_METHOD}` (a detector's: `{DETECTION_METHOD}`, or `{PYRAMID_METHOD}` at a pyramid)",
    ),
    Option(
        "layer",
        str | None,
        None,
        f"a dotted module path of at most {MAX_LAYER_NAME} characters, such as layer4 or layer3.5.conv2",
        "The layer to explain, a dotted module path that the model's spec lists, such as `layer3.5.conv2`.",
        layer_name,
        shown_default="the model's default layer",
    ),
    Option("alpha", float, 0.5, "a number from 0 to 1", "Weight of the heatmap in the overlay, 0–1.", number(0.0, 1.0)),
    Option(
        "colormap",
        str,
        "jet",
        f"one of {', '.join(COLORMAPS)}",
        "An OpenCV colormap: " + ", ".join(COLORMAPS) + ".",
        choice(tuple(COLORMAPS)),
    ),
    Option(
        "format",
        str,
        "jpeg",
        f"one of {', '.join(OUTPUT_FORMATS)}",
        "The overlay's encoding: jpeg (or jpg), png or webp.",
        choice(tuple(OUTPUT_FORMATS), aliases={"jpg": "jpeg"}),
    ),
    Option("heatmap", bool, False, "true or false", "Also return the raw map as a 16-bit grayscale PNG.", boolean),
    Option(
        "max_side",
        int | None,
        None,
        f"an integer from {MIN_OUTPUT_SIDE} to {MAX_OUTPUT_SIDE}",
        f"The overlay's and heatmap's longer side at most, {MIN_OUTPUT_SIDE}–{MAX_OUTPUT_SIDE}, never larger than the "
        "image; a JPEG is rendered at its reduced decode scale when that is within 10% under it.",
        integer(MIN_OUTPUT_SIDE, MAX_OUTPUT_SIDE),
        shown_default="the server's cap (2048 unless built otherwise)",
    ),
    Option(
        "overlay",
        str,
        "heatmap",
        f"one of {', '.join(OVERLAYS)}",
        "How the map is drawn: heatmap (blended), outline (contour of the top `region`), mask (the photo where the "
        "map is high) or grayscale (the map over a grey copy).",
        choice(OVERLAYS),
    ),
    Option(
        "region",
        float,
        0.2,
        "a number from 0.01 to 0.99",
        "For `overlay: outline`, the share of the image inside the outline, 0.01–0.99.",
        number(0.01, 0.99),
    ),
    Option(
        "clip",
        tuple[float, float] | None,
        None,
        "two percentiles from 0 to 100, lower first, such as [62, 99.9]",
        "Clip the map to these percentiles before normalising, e.g. `[62, 99.9]`; the heatmap is clipped too.",
        percentiles,
        shown_default="no clipping",
    ),
    Option(
        "window",
        tuple[float, float] | None,
        None,
        "two numbers, the center and the width (at least 1) of a DICOM VOI window, such as [40, 400]",
        "A DICOM image's VOI window `[center, width]` in its modality units (CT: Hounsfield), instead of the file's "
        "own ([docs/medical.md](docs/medical.md)).",
        center_width,
        shown_default="the file's own window",
    ),
    Option(
        "eigen_smooth",
        bool,
        False,
        "true or false",
        "The first principal component of the channels' contributions instead of their sum; no extra pass.",
        boolean,
    ),
    Option(
        "aug_smooth",
        bool,
        False,
        "true or false",
        "Average the maps of the image flipped or not, times 0.9, 1 and 1.1 in brightness; 6 passes.",
        boolean,
    ),
    Option(
        "faithfulness",
        bool,
        False,
        "true or false",
        "Measure each explanation: deletion, insertion, drop, increase ([docs/faithfulness.md](docs/faithfulness.md))"
        "; 2·steps + 1 passes per explanation.",
        boolean,
    ),
    Option(
        "sanity",
        bool,
        False,
        "true or false",
        "Check each explanation against the model randomised after the layer: the maps' rank correlation, near 1 "
        "when the map does not depend on the model ([docs/methods.md](docs/methods.md#sanity)); one more pass of "
        "the model after the layer.",
        boolean,
    ),
    Option(
        "faithfulness_steps",
        int,
        16,
        "an integer from 4 to 64",
        "Steps of the deletion and insertion curves, 4–64.",
        integer(4, 64),
    ),
)
OPTION_NAMES = tuple(option.name for option in OPTIONS)
_BY_NAME = {option.name: option for option in OPTIONS}

ExplainOptions = make_dataclass(
    "ExplainOptions",
    [(option.name, option.type, option.default) for option in OPTIONS],
    frozen=True,
)
ExplainOptions.__module__ = __name__
ExplainOptions.__doc__ = "The request options, made from :data:`OPTIONS`: every one optional, with these defaults."


def parse_options(raw: Mapping[str, object]) -> ExplainOptions:
    """Validate options given as JSON values or as multipart text; every bad value gets its own message."""
    unknown = sorted(set(raw) - set(OPTION_NAMES))
    if unknown:
        raise ClientError(
            "UnknownOption",
            f"unknown option(s) {', '.join(map(shown, unknown[:5]))}; known options are {', '.join(OPTION_NAMES)}",
        )
    for chosen, what in (("target", "classes"), ("detection", "detections")):
        if chosen in raw and "explain" in raw:
            raise ClientError("InvalidOption", f"give either {chosen} ({what} to explain) or explain (top N), not both")
    return ExplainOptions(**{name: _BY_NAME[name].read_given(value) for name, value in raw.items()})


def options_table() -> str:
    """The README's options table, from the declarations."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for option in OPTIONS:
        default = option.shown_default or f"`{json.dumps(option.default)}`"
        rows.append(f"| `{option.name}` | {default} | {option.doc} |")
    return "\n".join(rows)
