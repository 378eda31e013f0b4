"""Lay out the model storage that KServe's TorchServe runtime expects, ready to upload to the storageUri:

    OUT/config/config.properties
    OUT/config/metrics.yaml
    OUT/model-store/NAME.mar

python scripts/kserve_storage.py --weights imagenet --protocol v1 --out kserve_storage
python scripts/kserve_storage.py --arch convnext_tiny --weights finetuned.pt --labels labels.txt --model-name pets

The model flags are the build's (scripts/build_mar.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from camtools.archive import ServingConfig, build_archive
from camtools.kserve import write_kserve_storage
from camtools.models import add_model_arguments, model_for_cli

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--model-name", help="the model's name in the pod (default: the arch's name)")
    parser.add_argument("--protocol", choices=("v1", "v2"), default="v1", help="KServe's inference protocol")
    parser.add_argument("--workers", type=int, default=1, help="TorchServe workers per pod (default: 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "kserve_storage", help="(default: kserve_storage/)")
    args = parser.parse_args(argv)
    prepared = model_for_cli(args, model_name=args.model_name)
    with tempfile.TemporaryDirectory() as scratch:
        # batchSize 1: TorchServe's KServe envelopes read only the first request of a batch.
        mar = build_archive(prepared, scratch, config=ServingConfig(batch_size=1, workers=args.workers))
        out = write_kserve_storage(mar, args.out, args.protocol, args.workers)
    print(f"wrote {out}/config/config.properties and {out}/model-store/{mar.name} (weights: {prepared.spec.weights})")
    print(
        f"upload {out} to the InferenceService's storageUri, then: kubectl apply -f deploy/kserve/inferenceservice.yaml"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
