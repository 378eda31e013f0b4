"""The request and response contract: options declared once, the input forms, the response, the work budget."""

from camserve.api.budget import WorkBudget
from camserve.api.options import (
    DEFAULT_MAX_DETECTIONS,
    DEFAULT_SCORE_THRESHOLD,
    DEFAULT_TOPK,
    MAX_TOPK,
    OPTION_NAMES,
    OPTIONS,
    ExplainOptions,
    Option,
    parse_options,
)
from camserve.api.response import DetectionItem, ExplainResponse, Explanation, ModelInfo, Prediction, Segment
from camserve.api.transports import ExplainRequest, Request, is_envelope_instance, is_v2_input, parse_request

__all__ = [
    "DEFAULT_MAX_DETECTIONS",
    "DEFAULT_SCORE_THRESHOLD",
    "DEFAULT_TOPK",
    "MAX_TOPK",
    "OPTIONS",
    "OPTION_NAMES",
    "DetectionItem",
    "ExplainOptions",
    "ExplainRequest",
    "ExplainResponse",
    "Explanation",
    "ModelInfo",
    "Option",
    "Prediction",
    "Segment",
    "WorkBudget",
    "is_envelope_instance",
    "is_v2_input",
    "parse_options",
    "parse_request",
    "Request",
]
