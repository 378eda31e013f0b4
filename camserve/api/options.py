"""The request options, declared once: each option's type and range, default, error text and documentation line.

Parsing is a loop over :data:`OPTIONS`; :class:`ExplainOptions` is made from them, and the README's options table
is generated from them (:func:`options_table`, checked by a test).
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, make_dataclass

from camserve.cam import DEFAULT_METHOD, DETECTION_METHOD, METHODS, PYRAMID_METHOD
from camserve.errors import ClientError
from camserve.imaging import COLORMAPS, OUTPUT_FORMATS, OVERLAYS

__all__ = [
    "DEFAULT_MAX_DETECTIONS",
    "DEFAULT_SCORE_THRESHOLD",
    "DEFAULT_TOPK",
    "OPTIONS",
    "OPTION_NAMES",
    "ExplainOptions",
    "Option",
    "check_fit",
    "load_json",
    "options_table",
    "parse_options",
    "shown",
]

DEFAULT_TOPK = 5
MAX_TOPK = 20
DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_MAX_DETECTIONS, MAX_DETECTIONS = 20, 100
MAX_TARGETS = 10
MAX_EXPLAIN = 5
MIN_SIDE, MAX_SIDE = 16, 16384
MAX_LAYER_NAME = 200
MAX_OPTION_TEXT = 1000
"""Option values longer than this (as text) are refused before any parsing."""
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


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
    fits: tuple[str, ...] | None = None
    """The kinds of task (``camserve.tasks``: classification, detection, segmentation) or the tasks (multilabel, ...)
    it fits; None: every one. A request that gives it another value than its default for a model it does not fit
    gets a 400."""

    def parse(self, value: object) -> object:
        parsed = self.read(value)
        if parsed is None:
            raise ClientError("InvalidOption", f"{self.name} must be {self.accepted}, got {shown(value)}")
        return parsed


# --- Readers: a value as JSON or multipart text gives it, to the option's value, or None ---


def _as_int(value: object) -> int | None:
    """An integer, or an integral float, or ASCII digits with at most one sign; anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _as_float(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return float(value.strip())
    return None


def integer(low: int, high: int) -> Callable[[object], int | None]:
    def read(value: object) -> int | None:
        number = _as_int(value)
        return number if number is not None and low <= number <= high else None

    return read


def number(low: float, high: float) -> Callable[[object], float | None]:
    def read(value: object) -> float | None:
        parsed = _as_float(value)
        return parsed if parsed is not None and low <= parsed <= high else None  # NaN fails both comparisons

    return read


def choice(choices: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> Callable[[object], str | None]:
    def read(value: object) -> str | None:
        if not isinstance(value, str):
            return None
        value = (aliases or {}).get(value.lower(), value.lower())
        return value if value in choices else None

    return read


def boolean(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    return None


def targets(value: object) -> tuple[int, ...] | None:
    """One index or a list of them: a JSON list, or text ``281``, ``281,282`` or ``[281, 282]``."""
    items = value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                items = load_json(text, "target")
            except ClientError:
                return None
        else:
            items = text.split(",") if "," in text else text
    if not isinstance(items, list):
        items = [items]
    if not items or len(items) > MAX_TARGETS:
        return None
    indices = [_as_int(item) for item in items]
    return None if any(i is None or i < 0 for i in indices) else tuple(indices)


def layer_name(value: object) -> str | None:
    """A dotted module path; whether the model has that layer is checked where the model is known."""
    valid = isinstance(value, str) and len(value) <= MAX_LAYER_NAME and _LAYER_NAME.fullmatch(value) is not None
    return value if valid else None


def percentiles(value: object) -> tuple[float, float] | None:
    """Two percentiles, low < high, each 0–100: a JSON list, or text ``62,99.9`` or ``[62, 99.9]``."""
    items = value
    if isinstance(value, str):
        text = value.strip()
        items = text[1:-1].split(",") if text.startswith("[") and text.endswith("]") else text.split(",")
    if not isinstance(items, (list, tuple)) or len(items) != 2:
        return None
    low, high = (number(0.0, 100.0)(item.strip() if isinstance(item, str) else item) for item in items)
    return (low, high) if low is not None and high is not None and low < high else None


_LAYER_PART = r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)"
_LAYER_NAME = re.compile(rf"{_LAYER_PART}(?:\.{_LAYER_PART})*")
_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]{1,40}(?:\.[0-9]{0,40})?|\.[0-9]{1,40})(?:[eE][+-]?[0-9]{1,4})?")


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
        fits=("classification",),
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
        fits=("classification", "segmentation"),
    ),
    Option(
        "detection",
        tuple[int, ...] | None,
        None,
        f"a detection index (0 for the highest score) or a list of at most {MAX_TARGETS} of them",
        "A detector's detections to explain, by their index in `detections`: `0` or `[0, 2]`.",
        targets,
        shown_default="the top `explain` detections",
        fits=("detection",),
    ),
    Option(
        "score_threshold",
        float | None,
        None,
        "a number from 0 to 1",
        "A detector's lowest score of a detection returned, 0–1.",
        number(0.0, 1.0),
        shown_default=f"{DEFAULT_SCORE_THRESHOLD}",
        fits=("detection",),
    ),
    Option(
        "max_detections",
        int | None,
        None,
        f"an integer from 1 to {MAX_DETECTIONS}",
        f"A detector's most detections returned, the highest scores first, 1–{MAX_DETECTIONS}.",
        integer(1, MAX_DETECTIONS),
        shown_default=f"{DEFAULT_MAX_DETECTIONS}",
        fits=("detection",),
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
        fits=("multilabel",),
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
        f"an integer from {MIN_SIDE} to {MAX_SIDE}",
        f"The overlay's and heatmap's longer side at most, {MIN_SIDE}–{MAX_SIDE}, never larger than the image; a JPEG "
        "is rendered at its reduced decode scale when that is within 10% under it.",
        integer(MIN_SIDE, MAX_SIDE),
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
        fits=("classification", "segmentation"),
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
        fits=("classification",),
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
    return ExplainOptions(**{name: _BY_NAME[name].parse(_text(name, value)) for name, value in raw.items()})


def check_fit(options: ExplainOptions, kind: str, task: str) -> None:
    """Refuse an option given for a model of a kind of task that it does not fit, naming those it fits."""
    for option in OPTIONS:
        fits_this = option.fits is None or kind in option.fits or task in option.fits
        if not fits_this and getattr(options, option.name) != option.default:
            fits = " and ".join(f"{fit} models" for fit in option.fits)
            raise ClientError(
                "InvalidOption", f"option {option.name} fits only {fits}; this model is a {task} model: leave it out"
            )


def options_table() -> str:
    """The README's options table, from the declarations."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for option in OPTIONS:
        default = option.shown_default or f"`{json.dumps(option.default)}`"
        rows.append(f"| `{option.name}` | {default} | {option.doc} |")
    return "\n".join(rows)


# --- Values as text, and JSON hardening ---

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 60, 60, 6, 6


def shown(value: object) -> str:
    """A value as an error message quotes it: short, whatever its size or depth."""
    return _REPR.repr(value)


def _text(name: str, value: object) -> object:
    """Multipart fields arrive as bytes: read them as UTF-8 text; JSON values pass through."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) > MAX_OPTION_TEXT:
            raise ClientError(
                "InvalidOption", f"{name} is {len(value)} bytes long; no option value exceeds {MAX_OPTION_TEXT}"
            )
        try:
            return value.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ClientError("InvalidOption", f"{name} is not UTF-8 text, got {shown(bytes(value))}") from None
    if isinstance(value, str) and len(value) > MAX_OPTION_TEXT:
        raise ClientError(
            "InvalidOption", f"{name} is {len(value)} characters long; no option value exceeds {MAX_OPTION_TEXT}"
        )
    return value


class _HugeNumber:
    """A JSON integer with too many digits to be any option's value; its repr says how many."""

    def __init__(self, digits: str) -> None:
        self.digits = len(digits.lstrip("-"))

    def __repr__(self) -> str:
        return f"<a {self.digits}-digit number>"


def _json_integer(text: str) -> int | _HugeNumber:
    # Python refuses to convert integers of over 4300 digits (a ValueError mid-parse); no option needs 19.
    return int(text) if len(text) <= 19 else _HugeNumber(text)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ClientError("InvalidJSON", f"the JSON object has the key {shown(key)} more than once")
        result[key] = value
    return result


def load_json(raw: str | bytes | bytearray, what: str = "the body") -> object:
    """JSON text to Python values, or a 400: duplicate keys, huge integers and deep nesting included."""
    try:
        return json.loads(raw, parse_int=_json_integer, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClientError("InvalidJSON", f"{what} is not valid JSON: {error}") from None
    except RecursionError:
        raise ClientError("InvalidJSON", f"{what} is nested too deeply to be a request") from None
