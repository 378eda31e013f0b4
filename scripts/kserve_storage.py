"""Lay out the model storage that KServe's TorchServe runtime expects, ready to upload to the storageUri:

    OUT/config/config.properties
    OUT/model-store/resnet50.mar

python scripts/kserve_storage.py --weights imagenet --protocol v1 --out kserve_storage
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handler.archive import ServingConfig, build_archive, weights_for_cli  # noqa: E402
from handler.kserve import write_kserve_storage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="imagenet", help="imagenet, random or a resnet50 state_dict path")
    parser.add_argument("--protocol", choices=("v1", "v2"), default="v1", help="KServe's inference protocol")
    parser.add_argument("--workers", type=int, default=1, help="TorchServe workers per pod")
    parser.add_argument("--out", type=Path, default=ROOT / "kserve_storage")
    args = parser.parse_args(argv)
    state_dict, label = weights_for_cli(args.weights)
    with tempfile.TemporaryDirectory() as scratch:
        # batchSize 1: TorchServe's KServe envelopes read only the first request of a batch.
        mar = build_archive(state_dict, label, scratch, config=ServingConfig(batch_size=1, workers=args.workers))
        out = write_kserve_storage(mar, args.out, args.protocol, args.workers)
    print(f"wrote {out}/config/config.properties and {out}/model-store/{mar.name} (weights: {label})")
    print(
        f"upload {out} to the InferenceService's storageUri, then: kubectl apply -f deploy/kserve/inferenceservice.yaml"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
