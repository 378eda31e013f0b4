"""One benchmark run: every section in order, with a progress bar."""

from __future__ import annotations

from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from camtools.bench.audit import audit_section
from camtools.bench.context import BenchConfig, BenchContext, BenchReport, _timer, machine_info, sample_images
from camtools.bench.imagework import image_work
from camtools.bench.inprocess import (
    _channels_last_by_batch,
    _dense_tasks,
    _fast_paths,
    _floor_ms_per_image,
    _in_process,
    _method_costs,
    _photos,
    _response_bytes,
    _sanity_costs,
    _stage_shares,
    _vit_methods,
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
    sections = [
        ("in-process", "in_process", _in_process),
        ("methods", "methods", _method_costs),
        ("sanity", "sanity", _sanity_costs),
        ("vision transformer", "vit", _vit_methods),
        ("fast paths", "fast_paths", _fast_paths),
        ("channels_last by batch", "channels_last", _channels_last_by_batch),
        ("decode/encode share", "stages", _stage_shares),
        ("image work", "image_work", image_work),
        ("phone photos", "photos", _photos),
        ("detector and segmenter", "dense", _dense_tasks),
        ("response bytes", "response_bytes", _response_bytes),
        ("dataset audit", "audit", audit_section),
    ]
    if config.sections:
        sections = [section for section in sections if section[1] in config.sections]
    progress = tqdm(total=len(sections) + config.server, desc="benchmark", unit="step")
    for step, field_name, section in sections:
        progress.set_postfix_str(step)
        setattr(report, field_name, section(ctx))
        progress.update()
    if config.server:
        progress.set_postfix_str("service")
        floor = partial(_floor_ms_per_image, model, spec, images, device, timed, config)
        report.service, report.memory, report.batch_delays, report.profile, report.service_photos = _service(
            prepared, images, config, workdir, floor
        )
        progress.update()
    progress.close()
    report.targets = _targets(report)
    return report
