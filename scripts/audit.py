"""Audit a whole dataset: every image explained by an archive's service on Ray Data, and the classes that answer
from the wrong evidence found (docs/audit.md).

python scripts/audit.py IMAGES --archive model_store/NAME.mar --out DIR \
    [--method M] [--layer L] [--faithfulness] [--sanity] [--address HOST:PORT] \
    [--batch-size N] [--workers N] [--gpus-per-worker G] [--limit N] [--resume]
python scripts/audit.py --synthetic --out DIR   # ShapesNet with a planted shortcut, audited with and without boxes

IMAGES: a folder of class subfolders, a folder of unlabelled images, a CSV ``file,class[,x0,y0,x1,y1]`` (files
relative to the CSV's folder; a box in the original image's pixels) or a Parquet file or dataset with those columns;
local or any URI Ray Data reads (s3://, gs://). It writes DIR/explanations (Parquet, one row per image),
DIR/summary.json, DIR/report.html, DIR/report.md and DIR/summary.png. Ray runs in-process on this machine's cores,
or joins a cluster with --address (or RAY_ADDRESS).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from camtools.audit.run import AuditError, AuditOptions, audit


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="?", help="class subfolders, unlabelled images, a CSV or Parquet")
    parser.add_argument("--archive", type=Path, help="the .mar that scripts/build_mar.py built")
    parser.add_argument("--out", type=Path, required=True, help="the folder the audit writes")
    parser.add_argument("--method", help="the CAM method (default: the archive's, gradcam)")
    parser.add_argument("--layer", help="the layer (default: the archive's default layer)")
    parser.add_argument("--faithfulness", action="store_true", help="deletion and insertion per image")
    parser.add_argument("--sanity", action="store_true", help="the sanity check's rank correlation per image")
    parser.add_argument("--address", help="join the Ray cluster at HOST:PORT (default: RAY_ADDRESS, else local)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch of an actor (default 8)")
    parser.add_argument("--workers", type=int, help="actors, each loading the archive once (default: the CPUs)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (default 0: CPU)")
    parser.add_argument("--limit", type=int, help="audit only the first N images")
    parser.add_argument("--resume", action="store_true", help="skip the files already in DIR; write the rest")
    parser.add_argument("--object-store-mb", type=int, help="a local Ray's object store, in MiB (default Ray's)")
    parser.add_argument("--synthetic", action="store_true", help="train ShapesNet with a planted shortcut and audit it")
    args = parser.parse_args(argv)
    if not args.synthetic and (args.images is None or args.archive is None):
        parser.error("give IMAGES and --archive, or --synthetic")
    for name in ("batch_size", "workers", "limit", "object_store_mb"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.gpus_per_worker < 0:
        parser.error(f"--gpus-per-worker must be 0 or more, got {args.gpus_per_worker}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    options = AuditOptions(
        method=args.method, layer=args.layer, faithfulness=args.faithfulness, sanity=args.sanity,
        address=args.address, batch_size=args.batch_size, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        limit=args.limit, resume=args.resume, object_store_mb=args.object_store_mb,
    )  # fmt: skip
    try:
        if args.synthetic:
            from camtools.audit.synthetic import shortcut_dataset

            archive, boxes, folders, accuracy = shortcut_dataset(args.out / "data")
            print(f"shortcut model: {accuracy:.1%} held-out accuracy; the tag decides class 'blue'")
            for source, name in ((str(boxes), "with-boxes"), (str(folders), "without-boxes")):
                summary = audit(source, archive, args.out / name, options)
                print(f"{name}: flagged {summary['flagged'] or 'nothing'} -> {args.out / name / 'report.html'}")
            return 0
        summary = audit(args.images, args.archive, args.out, options)
    except AuditError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for item in summary["classes"]:
        if item["flagged"]:
            print(f"flagged {item['class']}: {item['reason']}")
    print(f"report: {args.out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
