"""Build and explain every torchvision classification builder on random weights; write docs/architectures.md.

python scripts/architectures.py                      # all of them (tens of minutes on two cores)
python scripts/architectures.py --archs resnet50 vit_b_16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from camtools.architectures import markdown, survey
from camtools.bench import machine_info
from camtools.models import torchvision_archs

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", help="only these builders (default: every one)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (default: 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "architectures.md", help="(default: %(default)s)")
    args = parser.parse_args(argv)
    archs = args.archs or torchvision_archs()
    with tqdm(total=len(archs), desc="architectures", unit="arch") as progress:
        results = survey(archs, args.repeats, progress)
    info = machine_info(torch.device("cpu"))
    machine = f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(results, machine))
    explained = sum(not r.error for r in results)
    print(f"{explained} of {len(results)} explain; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
