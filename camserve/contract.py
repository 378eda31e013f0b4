"""The request/response contract: options with their defaults and ranges, request parsing, errors and the response.

This is the one place where defaults, ranges and error messages live; the README's API section documents these names.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import reprlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from camserve.cam import METHODS
from camserve.errors import ClientError
from camserve.imaging import COLORMAPS, OUTPUT_FORMATS, OVERLAYS

__all__ = [
    "ExplainOptions",
    "Explanation",
    "ExplainRequest",
    "ExplainResponse",
    "ModelInfo",
    "Prediction",
    "WorkBudget",
    "is_envelope_instance",
    "is_v2_input",
    "parse_options",
    "parse_request",
]

DEFAULT_TOPK = 5
MAX_TOPK = 20
MAX_TARGETS = 10
MAX_EXPLAIN = 5
MIN_SIDE, MAX_SIDE = 16, 16384
MIN_FAITHFULNESS_STEPS, MAX_FAITHFULNESS_STEPS = 4, 64
MAX_LAYER_NAME = 200
MAX_OPTION_TEXT = 1000
"""Option values longer than this (as text) are refused before any parsing."""
IMAGE_FIELDS = ("data", "image")
"""Where the image may travel: a multipart field, or a key of a JSON body or KServe instance (base64)."""
KSERVE_V2_KEYS = {"name", "datatype", "data"}
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


@dataclass(frozen=True)
class ExplainOptions:
    """The request options. Every one is optional; these are the defaults."""

    topk: int | None = None
    """How many predictions to return, 1–20, and at most the model's number of classes; None: 5 (or every class
    of a model with fewer)."""
    target: tuple[int, ...] | None = None
    """Class indices 0 to classes − 1 to explain, each with its own explanation; None explains the top-1 predicted
    class."""
    alpha: float = 0.5
    """Weight of the heatmap in the overlay, 0–1."""
    colormap: str = "jet"
    """An OpenCV colormap name."""
    format: str = "jpeg"
    """The overlay's encoding: jpeg, png or webp."""
    heatmap: bool = False
    """Also return the raw map as a 16-bit grayscale PNG."""
    method: str = "gradcam"
    """The CAM method: gradcam, gradcam++, xgradcam, hirescam, layercam, eigencam or scorecam."""
    layer: str | None = None
    """The layer to explain, a dotted module path such as layer4 or layer3.5.conv2 that the model's spec lists;
    None: the model's default layer."""
    explain: int = 1
    """Without ``target``: explain the N top predicted classes, 1–5."""
    max_side: int | None = None
    """The longer side of the returned overlay and heatmap, 16–16384 (never larger than the image); None: the
    server's default cap."""
    overlay: str = "heatmap"
    """How the map is drawn on the photo: heatmap (blended), outline (contours of the map's top region), mask (the
    photo where the map is high, darkened elsewhere) or grayscale (the map blended over a grey copy)."""
    region: float = 0.2
    """For ``overlay: outline``, the share of the image inside the outline, where the map is highest: 0.01–0.99."""
    eigen_smooth: bool = False
    """Use the first principal component of the channels' contributions as the map instead of their sum
    (pytorch-grad-cam's ``eigen_smooth``); no extra forward pass."""
    aug_smooth: bool = False
    """Average the maps of the image flipped or not, times 0.9, 1 and 1.1 in brightness (pytorch-grad-cam's
    ``aug_smooth``: test-time augmentation with no paper behind it); costs 6 forward passes."""
    faithfulness: bool = False
    """Measure how faithful each explanation is: deletion, insertion, drop and increase (see
    ``camserve.faithfulness``), at 2·faithfulness_steps + 1 extra forward passes per explanation."""
    faithfulness_steps: int = 16
    """Steps of the deletion and insertion curves, 4–64."""
    clip: tuple[float, float] | None = None
    """Lower and upper percentiles of the map, 0–100, to clip it to before normalising, e.g. (62, 99.9); the
    returned heatmap is clipped too. None: no clipping."""


OPTION_NAMES = tuple(f.name for f in fields(ExplainOptions))


@dataclass(frozen=True)
class ExplainRequest:
    image: bytes
    options: ExplainOptions


