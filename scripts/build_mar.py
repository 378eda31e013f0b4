"""Build a TorchServe archive, model_store/<name>.mar, for a torchvision architecture or your own network.

  python scripts/build_mar.py --weights imagenet                       # resnet50, torchvision's weights
  python scripts/build_mar.py --arch convnext_tiny --weights imagenet
  python scripts/build_mar.py --weights finetuned.pt --labels labels.txt --model-name pets
  python scripts/build_mar.py --model-file my_net.py --weights my_net.pt --labels labels.json
  python scripts/build_mar.py --arch fasterrcnn_resnet50_fpn_v2 --weights imagenet     # a COCO detector
  python scripts/build_mar.py --arch deeplabv3_resnet50 --weights imagenet             # a VOC segmenter

The model is validated before anything is written: weights loaded strictly, one label per class, one explanation
of a synthetic image at the default layer, then one synthetic photo through the whole served path (decode, explain,
render). A failure exits with status 2 and says what to fix.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from camserve.api import WorkBudget
from camtools.archive import ServingConfig, build_archive, check_served
from camtools.models import BuildError, add_model_arguments, model_for_cli

ROOT = Path(__file__).resolve().parent.parent

BUDGET_HELP = {
    "max_side": "longer side of the overlays when a request gives no max_side",
    "max_output_pixels": "output pixels x explanations per request",
    "max_forward_passes": "forward passes per request, ScoreCAM's included",
    "max_response_bytes": "largest response body; keep it at or under TorchServe's max_response_size",
    "max_output_voxels": "a 3D model's volume voxels x explanations per request",
}


def positive_integer(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    defaults = ServingConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument(
        "--model-name", help="the archive NAME.mar and the endpoint /predictions/NAME (default: the arch's name)"
    )
    parser.add_argument(
        "--export-path", default=str(ROOT / "model_store"), help="where the .mar goes (default: model_store/)"
    )
    parser.add_argument("--version", default="1.0", help="the model version responses report (default: 1.0)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    parser.add_argument(
        "--max-batch-delay", type=int, default=defaults.max_batch_delay_ms, help="milliseconds (default: %(default)s)"
    )
    parser.add_argument("--workers", type=int, default=defaults.workers, help="(default: %(default)s)")
    parser.add_argument(
        "--max-image-bytes",
        type=int,
        default=defaults.max_image_bytes,
        help="largest upload, checked before decoding (default: %(default)s)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=defaults.max_image_pixels,
        help="largest width x height an image may declare, checked from its header before decoding "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-voxels",
        type=int,
        default=defaults.max_volume_voxels,
        help="a 3D model's largest volume, in voxels, checked from its NIfTI header before reading (default: "
        "%(default)s)",
    )
    for item in fields(WorkBudget):  # --max-side, --max-output-pixels, --max-forward-passes, --max-response-bytes
        parser.add_argument(
            f"--{item.name.replace('_', '-')}",
            type=int,
            default=getattr(defaults.budget, item.name),
            help=f"{BUDGET_HELP[item.name]} (default: %(default)s)",
        )
    parser.add_argument(
        "--scorecam-channels",
        type=positive_integer,
        default=defaults.scorecam_channels,
        help="channels ScoreCAM and Ablation-CAM score per map, one forward pass each (default: %(default)s)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=defaults.precision,
        help="fp32, or autocast to bf16 (CPU with bf16 support, CUDA) or fp16 (CUDA only)",
    )
    parser.add_argument(
        "--channels-last",
        type=int,
        metavar="N",
        default=defaults.channels_last,
        help="batches of N images or more run in the channels_last memory format; 1: every batch, 0: none "
        "(default: %(default)s, measured on CPU: slower for one image, faster from four)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the network before the default layer (torch.compile, CPU workers): faster batches, after a "
        "compile of about a minute and a half when the worker starts; off by default",
    )
    args = parser.parse_args(argv)

    prepared = model_for_cli(args, model_name=args.model_name, version=args.version)
    config = ServingConfig(
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay,
        workers=args.workers,
        scorecam_channels=args.scorecam_channels,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_volume_voxels=args.max_voxels,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        budget=WorkBudget(**{item.name: getattr(args, item.name) for item in fields(WorkBudget)}),
    )
    try:  # one synthetic photo through the served path: decode, explain, render
        check_served(prepared, config)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    archive = build_archive(prepared, args.export_path, config=config)
    spec = prepared.spec
    batching = f"batchSize {config.batch_size}, maxBatchDelay {config.max_batch_delay_ms} ms"
    print(
        f"wrote {archive}: {spec.arch}, {spec.num_classes} classes, {spec.input_size}px input, default layer "
        f"{spec.default_layer}, weights {spec.weights}, {batching}\n"
        f"endpoint: /predictions/{spec.name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
