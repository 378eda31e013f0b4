"""The five input forms a request arrives in, to image bytes and options: a raw body, multipart fields, a JSON
body, a KServe v1 instance and a KServe v2 input. Each door turns its runtime's request into a :class:`Request`, the
service's own, runtime-neutral type; the service reads it inside its containment, so a bad one gets its own 4xx."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from camserve.api.options import ExplainOptions, parse_options
from camserve.api.readers import load_json
from camserve.errors import ClientError

__all__ = ["IMAGE_FIELDS", "ExplainRequest", "Request", "is_envelope_instance", "is_v2_input", "parse_request"]

IMAGE_FIELDS = ("data", "image")
"""Where the image may travel: a multipart field, or a key of a JSON body or KServe instance (base64)."""
KSERVE_V2_KEYS = {"name", "datatype", "data"}
_MORE_REFERENCES = re.compile(r"reference_[1-9]")
"""A multipart form's further reference images, beside ``reference``: ``reference_1`` to ``reference_9``."""


@dataclass(frozen=True)
class ExplainRequest:
    """A request read: the image's bytes and its options, parsed."""

    image: bytes
    options: ExplainOptions


@dataclass(frozen=True)
class Request:
    """One request as the service takes it, whatever the runtime: how to read it (into an
    :class:`ExplainRequest`, or a ClientError that names what is wrong) and the runtime's id for it."""

    read: Callable[[], ExplainRequest]
    id: str | None = None

    @classmethod
    def torchserve(cls, row: Mapping[str, object], id: str | None = None) -> Request:
        """A TorchServe request row (a raw, JSON or multipart body, or one instance of a KServe envelope)."""
        return cls(partial(parse_request, row), id)

    @classmethod
    def v1_instance(cls, instance: object, id: str | None = None) -> Request:
        """One instance of a KServe v1 request: ``{"data": "<base64>", ...options}``, or the base64 text alone."""
        fields = instance if isinstance(instance, Mapping) else {"image": instance}
        return cls(partial(_parse_fields, fields, image_is_base64=True), id)

    @classmethod
    def v2_element(cls, data: object, parameters: object, id: str | None = None) -> Request:
        """One BYTES element of a KServe v2 input, with that input's parameters as its options."""
        return cls(partial(_v2_fields, data, parameters), id)


def _v2_fields(data: object, parameters: object) -> ExplainRequest:
    if not isinstance(parameters, Mapping):
        raise ClientError("InvalidRequest", "a v2 input's parameters must be an object")
    return _parse_fields({"data": data, **parameters}, image_is_base64=True)


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
        return _v2_fields(row["data"], row.get("parameters") or {})
    body = row.get("body")
    if isinstance(body, (bytes, bytearray)) and body.lstrip()[:1] in (b"{", b"["):
        body = load_json(body)
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


def is_v2_input(row: Mapping[str, object]) -> bool:
    """Whether a row is one input of a KServe v2 request (TorchServe's ``kservev2`` envelope)."""
    return KSERVE_V2_KEYS <= set(row)


def is_envelope_instance(row: Mapping[str, object]) -> bool:
    """Whether a row is one instance (v1) or input (v2) of a KServe envelope's request, not a request of its own:
    TorchServe gives a request's body under ``body`` and multipart fields as bytes, an envelope gives JSON values."""
    return "body" not in row and not any(isinstance(value, (bytes, bytearray)) for value in row.values())


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
    extra = sorted((key for key in options if _MORE_REFERENCES.fullmatch(key)), key=lambda key: int(key[10:]))
    if extra:  # a multipart form's further reference files: reference, reference_1, reference_2, ...
        given = options.pop("reference", None)
        options["reference"] = [*([] if given is None else [given]), *(options.pop(key) for key in extra)]
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
