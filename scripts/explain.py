"""Explain images offline, with no server, on the service's own engine, options and imaging.

python scripts/explain.py demo_output/chelsea.jpg photos/ --target 281 --method gradcam --weights imagenet --show
python scripts/explain.py photos/ --arch convnext_tiny --weights finetuned.pt --labels labels.txt
python scripts/explain.py photos/ --model-file my_net.py --weights my_net.pt --layer features.3
python scripts/explain.py street.jpg --arch fasterrcnn_resnet50_fpn_v2 --weights imagenet --explain 3
python scripts/explain.py street.jpg --arch deeplabv3_resnet50 --weights imagenet
python scripts/explain.py photos/ --hf clip-vit-base-patch32/ --prompts prompts.txt --target 0,1
python scripts/explain.py query.jpg --hf clip-vit-base-patch32/ --task embedding --reference item.jpg

The model flags are the build's (scripts/build_mar.py). For each image it prints the top-k predictions (a
detector's detections, a segmenter's segments) and writes one overlay per target (per detection, per segment), a
segmenter's class mask, and a contact sheet (the original, then each overlay labelled with its class and figure)
into --out.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from camserve.cam import DEFAULT_METHOD, DETECTION_METHOD, METHODS, CamEngine
from camserve.imaging import decode_image, encode_image
from camserve.pipeline import ExplanationService
from camserve.tasks import task_named
from camtools.models import add_model_arguments, model_for_cli
from camtools.pictures import describe, render_contact_sheet

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}


def image_paths(inputs: list[Path]) -> list[Path]:
    paths = []
    for given in inputs:
        if given.is_dir():
            paths += sorted(p for p in given.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(given)
    return paths


def summary(body: dict) -> str:
    """A response's predictions, detections or segments on one line."""
    if "detections" in body:
        found = [
            f"#{d['index']} {d['label']} {describe(d)} at {[round(v) for v in d['box']]}" for d in body["detections"]
        ]
        return ", ".join(found) or "no detection above the score threshold"
    if "segments" in body:
        return ", ".join(f"{s['label']} ({s['class']}) {describe(s)}" for s in body["segments"])
    if "similarities" in body:
        return ", ".join(f"{s['label']} {describe(s)}" for s in body["similarities"])
    return ", ".join(f"{p['label']} ({p['index']}) {describe(p)}" for p in body["predictions"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    add_model_arguments(parser)
    parser.add_argument("--target", help="class index or comma-separated list (default: the top-1 class)")
    parser.add_argument("--explain", type=int, help="without --target: explain the N top classes, 1-5 (default: 1)")
    parser.add_argument(
        "--method", choices=METHODS, help=f"(default: {DEFAULT_METHOD}; a detector's: {DETECTION_METHOD})"
    )
    parser.add_argument("--topk", type=int, default=5, help="a classifier's predictions printed per image (default: 5)")
    parser.add_argument("--detection", help="a detector's detections to explain, by index: 0 or 0,2 (default: the top)")
    parser.add_argument("--score-threshold", type=float, help="a detector's lowest score returned (default: 0.5)")
    parser.add_argument("--max-detections", type=int, help="a detector's most detections returned (default: 20)")
    parser.add_argument(
        "--sanity",
        action="store_true",
        help="check each map against the model randomised after the layer (docs/methods.md, Sanity)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        action="append",
        metavar="IMG",
        help="an embedding model's reference image, its similarity explained (repeat for more); a zero-shot "
        "model's sentences are --prompts FILE",
    )
    parser.add_argument("--colormap", default="jet", help="an OpenCV colormap name (default: jet)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap weight in the overlay (default: 0.5)")
    parser.add_argument(
        "--device", default="cuda:0" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, default=Path("explanations"), help="(default: explanations/)")
    parser.add_argument("--show", action="store_true", help="open each contact sheet in a matplotlib window")
    args = parser.parse_args(argv)

    prepared = model_for_cli(args, version="offline")
    spec = prepared.spec
    weights = spec.weights
    device = torch.device(args.device)
    model = prepared.model.to(device)
    service = ExplanationService(
        engine=CamEngine(model, input_size=spec.input_size, default_layer=spec.default_layer), spec=spec, device=device
    )
    task = task_named(spec.task)
    options = {"colormap": args.colormap, "alpha": args.alpha, "format": "png", "method": args.method}
    options |= {"topk": args.topk} if task.classifies else {}
    options |= {"detection": args.detection, "score_threshold": args.score_threshold}
    options |= {"max_detections": args.max_detections, "target": args.target, "explain": args.explain}
    options |= {"sanity": "true"} if args.sanity else {}
    options = {key: value for key, value in options.items() if value is not None}
    args.out.mkdir(parents=True, exist_ok=True)
    paths = image_paths(args.inputs)
    references = [path.read_bytes() for path in args.reference or ()]
    failures: list[str] = []  # one line per file that could not be explained, printed after the progress bar
    for path in tqdm(paths, desc="explaining", unit="image", disable=len(paths) < 2):
        try:
            data = path.read_bytes()
        except OSError as error:
            failures.append(f"{path}: cannot be read: {error.strerror or error}")
            continue
        row = {"data": data, **{key: str(value).encode() for key, value in options.items()}}
        if references:
            row["reference"] = references
        (result,) = service.answer([row])
        if result.status != 200:  # the service speaks of a request's body; here the body is the file
            failures.append(f"{path}: {result.body['message'].replace('the body is not', 'the file is not')}")
            continue
        tiles, captions = [decode_image(row["data"])], [f"{path.name}  ({weights} weights)"]
        tqdm.write(f"{path}: {summary(result.body)}")
        if "mask" in result.body:  # a segmenter's classes per pixel: the PNG as served, and on the sheet
            mask = base64.b64decode(result.body["mask"])
            (args.out / f"{path.stem}_mask.png").write_bytes(mask)
            tqdm.write(f"  wrote {args.out / f'{path.stem}_mask.png'}")
            tiles.append(np.array(Image.open(io.BytesIO(mask)).convert("RGB")))
            captions.append("classes per pixel")
        for explanation in result.body["explanations"]:
            overlay = base64.b64decode(explanation["overlay"])
            which = f"detection{explanation['detection']}_" if "detection" in explanation else ""
            name = f"{path.stem}_{which}{explanation['index']}_{explanation['label'].replace(' ', '_')}.png"
            (args.out / name).write_bytes(overlay)
            tqdm.write(f"  wrote {args.out / name}")
            tiles.append(decode_image(overlay))
            caption = f"{explanation['label']} {describe(explanation)} ({explanation['method']})"
            if "sanity" in explanation:
                figure = explanation["sanity"]["rank_correlation"]
                shown = "flat map" if figure is None else f"{figure:.2f}"
                randomised = ", ".join(explanation["sanity"]["randomised"])
                tqdm.write(f"  sanity: rank correlation {shown} with the map once {randomised} are randomised")
                caption += f" sanity {shown}"
            captions.append(caption)
        sheet = render_contact_sheet(tiles, captions)
        sheet_path = args.out / f"{path.stem}_sheet.png"
        sheet_path.write_bytes(encode_image(sheet, "png"))
        tqdm.write(f"  wrote {sheet_path}")
        if args.show:
            import matplotlib.pyplot as plt

            plt.figure(figsize=(sheet.shape[1] / 100, sheet.shape[0] / 100))
            plt.imshow(sheet)
            plt.axis("off")
            plt.show()
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {len(paths)} images could not be explained", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
