"""How an option's value is read: as JSON gives it or as multipart text, to the option's value or None; and JSON
hardened against what a request could send (duplicate keys, huge integers, deep nesting)."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import reprlib
from collections.abc import Callable, Mapping

from camserve.errors import ClientError

__all__ = [
    "MAX_LAYER_NAME",
    "MAX_OPTION_TEXT",
    "MAX_TARGETS",
    "boolean",
    "center_width",
    "choice",
    "embeddings",
    "integer",
    "layer_name",
    "load_json",
    "number",
    "percentiles",
    "references",
    "sentences",
    "shown",
    "targets",
    "text_of",
]

MAX_TARGETS = 10
MAX_LAYER_NAME = 200
MAX_OPTION_TEXT = 1000
"""Option values longer than this (as text) are refused before any parsing."""
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


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


def center_width(value: object) -> tuple[float, float] | None:
    """A VOI window: two finite numbers, its center and its width (at least 1), as a JSON list or text ``40,400``."""
    items = _json_list(value, "window")
    if isinstance(items, str):
        items = items.split(",")
    if not isinstance(items, (list, tuple)) or len(items) != 2:
        return None
    center, width = (_as_float(item.strip() if isinstance(item, str) else item) for item in items)
    if center is None or width is None or not math.isfinite(center) or not math.isfinite(width) or width < 1:
        return None
    return center, width


def _json_list(value: object, what: str) -> object:
    """A JSON list as JSON gives it, or as multipart text gives it (``["a", "b"]``); anything else as it is."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return load_json(value, what)
        except ClientError:
            return None
    return value


def sentences(most: int, longest: int) -> Callable[[object], tuple[str, ...] | None]:
    """A list of 1 to ``most`` sentences of 1 to ``longest`` characters each, not blank: a JSON list, or in a
    multipart form the list as JSON text (one sentence alone is a list of one)."""

    def read(value: object) -> tuple[str, ...] | None:
        items = _json_list(value, "prompts")
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list) or not 1 <= len(items) <= most:
            return None
        if not all(isinstance(item, str) and item.strip() and len(item) <= longest for item in items):
            return None
        return tuple(item.strip() for item in items)

    return read


def embeddings(most: int, longest: int) -> Callable[[object], tuple[tuple[float, ...], ...] | None]:
    """One vector of 1 to ``longest`` finite numbers, or a list of at most ``most`` of them, as JSON or multipart
    JSON text."""

    def read(value: object) -> tuple[tuple[float, ...], ...] | None:
        items = _json_list(value, "reference_embedding")
        if isinstance(items, list) and items and not isinstance(items[0], list):
            items = [items]
        if not isinstance(items, list) or not 1 <= len(items) <= most:
            return None
        vectors = []
        for item in items:
            if not isinstance(item, list) or not 1 <= len(item) <= longest:
                return None
            numbers = [_as_float(number) if not isinstance(number, str) else None for number in item]
            if any(number is None or not math.isfinite(number) for number in numbers):
                return None  # NaN and infinities, strings, nested lists
            vectors.append(tuple(numbers))
        return tuple(vectors)

    return read


def references(most: int) -> Callable[[object], tuple[bytes, ...] | None]:
    """Reference images: one file's bytes (a multipart field) or base64 text, or a JSON list of at most ``most``
    base64 texts; their pixels are read where the model is known."""

    def read(value: object) -> tuple[bytes, ...] | None:
        items = value if isinstance(value, list) else [value]
        if not 1 <= len(items) <= most:
            return None
        files = []
        for item in items:
            if isinstance(item, (bytes, bytearray)):
                files.append(bytes(item))
                continue
            if not isinstance(item, str):
                return None
            if item.startswith("data:") and "," in item:  # a data URL, as browsers make them
                item = item.split(",", 1)[1]
            try:
                files.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                return None
        return tuple(files)

    return read


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


# --- Values as text, and JSON hardening ---

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 60, 60, 6, 6


def shown(value: object) -> str:
    """A value as an error message quotes it: short, whatever its size or depth."""
    return _REPR.repr(value)


def text_of(name: str, value: object, longest: int = MAX_OPTION_TEXT) -> object:
    """Multipart fields arrive as bytes: read them as UTF-8 text; JSON values pass through. A value longer than
    ``longest`` characters is refused before any parsing."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) > longest:
            raise ClientError("InvalidOption", f"{name} is {len(value)} bytes long; its value may not exceed {longest}")
        try:
            return value.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ClientError("InvalidOption", f"{name} is not UTF-8 text, got {shown(bytes(value))}") from None
    if isinstance(value, str) and len(value) > longest:
        raise ClientError(
            "InvalidOption", f"{name} is {len(value)} characters long; its value may not exceed {longest}"
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
