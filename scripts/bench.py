"""Benchmark every contender in one run and write a markdown table, a JSON file and a PNG plot.

python scripts/bench.py                     # CPU, the full run (a few minutes on two cores)
python scripts/bench.py --device cuda:0     # on a GPU: fp16 joins the fast paths
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from camtools.bench import (
    BenchConfig,
    markdown,
    run_benchmark,
    write_reports,
)
from camtools.docs import regenerate

ROOT = Path(__file__).resolve().parent.parent


def integers(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def main(argv: list[str] | None = None) -> int:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--batch-sizes", type=integers, default=defaults.batch_sizes, help="e.g. 1,8")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed runs per contender")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--agreement-images", type=int, default=defaults.agreement_images)
    parser.add_argument("--no-server", action="store_true", help="skip the TorchServe end-to-end part")
    parser.add_argument("--concurrency", type=integers, default=defaults.concurrency, help="e.g. 1,4,8,16")
    parser.add_argument("--requests", type=int, default=defaults.requests_per_level, help="requests per level")
    parser.add_argument("--soak", type=int, default=defaults.soak_requests, help="requests for the memory check")
    parser.add_argument("--server-precision", default=defaults.server_precision, choices=("fp32", "bf16", "fp16"))
    parser.add_argument(
        "--server-channels-last",
        type=int,
        metavar="N",
        default=defaults.server_channels_last,
        help="the service runs batches of N images or more channels_last (1: all, 0: none; default: %(default)s)",
    )
    parser.add_argument(
        "--server-compile",
        action="store_true",
        help="the service with the network before its default layer compiled (the archive's --compile)",
    )
    parser.add_argument("--server-batch-size", type=int, default=defaults.server_batch_size)
    parser.add_argument(
        "--batch-delays",
        type=integers,
        default=defaults.batch_delays_ms,
        help="TorchServe maxBatchDelay values to serve with, ms: the first gets the full run (default: 1,5)",
    )
    parser.add_argument("--arch", default=defaults.arch, help="a torchvision architecture (default: resnet50)")
    parser.add_argument("--layer", help="the layer to explain (default: the model's default layer)")
    parser.add_argument("--weights", default=defaults.weights, help="imagenet, random or a state_dict path")
    parser.add_argument("--detector", default=defaults.detector, help="the detector row's torchvision builder")
    parser.add_argument("--segmenter", default=defaults.segmenter, help="the segmenter row's torchvision builder")
    parser.add_argument(
        "--audit-images",
        type=lambda text: tuple(int(n) for n in text.split(",")),
        default=defaults.audit_images,
        help="the audit section's two runs, in images (default: 48,240)",
    )
    parser.add_argument(
        "--sections",
        type=lambda text: tuple(text.split(",")),
        default=(),
        help="only these in-process sections, by report field: in_process, methods, sanity, vit, fast_paths, "
        "channels_last, stages, image_work, photos, dense, response_bytes, audit (default: all)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results", help="where the reports go")
    parser.add_argument("--stem", default="bench", help="report file names: STEM.json, STEM.md, STEM.png")
    parser.add_argument(
        "--readme-figures",
        action="store_true",
        help="only regenerate the docs' generated blocks (docs/performance.md's measured figures, docs/methods.md's "
        "table) from the method registry and docs/bench/*.json, then exit",
    )
    args = parser.parse_args(argv)
    if args.readme_figures:
        changed = regenerate(ROOT)
        print("rewrote " + ", ".join(str(path.relative_to(ROOT)) for path in changed) if changed else "up to date")
        return 0

    config = BenchConfig(
        device=args.device,
        batch_sizes=args.batch_sizes,
        repeats=args.repeats,
        warmup=args.warmup,
        agreement_images=args.agreement_images,
        server=not args.no_server,
        concurrency=args.concurrency,
        requests_per_level=args.requests,
        soak_requests=args.soak,
        server_precision=args.server_precision,
        server_channels_last=args.server_channels_last,
        server_compile=args.server_compile,
        server_batch_size=args.server_batch_size,
        batch_delays_ms=args.batch_delays,
        weights=args.weights,
        arch=args.arch,
        layer=args.layer,
        detector=args.detector,
        segmenter=args.segmenter,
        audit_images=args.audit_images,
        sections=args.sections,
    )
    report = run_benchmark(config)
    paths = write_reports(report, args.out, args.stem)
    print(markdown(report))
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
