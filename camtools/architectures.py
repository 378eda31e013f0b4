"""Every torchvision classification builder through the build's validation and one explanation: which explain, at
which layer, with what map, at what cost. ``scripts/architectures.py`` writes the result to docs/architectures.md.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

from camserve.cam import CamEngine, CamRequest
from camtools.models import prepare_model

__all__ = ["ArchResult", "markdown", "survey"]


@dataclass
class ArchResult:
    arch: str
    default_layer: str = ""
    layout: str = ""
    map_size: str = ""
    input_size: int = 0
    parameters_m: float = 0.0
    forward_ms: float = 0.0
    gradcam_ms: float = 0.0
    error: str = ""


def _median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def explain_one(arch: str, repeats: int = 3) -> ArchResult:
    """Build ``arch`` with seeded random weights as ``scripts/build_mar.py`` does (validation included), then time
    one image's plain forward pass and its Grad-CAM at the default layer."""
    result = ArchResult(arch)
    try:
        prepared = prepare_model(arch=arch, weights="random", seed=0, progress=False)
    except Exception as error:  # the survey reports every failure with its reason, and goes on
        result.error = " ".join(str(error).split())[:300]
        return result
    spec, model = prepared.spec, prepared.model
    engine = CamEngine(model, input_size=spec.input_size, default_layer=spec.default_layer)
    info = engine.spatial_layer(None)
    image = torch.randn(1, 3, spec.input_size, spec.input_size)

    def forward() -> None:
        with torch.inference_mode():
            model(image)

    def gradcam() -> None:
        engine(image, [CamRequest()])

    forward()
    gradcam()
    result.default_layer = spec.default_layer
    result.layout = spec.layers[spec.default_layer]
    result.map_size = f"{info.grid[1]}x{info.grid[2]}"
    result.input_size = spec.input_size
    result.parameters_m = sum(p.numel() for p in model.parameters()) / 1e6
    result.forward_ms = _median_ms(forward, repeats)
    result.gradcam_ms = _median_ms(gradcam, repeats)
    return result


def survey(archs: list[str], repeats: int = 3, progress=None) -> list[ArchResult]:
    results = []
    for arch in archs:
        if progress is not None:
            progress.set_postfix_str(arch)
        results.append(explain_one(arch, repeats))
        gc.collect()  # the last model is garbage now: free it before the next is built
        if progress is not None:
            progress.update()
    return results


def markdown(results: list[ArchResult], machine: str) -> str:
    explained = [r for r in results if not r.error]
    lines = [
        "# Every torchvision architecture",
        "",
        f"Written by `python scripts/architectures.py` on {machine}. Each of torchvision's "
        f"{len(results)} classification builders (`torchvision.models.list_models(module=torchvision.models)`) was "
        "built with seeded random weights, validated as `scripts/build_mar.py` validates an archive (strict "
        "weights, one explanation of a synthetic image at the default layer, finite and of the layer's shape), "
        "then timed on one image: the median of the plain forward pass under `inference_mode` and of Grad-CAM at "
        "the default layer (forward, gradient and map). Random weights: the maps say nothing about any image; "
        "the layers, shapes and costs are what this page is for. Timings come from a shared two-core machine "
        "with other work running: a ratio far from 1 (below 0.9, say) is that noise, not a faster explanation.",
        "",
        f"**{len(explained)} of {len(results)} explain.**",
        "",
        "| arch | default layer | layout | map | input | params (M) | forward ms | Grad-CAM ms | ratio |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in explained:
        lines.append(
            f"| {r.arch} | `{r.default_layer}` | {r.layout} | {r.map_size} | {r.input_size} | {r.parameters_m:.1f} | "
            f"{r.forward_ms:.0f} | {r.gradcam_ms:.0f} | {r.gradcam_ms / r.forward_ms:.2f} |"
        )
    failed = [r for r in results if r.error]
    lines += ["", "## Not explained", ""]
    lines += [f"- **{r.arch}**: {r.error}" for r in failed] or ["None: every builder explains."]
    return "\n".join(lines) + "\n"
