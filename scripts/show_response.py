"""Print a service response's predictions and write its overlays: python scripts/show_response.py response.json."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

from camtools.pictures import describe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("response", type=Path, help="a JSON response of /predictions/<model>")
    parser.add_argument("--out", type=Path, help="where the overlay files go (default: beside the response file)")
    args = parser.parse_args(argv)
    out = args.out or args.response.parent

    response = json.loads(args.response.read_text())
    if "predictions" not in response:
        print(f"the service answered with an error: {json.dumps(response)}", file=sys.stderr)
        return 1
    model = response["model"]
    print(f"model {model['name']} v{model['version']} ({model.get('task', 'multiclass')}), weights: {model['weights']}")
    if model["weights"] == "random":
        print("  WARNING: random weights: these predictions and heatmaps mean nothing.")
    print(f"image {response['image']['width']}x{response['image']['height']}")
    for rank, prediction in enumerate(response["predictions"], start=1):
        print(f"  {rank}. {prediction['label']:<28} {describe(prediction)}  (index {prediction['index']})")
    out.mkdir(parents=True, exist_ok=True)
    for explanation in response["explanations"]:
        stem = f"overlay_{explanation['index']}_{explanation['label'].replace(' ', '_')}"
        path = out / f"{stem}.{explanation['format']}"
        path.write_bytes(base64.b64decode(explanation["overlay"]))
        print(f"wrote {path} ({explanation['method']} at {explanation['layer']} for '{explanation['label']}')")
        if "heatmap" in explanation:
            heatmap_path = out / f"{stem}_heatmap16.png"
            heatmap_path.write_bytes(base64.b64decode(explanation["heatmap"]))
            print(f"wrote {heatmap_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
