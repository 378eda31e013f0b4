"""Which method for my model? Run every method on labelled images and compare their faithfulness.

python scripts/evaluate.py photos/ --arch convnext_tiny --weights finetuned.pt --labels labels.txt
python scripts/evaluate.py boxes.csv --model-file my_net.py --weights my_net.pt --layers features.3 features.5
python scripts/evaluate.py --synthetic 200          # train ShapesNet on the synthetic task, then evaluate it

The images: a folder with one subfolder per class (named by label or index), or a CSV of rows
``file,class[,x0,y0,x1,y1]`` (with a box, the pointing game is scored too). Each image is explained for its labelled
class with every method, at the default layer and at each of --layers. It writes a markdown table and a plot of mean
deletion, insertion and drop per method (and the pointing game; with --road, ROAD), into --out; with --cascade, the
sanity check's full cascade too (sanity.md, sanity.png): the model randomised block by block from the top down, and
each method's rank correlation with its trained map at each step.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from camserve.cam import METHODS
from camserve.imaging import encode_image
from camtools.evaluate import (
    cascade,
    cascade_blocks,
    cascade_markdown,
    evaluate,
    load_labelled_images,
    markdown,
    plot,
    plot_cascade,
)
from camtools.models import add_model_arguments, model_for_cli


def synthetic_model_and_images(count: int, folder: Path):
    """Train ShapesNet, then write ``count`` held-out images and their boxes as a CSV."""
    from camtools.synthetic import CLASSES, make_samples, trained_shapes_model

    prepared, accuracy = trained_shapes_model(folder / "model", progress=True)
    print(f"ShapesNet: {accuracy:.1%} accuracy on 500 held-out images")
    table = folder / "images.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "class", "x0", "y0", "x1", "y1"])
        for index, sample in enumerate(make_samples(count, seed=4321)):
            name = f"shape_{index:04d}.png"
            (folder / name).write_bytes(encode_image(sample.image, "png"))
            writer.writerow([name, CLASSES[sample.label], *sample.box])
    return prepared, table, accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="?", type=Path, help="a folder of class subfolders, or a CSV")
    add_model_arguments(parser)
    parser.add_argument("--synthetic", type=int, metavar="N", help="train ShapesNet and evaluate N held-out images")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="(default: all)")
    parser.add_argument("--layers", nargs="+", help="layers besides the model's default layer")
    parser.add_argument("--steps", type=int, default=16, help="deletion and insertion steps (default: 16)")
    parser.add_argument("--out", type=Path, default=Path("evaluation"), help="(default: evaluation/)")
    parser.add_argument("--cascade", action="store_true", help="also run the sanity check's full cascade")
    parser.add_argument("--road", action="store_true", help="also score ROAD (about 4 s per map at 224 pixels)")
    args = parser.parse_args(argv)
    if (args.images is None) == (args.synthetic is None):
        parser.error("give a folder or CSV of labelled images, or --synthetic N")
    with tempfile.TemporaryDirectory(prefix="evaluate-") as scratch:
        if args.synthetic:
            prepared, source, accuracy = synthetic_model_and_images(args.synthetic, Path(scratch))
            title = f"ShapesNet on {args.synthetic} synthetic images ({accuracy:.1%} accurate)"
        else:
            prepared, source = model_for_cli(args), args.images
            title = f"{prepared.spec.arch} ({prepared.spec.weights} weights) on {source.name}"
        spec = prepared.spec
        images = load_labelled_images(source, spec.labels)
    layers = [spec.default_layer, *(layer for layer in args.layers or [] if layer != spec.default_layer)]
    with tqdm(total=len(images) * len(args.methods) * len(layers), desc="evaluating", unit="map") as progress:
        scores = evaluate(
            prepared.model, spec, images, args.methods, layers, args.steps, progress=progress, road=args.road
        )
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(scores)
    (args.out / "faithfulness.md").write_text(f"{title}\n\n{table}")
    plot(scores, args.out / "faithfulness.png", title)
    print(table)
    print(f"wrote {args.out / 'faithfulness.md'} and {args.out / 'faithfulness.png'}")
    if args.cascade:
        total = len(images) * len(args.methods) * len(cascade_blocks(prepared.model))
        with tqdm(total=total, desc="randomising", unit="map") as progress:
            steps = cascade(prepared.model, spec, images, args.methods, progress=progress)
        explained = f"{title}, at `{spec.default_layer}`"
        (args.out / "sanity.md").write_text(f"{explained}: mean rank correlation with the trained map\n\n"
                                            f"{cascade_markdown(steps)}")  # fmt: skip
        plot_cascade(steps, args.out / "sanity.png", explained)
        print(cascade_markdown(steps))
        print(f"wrote {args.out / 'sanity.md'} and {args.out / 'sanity.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