def parse_request(row: Mapping[str, object]) -> ExplainRequest:
    """One TorchServe request row to the image bytes and options.

    TorchServe gives a raw body as bytes under ``body``, a JSON body as a dict under ``body`` and multipart fields as
    bytes under their own names. Behind TorchServe's KServe envelopes a row is one v1 instance,
    ``{"data": "<base64>", ...options}``, or one v2 input, ``{"name", "shape", "datatype": "BYTES",
    "data": "<base64>", "parameters": {...options}}``.
    """
    if is_v2_input(row):
        if row["datatype"] != "BYTES":
            raise ClientError("InvalidRequest", f"a v2 input must have datatype BYTES, got {row['datatype']!r}")
        parameters = row.get("parameters") or {}
        if not isinstance(parameters, Mapping):
            raise ClientError("InvalidRequest", "a v2 input's parameters must be an object")
        return _parse_fields({"data": row["data"], **parameters}, image_is_base64=True)
    body = row.get("body")
    if isinstance(body, (bytes, bytearray)) and body.lstrip()[:1] in (b"{", b"["):
        body = _load_json(body)
    if isinstance(body, Mapping):
        return _parse_fields(body, image_is_base64=True)
    if isinstance(body, (bytes, bytearray)):
        return ExplainRequest(image=bytes(body), options=ExplainOptions())
    if isinstance(body, str):
        raise ClientError(
            "InvalidRequest", "the body is text; send the image bytes, multipart form data or a JSON object"
        )
    if body is not None:
        raise ClientError("InvalidRequest", f"a JSON body must be an object, got {type(body).__name__}")
    return _parse_fields(row, image_is_base64=False)


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
            raise ClientError("InvalidJSON", f"the JSON object has the key {_shown(key)} more than once")
        result[key] = value
    return result


def is_v2_input(row: Mapping[str, object]) -> bool:
    """Whether a row is one input of a KServe v2 request (TorchServe's ``kservev2`` envelope)."""
    return KSERVE_V2_KEYS <= set(row)


def is_envelope_instance(row: Mapping[str, object]) -> bool:
    """Whether a row is one instance (v1) or input (v2) of a KServe envelope's request, not a request of its own:
    TorchServe gives a request's body under ``body`` and multipart fields as bytes, an envelope gives JSON values."""
    return "body" not in row and not any(isinstance(value, (bytes, bytearray)) for value in row.values())


