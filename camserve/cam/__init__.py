"""Class activation maps for torch image models, at the price of about one forward pass.

Pure torch: no TorchServe, no KServe, no image library. Give :class:`CamEngine` a model, a batch and, per image, a
:class:`CamRequest` (targets, layer, method); it gives back the logits and one map per target, with its timings.

- :mod:`camserve.cam.engine`: the plan, the split forward pass and the gradient core;
- :mod:`camserve.cam.methods`: the methods by family, and their one registry of records;
- :mod:`camserve.cam.targets`: typed targets and the scalar each explanation differentiates;
- :mod:`camserve.cam.layers`: which layers give a map, their layouts, the default layer;
- :mod:`camserve.cam.post`: the one min–max and upsampling.
"""

from camserve.cam.engine import CamEngine, CamOutput, CamRequest
from camserve.cam.layers import (
    LAYOUTS,
    LayerInfo,
    LayerNotFoundError,
    NoSpatialLayerError,
    default_layer,
    describe_layers,
    find_layer,
    to_grid,
)
from camserve.cam.methods.registry import (
    DEFAULT_METHOD,
    DETECTION_METHOD,
    METHODS,
    PYRAMID_METHOD,
    Family,
    Method,
    method_record,
)
from camserve.cam.post import normalize_map
from camserve.cam.targets import SOFTMAX, Classes, Head, Objective, Target, TopPredicted, logit

__all__ = [
    "DEFAULT_METHOD",
    "DETECTION_METHOD",
    "PYRAMID_METHOD",
    "LAYOUTS",
    "METHODS",
    "CamEngine",
    "CamOutput",
    "CamRequest",
    "SOFTMAX",
    "Classes",
    "Head",
    "Family",
    "LayerInfo",
    "LayerNotFoundError",
    "Method",
    "NoSpatialLayerError",
    "Objective",
    "Target",
    "TopPredicted",
    "default_layer",
    "describe_layers",
    "find_layer",
    "logit",
    "method_record",
    "normalize_map",
    "to_grid",
]
