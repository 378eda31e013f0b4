"""The audit's report: ``report.html`` (self-contained, its pictures inline), ``report.md`` and ``summary.png`` (each
class's mean map, its peak region and its verdict: the picture in the README and docs/audit.md)."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from camserve.imaging import decode_image, resize_image
from camserve.overlays import render_overlay
from camtools.audit.analysis import ClassFindings
from camtools.audit.worker import read_file

__all__ = ["write_report"]

TILE = 160
EXAMPLES = 4
WORST = 8


def _png(rgb: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def _map_tile(heat: np.ndarray, region: Sequence[float] | None = None, side: int = TILE) -> np.ndarray:
    """A map (any size) as a jet-coloured square tile, with ``region`` (0–1 coordinates) outlined in white."""
    span = float(heat.max() - heat.min())
    scaled = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    levels = cv2.resize((scaled * 255).astype(np.uint8), (side, side), interpolation=cv2.INTER_LINEAR)
    tile = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    if region is not None:
        x0, y0, x1, y1 = (int(round(v * (side - 1))) for v in region)
        cv2.rectangle(tile, (x0, y0), (x1, y1), (255, 255, 255), 2)
    return tile


def _overlay(path: str, heatmap: bytes, box: Sequence[float] | None = None) -> np.ndarray | None:
    """The image at ``path`` with its stored map blended over it, and its object's ``box`` (in the image's pixels)
    drawn in white, as a tile; None if it cannot be read now."""
    try:
        rgb = decode_image(read_file(path))
    except Exception:  # the report goes on without this picture
        return None
    heat = cv2.imdecode(np.frombuffer(heatmap, np.uint8), cv2.IMREAD_UNCHANGED).astype(np.float32) / 65535.0
    display = resize_image(rgb, (heat.shape[1], heat.shape[0]))
    blended = render_overlay(display, heat, 0.5, "jet")
    scale = TILE / max(blended.shape[:2])
    tile = cv2.resize(blended, (max(1, round(blended.shape[1] * scale)), max(1, round(blended.shape[0] * scale))))
    if box is not None:
        sx, sy = tile.shape[1] / rgb.shape[1], tile.shape[0] / rgb.shape[0]
        corners = (round(box[0] * sx), round(box[1] * sy)), (round(box[2] * sx) - 1, round(box[3] * sy) - 1)
        cv2.rectangle(tile, *corners, (255, 255, 255), 1)
    return tile


def _heatmaps(out: Path, files: set[str]) -> dict[str, bytes]:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    if not files:
        return {}
    table = ds.dataset(out / "explanations", format="parquet").to_table(
        columns=["file", "heatmap"], filter=pc.field("file").isin(sorted(files))
    )
    return dict(zip(table.column("file").to_pylist(), table.column("heatmap").to_pylist(), strict=True))


def summary_picture(findings: Sequence[ClassFindings]) -> np.ndarray:
    """Each class's mean map with its peak region, and a band under it: red when flagged, grey otherwise."""
    from PIL import Image, ImageDraw

    tiles = []
    for item in findings:
        tile = _map_tile(item.mean_map, item.peak_region)
        band = np.full((34, TILE, 3), (200, 40, 40) if item.flagged else (90, 90, 90), np.uint8)
        canvas = Image.fromarray(np.concatenate([tile, band]))
        text = f"{item.name}: {'FLAGGED' if item.flagged else 'ok'}"
        detail = f"{item.images} images" + (f", pointing {item.pointing:.2f}" if item.pointing is not None else "")
        draw = ImageDraw.Draw(canvas)
        draw.text((6, TILE + 3), text, fill=(255, 255, 255))
        draw.text((6, TILE + 18), detail, fill=(255, 255, 255))
        tiles.append(np.asarray(canvas))
    gap = np.full((TILE + 34, 6, 3), 255, np.uint8)
    row = [part for tile in tiles for part in (tile, gap)][:-1]
    return np.concatenate(row, axis=1) if row else np.full((TILE, TILE, 3), 255, np.uint8)


