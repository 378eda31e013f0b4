"""The benchmark: every contender in one run, on the same inputs, as ratios to the plain forward pass.

Contenders: the floor (the model's forward pass under ``inference_mode``); this engine in-process, Grad-CAM alone and
with overlay encoding; pytorch-grad-cam's ``GradCAM``, the peer; the running TorchServe service end to end over
HTTP, at each batch delay measured. Also each method, the fast paths (precision, channels_last) with their agreement,
channels_last by batch size, the share of decode and encode, the cost of the response's bytes, where a lone
request's time goes inside the server, and the worker's memory. Never shipped in the .mar.

- :mod:`~camtools.bench.context`: the configuration and what every section shares;
- :mod:`~camtools.bench.inprocess` and :mod:`~camtools.bench.service`: the sections;
- :mod:`~camtools.bench.report`: targets, markdown and plot; :mod:`~camtools.bench.figures`: the docs' blocks;
- :mod:`~camtools.bench.runner`: one run.
"""

from camtools.bench.context import BenchConfig, BenchContext, BenchReport, machine_info, plain_forward, sample_images
from camtools.bench.figures import (
    COSTS_END,
    COSTS_START,
    FIGURES_END,
    FIGURES_START,
    methods_table,
    readme_figures,
    replace_readme_block,
)
from camtools.bench.inprocess import channels_last_threshold, timed_methods
from camtools.bench.report import markdown, write_reports
from camtools.bench.runner import run_benchmark

__all__ = [
    "COSTS_END",
    "COSTS_START",
    "FIGURES_END",
    "FIGURES_START",
    "BenchConfig",
    "BenchContext",
    "BenchReport",
    "channels_last_threshold",
    "machine_info",
    "markdown",
    "methods_table",
    "plain_forward",
    "readme_figures",
    "replace_readme_block",
    "run_benchmark",
    "sample_images",
    "timed_methods",
    "write_reports",
]
