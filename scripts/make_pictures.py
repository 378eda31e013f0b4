"""Make the README's overlay pictures with the real service, on a model that really localises.

python scripts/make_pictures.py            # writes docs/pictures/overlays.png (about a minute on two CPU cores)

It trains ShapesNet on the synthetic shapes task (camtools/synthetic.py: a coloured shape on grey clutter, the class
is the colour), builds its archive with --model-file, starts torchserve, and asks for each overlay of a few held-out
images: heatmap, heatmap with clip, outline, mask, grayscale. The first column shows each image with its true box.
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from camserve.imaging import decode_image, encode_image
from camtools.archive import ServingConfig, build_archive
from camtools.local_server import run_torchserve
from camtools.pictures import render_contact_sheet
from camtools.synthetic import CLASSES, make_samples, trained_shapes_model

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "heatmap": {},
    "heatmap, clip [62, 99.9]": {"clip": "62,99.9"},
    "outline, region 0.1": {"overlay": "outline", "region": "0.1"},
    "mask, alpha 0.8": {"overlay": "mask", "alpha": "0.8"},
    "grayscale": {"overlay": "grayscale"},
}
SHOWN = 256
"""The side the 64-pixel samples are sent at (nearest-neighbour), so that the pictures are legible."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "pictures" / "overlays.png")
    parser.add_argument("--images", type=int, default=3, help="held-out images, one row each (default: 3)")
    args = parser.parse_args(argv)
    samples = make_samples(args.images, seed=1234)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pictures-") as scratch:
        prepared, accuracy = trained_shapes_model(Path(scratch) / "model", progress=True)
        print(f"ShapesNet: {accuracy:.1%} accuracy on 500 held-out images")
        mar = build_archive(prepared, Path(scratch) / "store", ServingConfig(batch_size=1))
        with run_torchserve(mar, Path(scratch) / "server") as server:
            for sample in samples:
                shown = cv2.resize(sample.image, (SHOWN, SHOWN), interpolation=cv2.INTER_NEAREST)
                scale = SHOWN / sample.image.shape[0]
                boxed = shown.copy()
                x0, y0, x1, y1 = (round(v * scale) for v in sample.box)
                cv2.rectangle(boxed, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), 2)
                tiles, captions = [boxed], [f"true: {CLASSES[sample.label]} (box)"]
                for name, fields in VARIANTS.items():
                    files = {"data": ("shape.png", encode_image(shown, "png"))}
                    response = server.predict(files=files, data={"format": "png", "target": sample.label, **fields})
                    response.raise_for_status()
                    explanation = response.json()["explanations"][0]
                    tiles.append(decode_image(base64.b64decode(explanation["overlay"])))
                    captions.append(f"{name} (p={explanation['probability']:.2f})")
                rows.append(render_contact_sheet(tiles, captions, height=SHOWN))
    width = max(row.shape[1] for row in rows)
    padded = [np.pad(row, ((0, 8), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(encode_image(np.vstack(padded), "png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