def _load_json(raw: str | bytes | bytearray, what: str = "the body") -> object:
    """JSON text to Python values, or a 400: duplicate keys, huge integers and deep nesting included."""
    try:
        return json.loads(raw, parse_int=_json_integer, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClientError("InvalidJSON", f"{what} is not valid JSON: {error}") from None
    except RecursionError:
        raise ClientError("InvalidJSON", f"{what} is nested too deeply to be a request") from None


def _parse_fields(fields_: Mapping[str, object], image_is_base64: bool) -> ExplainRequest:
    image_keys = [key for key in IMAGE_FIELDS if key in fields_]
    if not image_keys:
        raise ClientError(
            "MissingImage",
            "no image in the request: send the image file as the raw body (curl -T cat.jpg), as a multipart field "
            "named 'data' (curl -F data=@cat.jpg) or base64 under 'image' in a JSON object",
        )
    image = fields_[image_keys[0]]
    options = {key: value for key, value in fields_.items() if key not in IMAGE_FIELDS}
    if image_is_base64 or isinstance(image, str):  # a KServe v1 instance carries its image as base64 text
        image = _decode_base64(image)
    elif not isinstance(image, (bytes, bytearray)):
        raise ClientError("MissingImage", "the image field must carry the image file's bytes")
    return ExplainRequest(image=bytes(image), options=parse_options(options))


def _decode_base64(value: object) -> bytes:
    if not isinstance(value, str):
        raise ClientError("InvalidImage", f"'image' must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:  # a data URL, as browsers make them
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError("InvalidImage", "'image' is not valid base64") from None


def parse_options(raw: Mapping[str, object]) -> ExplainOptions:
    """Validate options given as JSON values or as multipart text; every bad value gets its own message."""
    unknown = sorted(set(raw) - set(OPTION_NAMES))
    if unknown:
        raise ClientError(
            "UnknownOption",
            f"unknown option(s) {', '.join(map(_shown, unknown[:5]))}; known options are {', '.join(OPTION_NAMES)}",
        )
    values = {key: _text(key, value) for key, value in raw.items()}
    parsed: dict[str, object] = {}
    if "topk" in values:
        parsed["topk"] = _integer("topk", values["topk"], 1, MAX_TOPK)
    if "target" in values:
        parsed["target"] = _targets(values["target"])
    if "alpha" in values:
        parsed["alpha"] = _number("alpha", values["alpha"], 0.0, 1.0)
    if "colormap" in values:
        parsed["colormap"] = _choice("colormap", values["colormap"], tuple(COLORMAPS))
    if "format" in values:
        given = values["format"]
        parsed["format"] = _choice("format", "jpeg" if given in ("jpg", "JPG") else given, tuple(OUTPUT_FORMATS))
    if "heatmap" in values:
        parsed["heatmap"] = _boolean("heatmap", values["heatmap"])
    if "method" in values:
        parsed["method"] = _choice("method", values["method"], METHODS)
    if "layer" in values:
        parsed["layer"] = _layer_name(values["layer"])
    if "explain" in values:
        if "target" in values:
            raise ClientError("InvalidOption", "give either target (classes to explain) or explain (top N), not both")
        parsed["explain"] = _integer("explain", values["explain"], 1, MAX_EXPLAIN)
    if "max_side" in values:
        parsed["max_side"] = _integer("max_side", values["max_side"], MIN_SIDE, MAX_SIDE)
    if "overlay" in values:
        parsed["overlay"] = _choice("overlay", values["overlay"], OVERLAYS)
    if "region" in values:
        parsed["region"] = _number("region", values["region"], 0.01, 0.99)
    if "clip" in values:
        parsed["clip"] = _percentiles(values["clip"])
    for name in ("eigen_smooth", "aug_smooth"):
        if name in values:
            parsed[name] = _boolean(name, values[name])
    if "faithfulness" in values:
        parsed["faithfulness"] = _boolean("faithfulness", values["faithfulness"])
    if "faithfulness_steps" in values:
        parsed["faithfulness_steps"] = _integer(
            "faithfulness_steps", values["faithfulness_steps"], MIN_FAITHFULNESS_STEPS, MAX_FAITHFULNESS_STEPS
        )
    return ExplainOptions(**parsed)


def _percentiles(value: object) -> tuple[float, float]:
    """Two percentiles, low < high, each 0–100: a JSON list, or text ``62,99.9`` or ``[62, 99.9]``."""
    items = value
    if isinstance(value, str):
        text = value.strip()
        items = text[1:-1].split(",") if text.startswith("[") and text.endswith("]") else text.split(",")
    message = f"clip must be two percentiles from 0 to 100, lower first, such as [62, 99.9], got {_shown(value)}"
    if not isinstance(items, (list, tuple)) or len(items) != 2:
        raise ClientError("InvalidOption", message)
    try:
        low, high = (_number("clip", item.strip() if isinstance(item, str) else item, 0.0, 100.0) for item in items)
    except ClientError:
        raise ClientError("InvalidOption", message) from None
    if not low < high:
        raise ClientError("InvalidOption", message)
    return low, high


def _layer_name(value: object) -> str:
    """A dotted module path; whether the model has that layer is checked where the model is known."""
    valid = isinstance(value, str) and len(value) <= MAX_LAYER_NAME and _LAYER_NAME.fullmatch(value) is not None
    if not valid:
        raise ClientError(
            "InvalidOption",
            f"layer must be a dotted module path of at most {MAX_LAYER_NAME} characters, such as layer4 or "
            f"layer3.5.conv2, got {_shown(value)}",
        )
    return value


_LAYER_PART = r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)"
_LAYER_NAME = re.compile(rf"{_LAYER_PART}(?:\.{_LAYER_PART})*")
_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]{1,40}(?:\.[0-9]{0,40})?|\.[0-9]{1,40})(?:[eE][+-]?[0-9]{1,4})?")
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 60, 60, 6, 6


def _shown(value: object) -> str:
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
            raise ClientError("InvalidOption", f"{name} is not UTF-8 text, got {_shown(bytes(value))}") from None
    if isinstance(value, str) and len(value) > MAX_OPTION_TEXT:
        raise ClientError(
            "InvalidOption", f"{name} is {len(value)} characters long; no option value exceeds {MAX_OPTION_TEXT}"
        )
    return value


def _integer(name: str, value: object, low: int, high: int) -> int:
    number = _as_int(value)
    if number is None or not low <= number <= high:
        raise ClientError("InvalidOption", f"{name} must be an integer from {low} to {high}, got {_shown(value)}")
    return number


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


def _targets(value: object) -> tuple[int, ...]:
    items = value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                items = _load_json(text, "target")
            except ClientError:
                items = None
        else:
            items = [part for part in text.split(",")] if "," in text else text
    if not isinstance(items, list):
        items = [items]
    message = (
        f"target must be a class index (0 to the model's number of classes - 1) or a list of at most {MAX_TARGETS} "
        f"of them, got {_shown(value)}"
    )
    if len(items) > MAX_TARGETS:
        raise ClientError("InvalidOption", message)
    indices = [_as_int(item) for item in items]
    if not indices or len(indices) > MAX_TARGETS or any(i is None or i < 0 for i in indices):
        raise ClientError("InvalidOption", message)
    return tuple(indices)


