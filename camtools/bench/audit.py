"""The benchmark's audit section: ``scripts/audit.py``'s throughput on Ray Data against the plain forward pass at
batch 8, in the same run, and Ray's start-up cost."""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path

from camserve.imaging import encode_image
from camserve.model import images_to_batch
from camtools.bench.context import BenchContext, plain_forward, sample_images

__all__ = ["audit_section"]


def audit_section(ctx: BenchContext) -> dict[str, object]:
    """Images per second of the audit at the margin, (L − S) / (t_L − t_S) for the config's ``audit_images`` (S, L),
    48 and 240 by default, and of the plain forward pass at batch 8 on the same model, timed in the same run; Ray's
    start-up (``ray.init`` alone) and the fixed cost of a run (t_S less S images at the marginal rate).
    The images are photos saved as JPEG (the overlays' encoder) at their
    own sizes, so the audit pays their decoding and its heatmaps' and overlays' encoding."""
    import ray

    from camtools.archive import build_archive
    from camtools.audit.run import AuditOptions, audit
    from camtools.models import prepare_model

    config, spec = ctx.config, ctx.spec
    small, large = config.audit_images
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as folder:
        folder = Path(folder)
        prepared = prepare_model(arch=config.arch, weights=config.weights, layer=config.layer)
        archive = build_archive(prepared, folder / "store")
        photos = sample_images(large)
        (folder / "images").mkdir()
        for n, photo in enumerate(photos):
            (folder / "images" / f"{n:04d}.jpg").write_bytes(encode_image(photo, "jpeg"))
        lines = ["file,class"] + [f"images/{n:04d}.jpg," for n in range(large)]
        (folder / "all.csv").write_text("\n".join(lines) + "\n")
        started = time.perf_counter()
        ray.init(include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        ray_init = time.perf_counter() - started
        ray.shutdown()
        seconds = {}
        for count in config.audit_images:
            options = AuditOptions(batch_size=8, limit=count)
            started = time.perf_counter()
            summary = audit(str(folder / "all.csv"), archive, folder / f"out{count}", options, progress=lambda _: None)
            seconds[count] = time.perf_counter() - started
            assert summary["errors"] == 0, summary
    batch = images_to_batch(photos[:8], spec, ctx.device)
    forward = ctx.timed({"forward": partial(plain_forward, ctx.model, batch)}, config.repeats, config.warmup)
    forward_per_s = 8 / forward["forward"]
    marginal = (large - small) / (seconds[large] - seconds[small])
    return {
        "images": list(config.audit_images),
        "seconds": [round(seconds[count], 2) for count in config.audit_images],
        "marginal_images_per_s": round(marginal, 2),
        "forward_images_per_s": round(forward_per_s, 2),
        "ratio": round(marginal / forward_per_s, 3),
        "ray_init_s": round(ray_init, 2),
        "fixed_s": round(seconds[small] - small / marginal, 2),
        "target": 0.7,
    }
