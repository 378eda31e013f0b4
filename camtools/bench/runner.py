"""One benchmark run: every section in order, with a progress bar."""

from __future__ import annotations

from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from camtools.bench.audit import audit_section
from camtools.bench.context import BenchConfig, BenchContext, BenchReport, machine_info, make_timer, sample_images
from camtools.bench.imagework import image_work
from camtools.bench.inprocess import (
    channels_last_by_batch,
    dense_tasks,
    fast_path_costs,
    floor_ms_per_image,
    in_process_costs,
    method_costs,
    photo_profiles,
    response_byte_costs,
    sanity_costs,
    stage_shares,
    vit_methods,
)
from camtools.bench.report import target_rows
from camtools.bench.service import measure_service
from camtools.models import prepare_model


def run_benchmark(config: BenchConfig, workdir: Path | None = None) -> BenchReport:
    device = torch.device(config.device)
    timed = make_timer(device)
    images = sample_images(max(config.agreement_images, max(config.batch_sizes)))
    prepared = prepare_model(arch=config.arch, weights=config.weights, layer=config.layer)
    spec = prepared.spec
    config = replace(config, layer=spec.default_layer)
    model = prepared.model.to(device)
    ctx = BenchContext(config=config, device=device, timed=timed, model=model, spec=spec, images=images)
    report = BenchReport(machine=machine_info(device) | {"weights": spec.weights}, config=asdict(config))
    sections = [
        ("in-process", "in_process", in_process_costs),
        ("methods", "methods", method_costs),
        ("sanity", "sanity", sanity_costs),
        ("vision transformer", "vit", vit_methods),
        ("fast paths", "fast_paths", fast_path_costs),
        ("channels_last by batch", "channels_last", channels_last_by_batch),
        ("decode/encode share", "stages", stage_shares),
        ("image work", "image_work", image_work),
        ("phone photos", "photos", photo_profiles),
        ("detector and segmenter", "dense", dense_tasks),
        ("response bytes", "response_bytes", response_byte_costs),
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
        floor = partial(floor_ms_per_image, model, spec, images, device, timed, config)
        report.service, report.memory, report.batch_delays, report.profile, report.service_photos = measure_service(
            prepared, images, config, workdir, floor
        )
        progress.update()
    progress.close()
    report.targets = target_rows(report)
    return report
