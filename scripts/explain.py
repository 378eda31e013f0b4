"""Explain images offline, with no server: the original script's flow on the service's own engine and imaging.

python scripts/explain.py cat.jpg photos/ --target 281 --method gradcam --layer layer4 --weights imagenet --show

For each image it writes one overlay per target and a contact sheet (the original, then each overlay labelled with
its class and probability) into --out.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from handler.archive import weights_for_cli  # noqa: E402
from handler.cam import METHODS, CamEngine  # noqa: E402
from handler.contract import ModelInfo  # noqa: E402
from handler.imaging import decode_image, encode_image, render_contact_sheet  # noqa: E402
from handler.model import build_resnet50, imagenet_labels, select_device  # noqa: E402
from handler.pipeline import ExplanationService  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_paths(inputs: list[Path]) -> list[Path]:
    paths = []
    for given in inputs:
        if given.is_dir():
            paths += sorted(p for p in given.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(given)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--target", help="class index or comma-separated list (default: the top-1 class)")
    parser.add_argument("--explain", type=int, help="without --target: explain the N top classes (1-5)")
    parser.add_argument("--method", default="gradcam", choices=METHODS)
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--colormap", default="jet")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--weights", default="imagenet", help="imagenet, random or a resnet50 state_dict path")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("explanations"))
    parser.add_argument("--show", action="store_true", help="open each contact sheet in a matplotlib window")
    args = parser.parse_args(argv)

    state_dict, weights = weights_for_cli(args.weights)
    device = select_device(0) if args.device.startswith("cuda") else torch.device("cpu")
    model = build_resnet50(state_dict, channels_last=True).to(device)
    service = ExplanationService(
        engine=CamEngine(model),
        labels=imagenet_labels(),
        model_info=ModelInfo("resnet50", "offline", weights),
        device=device,
        channels_last=True,
    )
    options = {"method": args.method, "layer": args.layer, "topk": args.topk, "colormap": args.colormap}
    options |= {"alpha": args.alpha, "format": "png"}
    options |= {"target": args.target} if args.target else {"explain": args.explain} if args.explain else {}
    args.out.mkdir(parents=True, exist_ok=True)
    paths = image_paths(args.inputs)
    failures = 0
    for path in tqdm(paths, desc="explaining", unit="image", disable=len(paths) < 2):
        row = {"data": path.read_bytes(), **{key: str(value).encode() for key, value in options.items()}}
        (result,) = service.answer([row])
        if result.status != 200:
            print(f"{path}: {result.body['message']}", file=sys.stderr)
            failures += 1
            continue
        tiles, captions = [decode_image(row["data"])], [f"{path.name}  ({weights} weights)"]
        top = result.body["predictions"][0]
        tqdm.write(f"{path}: top-1 {top['label']} ({top['probability']:.3f})")
        for explanation in result.body["explanations"]:
            overlay = base64.b64decode(explanation["overlay"])
            name = f"{path.stem}_{explanation['index']}_{explanation['label'].replace(' ', '_')}.png"
            (args.out / name).write_bytes(overlay)
            tiles.append(decode_image(overlay))
            captions.append(f"{explanation['label']} p={explanation['probability']:.3g} ({explanation['method']})")
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
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
