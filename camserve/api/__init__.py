"""The request and response contract: options declared once, the input forms, the response, the work budget."""

from camserve.api.budget import WorkBudget
from camserve.api.options import DEFAULT_TOPK, MAX_TOPK, OPTION_NAMES, OPTIONS, ExplainOptions, Option, parse_options
from camserve.api.response import ExplainResponse, Explanation, ModelInfo, Prediction
from camserve.api.transports import ExplainRequest, is_envelope_instance, is_v2_input, parse_request

__all__ = [
    "DEFAULT_TOPK",
    "MAX_TOPK",
    "OPTIONS",
    "OPTION_NAMES",
    "ExplainOptions",
    "ExplainRequest",
    "ExplainResponse",
    "Explanation",
    "ModelInfo",
    "Option",
    "Prediction",
    "WorkBudget",
    "is_envelope_instance",
    "is_v2_input",
    "parse_options",
    "parse_request",
]