def _number(name: str, value: object, low: float, high: float) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        number = float(value.strip())
    if number is None or not low <= number <= high:  # NaN fails both comparisons
        raise ClientError("InvalidOption", f"{name} must be a number from {low:g} to {high:g}, got {_shown(value)}")
    return number


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.lower() in choices:
        return value.lower()
    raise ClientError("InvalidOption", f"{name} must be one of {', '.join(choices)}, got {_shown(value)}")


def _boolean(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ClientError("InvalidOption", f"{name} must be true or false, got {_shown(value)}")


@dataclass(frozen=True)
class WorkBudget:
    """What one request may ask of a worker, checked from the options and the image header before any pixel is
    decoded. Set at build time (``scripts/build_mar.py --max-side ...``); defaults measured on two CPU cores so that
    a full batch of the largest allowed requests stays well inside the 120 s response timeout."""

    max_side: int = 2048
    """The longer side of the overlays and heatmaps when a request gives no ``max_side``."""
    max_output_pixels: int = 40_000_000
    """Output pixels × explanations, per request."""
    max_forward_passes: int = 100
    """Forward passes per request: 1, plus ScoreCAM's one per scored channel."""
    max_response_bytes: int = 100 * 1024 * 1024
    """The largest response body: TorchServe's ``max_response_size`` in the shipped config.properties."""

    def output_size(self, width: int, height: int, max_side: int | None) -> tuple[int, int]:
        """(width, height) of the overlays: the image scaled so that its longer side is at most ``max_side``."""
        side = self.max_side if max_side is None else max_side
        scale = min(1.0, side / max(width, height))
        return max(1, round(width * scale)), max(1, round(height * scale))

    def check(self, explanations: int, output: tuple[int, int], forward_passes: int) -> None:
        """Refuse a request whose work is over budget, saying how much it asked for and how to fit."""
        width, height = output
        pixels = explanations * width * height
        if pixels > self.max_output_pixels:
            fitting = self.max_output_pixels // (width * height)
            side = int(max(width, height) * (self.max_output_pixels / pixels) ** 0.5)
            advice = f"ask for at most {fitting} explanations at this size, or " if fitting else ""
            raise ClientError(
                "OverBudget",
                f"this request asks for {explanations} explanation(s) of {width}x{height} pixels = "
                f"{pixels / 1e6:.1f} megapixels of output; at most {self.max_output_pixels / 1e6:g} megapixels are "
                f"rendered per request: {advice}set max_side to {max(MIN_SIDE, side)} or less",
            )
        if forward_passes > self.max_forward_passes:
            raise ClientError(
                "OverBudget",
                f"this request needs {forward_passes} forward passes; at most {self.max_forward_passes} are run "
                "per request: choose a method other than scorecam or ablationcam, fewer faithfulness_steps or no "
                "faithfulness, "
                "or a server built with fewer --scorecam-channels",
            )

    def check_response(self, size: int) -> None:
        if size > self.max_response_bytes:
            raise ClientError(
                "ResponseTooLarge",
                f"the response would be over {size} bytes; at most {self.max_response_bytes} are sent: ask for "
                "fewer explanations, a smaller max_side, format jpeg, or no heatmap",
            )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    weights: str
    """``imagenet``, ``random`` (predictions mean nothing) or ``file:<sha256 first 12>``."""
    arch: str
    """The torchvision architecture, or the class name of the user's own network."""
    classes: int
    """How many classes the model tells apart."""


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class Explanation:
    index: int
    label: str
    probability: float
    """The model's probability for the explained class."""
    method: str
    layer: str
    format: str
    width: int
    """The overlay's and heatmap's size: the image's, or smaller under ``max_side``."""
    height: int
    overlay: str
    """The overlay image, base64."""
    heatmap: str | None = None
    """The map as a base64 16-bit grayscale PNG; only when asked."""
    faithfulness: dict[str, object] | None = None
    """Deletion, insertion, drop, increase and steps (``camserve.faithfulness``); only when asked."""


@dataclass(frozen=True)
class ExplainResponse:
    model: ModelInfo
    width: int
    height: int
    predictions: list[Prediction]
    explanations: list[Explanation] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        explanations = []
        for explanation in self.explanations:
            item = asdict(explanation)
            for optional in ("heatmap", "faithfulness"):
                if item[optional] is None:
                    del item[optional]
            explanations.append(item)
        return {
            "model": asdict(self.model),
            "image": {"width": self.width, "height": self.height},
            "predictions": [asdict(p) for p in self.predictions],
            "explanations": explanations,
        }
