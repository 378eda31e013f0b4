"""One benchmark run: every section in order, with a progress bar."""

from __future__ import annotations

from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from camtools.bench.context import BenchConfig, BenchContext, BenchReport, _timer, machine_info, sample_images
from camtools.bench.inprocess import (
    _channels_last_by_batch,
    _fast_paths,
    _floor_ms_per_image,
    _in_process,
    _method_costs,
    _response_bytes,
    _stage_shares,
)
from camtools.bench.report import _targets
from camtools.bench.service import _service
from camtools.models import prepare_model


def run_benchmark(config: BenchConfig, workdir: Path | None = None) -> BenchReport:
    device = torch.device(config.device)
    timed = _timer(device)
    images = sample_images(max(config.agreement_images, max(config.batch_sizes)))
    prepared = prepare_model(arch=config.arch, weights=config.weights, layer=config.layer)
    spec = prepared.spec
    config = replace(config, layer=spec.default_layer)
    model = prepared.model.to(device)
    ctx = BenchContext(config=config, device=device, timed=timed, model=model, spec=spec, images=images)
    report = BenchReport(machine=machine_info(device) | {"weights": spec.weights}, config=asdict(config))
    steps = ["in-process", "methods", "fast paths", "channels_last by batch", "decode/encode share", "response bytes"]
    steps += ["service"] if config.server else []
    progress = tqdm(steps, desc="benchmark", unit="step")
    for step in progress:
        progress.set_postfix_str(step)
        if step == "in-process":
            report.in_process = _in_process(ctx)
        elif step == "methods":
            report.methods = _method_costs(ctx)
        elif step == "fast paths":
            report.fast_paths = _fast_paths(ctx)
        elif step == "channels_last by batch":
            report.channels_last = _channels_last_by_batch(ctx)
        elif step == "decode/encode share":
            report.stages = _stage_shares(ctx)
        elif step == "response bytes":
            report.response_bytes = _response_bytes(ctx)
        else:
            floor = partial(_floor_ms_per_image, model, spec, images, device, timed, config)
            report.service, report.memory, report.batch_delays, report.profile = _service(
                prepared, images, config, workdir, floor
            )
    report.targets = _targets(report)
    return report
