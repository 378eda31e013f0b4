"""The request/response contract: options with their defaults and ranges, request parsing, errors and the response.

This is the one place where defaults, ranges and error messages live; the README's API section documents these names.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from handler.cam import METHODS
from handler.errors import ClientError
from handler.imaging import COLORMAPS, OUTPUT_FORMATS

__all__ = [
    "ExplainOptions",
    "Explanation",
    "ExplainRequest",
    "ExplainResponse",
    "ModelInfo",
    "Prediction",
    "parse_options",
    "parse_request",
]

NUM_CLASSES = 1000
MAX_TOPK = 20
MAX_TARGETS = 10
MAX_EXPLAIN = 5
IMAGE_FIELDS = ("data", "image")
"""Where the image may travel: a multipart field, or a key of a JSON body or KServe instance (base64)."""
KSERVE_V2_KEYS = {"name", "datatype", "data"}
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


@dataclass(frozen=True)
class ExplainOptions:
    """The request options. Every one is optional; these are the defaults."""

    topk: int = 5
    """How many predictions to return, 1–20."""
    target: tuple[int, ...] | None = None
    """Class indices 0–999 to explain, each with its own explanation; None explains the top-1 predicted class."""
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
    layer: str = "layer4"
    """The layer to explain: conv1, layer1 … layer4, or a dotted submodule such as layer4.2 or layer3.5.conv2."""
    explain: int = 1
    """Without ``target``: explain the N top predicted classes, 1–5."""


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
    if KSERVE_V2_KEYS <= set(row):
        if row["datatype"] != "BYTES":
            raise ClientError("InvalidRequest", f"a v2 input must have datatype BYTES, got {row['datatype']!r}")
        parameters = row.get("parameters") or {}
        if not isinstance(parameters, Mapping):
            raise ClientError("InvalidRequest", "a v2 input's parameters must be an object")
        return _parse_fields({"data": row["data"], **parameters}, image_is_base64=True)
    body = row.get("body")
    if isinstance(body, (bytes, bytearray)) and body.lstrip()[:1] in (b"{", b"["):
        body = _parse_json(body)
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


def _parse_json(raw: bytes | bytearray) -> object:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClientError("InvalidJSON", f"the body is not valid JSON: {error}") from None


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
            f"unknown option(s) {', '.join(unknown)}; known options are {', '.join(OPTION_NAMES)}",
        )
    values = {key: _text(value) for key, value in raw.items()}
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
    return ExplainOptions(**parsed)


def _layer_name(value: object) -> str:
    """A dotted module path; whether the model has that layer is checked where the model is known."""
    parts = value.split(".") if isinstance(value, str) else []
    if not parts or not all(part.isidentifier() or part.isdigit() for part in parts):
        raise ClientError(
            "InvalidOption",
            f"layer must be conv1, layer1, layer2, layer3, layer4 or a dotted submodule such as layer4.2 or "
            f"layer3.5.conv2, got {value!r}",
        )
    return value


def _text(value: object) -> object:
    """Multipart fields arrive as bytes: read them as UTF-8 text; JSON values pass through."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return value.decode("utf-8").strip()
        except UnicodeDecodeError:
            return value
    return value


def _integer(name: str, value: object, low: int, high: int) -> int:
    number = _as_int(value)
    if number is None or not low <= number <= high:
        raise ClientError("InvalidOption", f"{name} must be an integer from {low} to {high}, got {value!r}")
    return number


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit() and value.strip().isascii():
        return int(value)
    return None


def _targets(value: object) -> tuple[int, ...]:
    items = value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                items = None
        else:
            items = [part for part in text.split(",")] if "," in text else text
    if not isinstance(items, list):
        items = [items]
    message = (
        f"target must be a class index from 0 to {NUM_CLASSES - 1} or a list of at most {MAX_TARGETS} of them, "
        f"got {value!r}"
    )
    indices = [_as_int(item) for item in items]
    if not indices or len(indices) > MAX_TARGETS or any(i is None or not 0 <= i < NUM_CLASSES for i in indices):
        raise ClientError("InvalidOption", message)
    return tuple(indices)


def _number(name: str, value: object, low: float, high: float) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not low <= number <= high:  # NaN fails both comparisons
        raise ClientError("InvalidOption", f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    return number


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.lower() in choices:
        return value.lower()
    raise ClientError("InvalidOption", f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _boolean(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ClientError("InvalidOption", f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    weights: str
    """``imagenet``, ``random`` (predictions mean nothing) or ``file:<sha256 first 12>``."""


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
    overlay: str
    """The overlay image, base64."""
    heatmap: str | None = None
    """The map as a base64 16-bit grayscale PNG; only when asked."""


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
            if item["heatmap"] is None:
                del item["heatmap"]
            explanations.append(item)
        return {
            "model": asdict(self.model),
            "image": {"width": self.width, "height": self.height},
            "predictions": [asdict(p) for p in self.predictions],
            "explanations": explanations,
        }
