"""Make the README's overlay pictures with the real service, on a model that really localises.

python scripts/make_pictures.py            # writes docs/pictures/overlays.png (about a minute on two CPU cores)
python scripts/make_pictures.py --zero-shot   # docs/pictures/zero_shot.png: a tiny CLIP, prompts and a reference
python scripts/make_pictures.py --volume      # docs/pictures/volume.png: a trained 3D network's slice montage

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
    parser.add_argument("--zero-shot", action="store_true", help="the zero-shot picture instead (docs/zero-shot.md)")
    parser.add_argument("--volume", action="store_true", help="the 3D montage instead (docs/medical.md)")
    args = parser.parse_args(argv)
    if args.zero_shot:
        out = args.out if args.out.name != "overlays.png" else args.out.with_name("zero_shot.png")
        return zero_shot_picture(out, args.images)
    if args.volume:
        return volume_picture(args.out if args.out.name != "overlays.png" else args.out.with_name("volume.png"))
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


def zero_shot_picture(out: Path, images: int) -> int:
    """A tiny CLIP trained on the synthetic scenes (camtools.synthetic.trained_clip), served in process: each scene
    explained for each colour's prompt, then built as an embedding model and explained for its similarity to a
    one-object reference."""
    import json

    import torch

    from camserve.cam import CamEngine
    from camserve.pipeline import ExplanationService
    from camtools.models import prepare_model
    from camtools.synthetic import CLIP_PROMPTS, clip_scenes, make_scene, trained_clip

    def served(prepared):
        spec = prepared.spec
        engine = CamEngine(prepared.model, input_size=spec.input_size, default_layer=spec.default_layer)
        return ExplanationService(engine, spec, torch.device("cpu"))

    def big(image):
        return cv2.resize(image, (SHOWN, SHOWN), interpolation=cv2.INTER_NEAREST)

    with tempfile.TemporaryDirectory(prefix="pictures-") as scratch:
        folder, accuracy = trained_clip(Path(scratch) / "clip")
        print(f"tiny CLIP: {accuracy:.1%} of held-out scenes with every prompt right")
        (Path(scratch) / "prompts.txt").write_text("\n".join(CLIP_PROMPTS) + "\n")
        zero_shot = served(prepare_model(hf=folder, prompts=Path(scratch) / "prompts.txt"))
        embedding = served(prepare_model(hf=folder, task="embedding"))
        scenes = [s for s in clip_scenes(40, seed=21)[0] if len(s.boxes) == 2][:images]
        rows = []
        for n, scene in enumerate(scenes):
            data = encode_image(big(scene.image), "png")
            fields = {"data": bytearray(data), "format": b"png", "target": b"0,1,2"}
            fields["prompts"] = bytearray(json.dumps(list(CLIP_PROMPTS)).encode())
            (answer,) = zero_shot.answer([fields])
            tiles, captions = [big(scene.image)], ["image"]
            for explanation in answer.body["explanations"]:
                tiles.append(decode_image(base64.b64decode(explanation["overlay"])))
                captions.append(f"'{explanation['label']}' p={explanation['probability']:.2f}")
            colour = sorted(scene.boxes)[n % 2]
            reference = big(make_scene(np.random.default_rng(100 + n), (colour,)).image)
            asked = {"data": bytearray(data), "reference": bytearray(encode_image(reference, "png")), "format": b"png"}
            (similar,) = embedding.answer([asked])
            (explanation,) = similar.body["explanations"]
            tiles += [reference, decode_image(base64.b64decode(explanation["overlay"]))]
            captions += ["reference", f"similarity {explanation['similarity']:.2f}"]
            rows.append(render_contact_sheet(tiles, captions, height=SHOWN // 2 + 32))
    width = max(row.shape[1] for row in rows)
    padded = [np.pad(row, ((0, 8), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_image(np.vstack(padded), "png"))
    print(f"wrote {out}")
    return 0


def volume_picture(out: Path) -> int:
    """The synthetic volumes' 3D network, trained (camtools.synthetic.trained_volume_model), served in process: a
    volume with a ball, explained for its class "ball"; the montage as the service returned it, with the ball's true
    box and the peak in the caption."""
    import gzip

    import nibabel
    import torch

    from camserve.cam import CamEngine
    from camserve.pipeline import ExplanationService
    from camtools.synthetic import make_volume, trained_volume_model

    with tempfile.TemporaryDirectory(prefix="pictures-") as scratch:
        prepared, accuracy = trained_volume_model(Path(scratch))
        print(f"3D network: {accuracy:.1%} held-out accuracy")
        spec = prepared.spec
        engine = CamEngine(prepared.model, input_size=spec.input_size, default_layer=spec.default_layer)
        service = ExplanationService(engine, spec, torch.device("cpu"))
        rng = np.random.default_rng(8)
        ball = next(v for v in (make_volume(rng) for _ in range(20)) if v.label == 1)
        data = gzip.compress(nibabel.Nifti1Image(ball.voxels, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes())
        (answer,) = service.answer([{"data": bytearray(data), "target": b"1", "format": b"png"}])
    explanation = answer.body["explanations"][0]
    montage = decode_image(base64.b64decode(explanation["overlay"]))
    box = ", ".join(f"{low}-{high - 1}" for low, high in ball.box)
    peak = explanation["peak"]
    caption = (
        f"'ball' p={explanation['probability']:.2f}: slices k, j, i through the peak voxel {peak['voxel']} (world "
        f"{peak['world']} mm); the ball: i, j, k in {box}"
    )
    sheet = render_contact_sheet([montage], [caption], height=montage.shape[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_image(sheet, "png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