def write_report(
    out: Path,
    summary: Mapping[str, object],
    findings: Sequence[ClassFindings],
    rows: Sequence[dict],
    thumbnails: np.ndarray,
    paths: Mapping[str, str],
    boxes: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """``report.html``, ``report.md`` and ``summary.png`` in ``out``. ``rows`` are the ok rows (their order is the
    thumbnails'), ``paths`` each file's location and ``boxes`` its object's box, if any, to draw example overlays."""
    boxes = boxes or {}
    examples = {item.name: _examples(item) for item in findings}
    misclassified = [r for r in rows if r.get("target") is not None and r["predicted"] != r["target"]][:WORST]
    lowest = sorted((r for r in rows if r.get("energy_in_box") is not None), key=lambda r: r["energy_in_box"])[:WORST]
    wanted = {rows[n]["file"] for chosen in examples.values() for members in chosen for n in members}
    wanted |= {r["file"] for r in misclassified + lowest}
    heatmaps = _heatmaps(out, wanted)
    overlays = {}
    for file in wanted:
        tile = _overlay(paths[file], heatmaps[file], boxes.get(file)) if file in paths and file in heatmaps else None
        overlays[file] = _png(tile) if tile is not None else None
    picture = summary_picture(findings)
    cv2.imwrite(str(out / "summary.png"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    (out / "report.html").write_text(_html(summary, findings, rows, examples, overlays, misclassified, lowest, picture))
    (out / "report.md").write_text(_markdown(summary, findings, misclassified, lowest))


def _examples(item: ClassFindings) -> list[list[int]]:
    """Up to EXAMPLES rows (indices into the ok rows) per strategy, the largest strategy first."""
    return [[item.rows[m] for m in strategy.members[:EXAMPLES]] for strategy in item.strategies]


def _cell(value: object, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _class_table(summary: Mapping[str, object]) -> list[list[str]]:
    rows = []
    for item in summary["classes"]:
        region = ", ".join(f"{v:.2f}" for v in item["peak_region"])
        rows.append([
            item["class"], str(item["images"]), _cell(item["accuracy"]), _cell(item["pointing"]),
            _cell(item["energy_in_box"]), f"[{region}]", _cell(item["concentration"]),
            " + ".join(str(n) for n in item["strategies"]), "**flagged**" if item["flagged"] else "",
        ])  # fmt: skip
    return rows


HEADER = ["class", "images", "accuracy", "pointing", "energy in box", "peak region", "peaks there", "strategies", ""]


def _markdown(summary, findings, misclassified, lowest) -> str:
    lines = [
        "# Dataset audit",
        "",
        f"{summary['images']} images ({summary['errors']} errors), accuracy {_cell(summary['accuracy'])}, "
        f"method {summary['method']} at layer `{summary['layer']}`; Ray {summary['engine']['ray']} "
        f"({summary['engine']['address']}, {summary['engine']['workers']} workers), {summary['seconds']} s.",
        "",
        "![Each class's mean map](summary.png)",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _class_table(summary)]
    lines += ["", "## Flagged classes", ""]
    flagged = [item for item in findings if item.flagged]
    lines += [f"- **{item.name}**: {item.reason}." for item in flagged] or ["None."]
    lines += ["", "## Worst cases", ""]
    lines += [f"- misclassified: `{r['file']}` (class {r['label']}, predicted {r['predicted']})" for r in misclassified]
    lines += [f"- lowest energy in the box: `{r['file']}` ({r['energy_in_box']:.2f})" for r in lowest]
    return "\n".join(lines) + "\n"


def _html(summary, findings, rows, examples, overlays, misclassified, lowest, picture) -> str:
    e = html.escape
    image = lambda src, title="": f'<img src="{src}" title="{e(title)}">' if src else ""  # noqa: E731
    figure = lambda src, caption: f"<figure>{image(src, caption)}<figcaption>{e(caption)}</figcaption></figure>"  # noqa: E731
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Dataset audit</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
        ".flag{background:#fde0e0}.strip img{margin:2px;vertical-align:top}h3{margin-bottom:4px}"
        "figure{display:inline-block;margin:2px;vertical-align:top;width:160px}"
        "figcaption{font-size:11px;color:#444}"
        "</style></head><body><h1>Dataset audit</h1>",
        f"<p>{summary['images']} images ({summary['errors']} errors), accuracy {_cell(summary['accuracy'])}, "
        f"method <b>{e(str(summary['method']))}</b> at layer <code>{e(str(summary['layer']))}</code>; "
        f"Ray {e(summary['engine']['ray'])} ({e(str(summary['engine']['address']))}, "
        f"{summary['engine']['workers']} workers), {summary['seconds']} s.</p>",
        f"<p>{image(_png(picture), 'each class: mean map and peak region')}</p>",
        "<h2>Classes</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in HEADER) + "</tr>",
    ]
    for item, cells in zip(summary["classes"], _class_table(summary), strict=True):
        cls = " class='flag'" if item["flagged"] else ""
        parts.append(f"<tr{cls}>" + "".join(f"<td>{e(c).replace('**', '')}</td>" for c in cells) + "</tr>")
    parts.append("</table><h2>Flagged classes</h2>")
    flagged = [item for item in findings if item.flagged]
    if not flagged:
        parts.append("<p>None.</p>")
    for item in flagged:
        shown = [rows[n]["file"] for members in examples[item.name] for n in members]
        strip = "".join(image(overlays.get(f), f) for f in shown[: 2 * EXAMPLES])
        parts.append(f"<h3>{e(item.name)}</h3><p>{e(item.reason)}.</p><div class='strip'>{strip}</div>")
    parts.append("<h2>Strategies (SpRAy)</h2><p>Each class's maps clustered spectrally, the eigengap choosing the "
                 "count: each strategy's prototype (mean map), its size and tightness, and examples.</p>")  # fmt: skip
    for item in findings:
        parts.append(f"<h3>{e(item.name)}{' (flagged)' if item.flagged else ''}</h3><div class='strip'>")
        parts.append(figure(_png(_map_tile(item.mean_map, item.peak_region)), "mean map, peak region"))
        for number, (strategy, members) in enumerate(zip(item.strategies, examples[item.name], strict=True), 1):
            caption = f"strategy {number}: {len(strategy.members)} maps, tightness {strategy.tightness:.2f}"
            parts.append(figure(_png(_map_tile(strategy.prototype, side=96)), caption))
            parts += [image(overlays.get(rows[n]["file"]), rows[n]["file"]) for n in members]
        parts.append("</div>")
    parts.append("<h2>Worst cases</h2><h3>Misclassified</h3><div class='strip'>")
    parts += [image(overlays.get(r["file"]), f"{r['file']}: {r['label']} → {r['predicted']}") for r in misclassified]
    parts.append("</div><h3>Lowest energy in the box</h3><div class='strip'>")
    parts += [image(overlays.get(r["file"]), f"{r['file']}: {r['energy_in_box']:.2f}") for r in lowest]
    parts.append("</div></body></html>")
    return "\n".join(parts)
