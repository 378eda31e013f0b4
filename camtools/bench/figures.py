"""The docs' generated blocks from benchmark runs: docs/performance.md's measured figures and docs/methods.md's
table."""

from __future__ import annotations

import json
from pathlib import Path

from camserve.cam import METHODS
from camtools.bench.report import loaded_stages, markdown_table

FIGURES_START = "<!-- figures:start"


FIGURES_END = "<!-- figures:end -->"


FIGURE_RUNS = {"docs/bench/bench.json": "two CPU cores", "docs/bench/bench_cuda.json": "NVIDIA H100"}
"""The benchmark runs whose figures the README quotes, each the one source of its numbers."""


def readme_figures(root: Path) -> str:
    """The README's block of measured figures, generated from the benchmark runs in :data:`FIGURE_RUNS`, so that
    every section quotes the same run and says which it was."""
    runs = {path: json.loads((root / path).read_text()) for path in FIGURE_RUNS}

    def device(path: str) -> str:
        machine = runs[path]["machine"]
        name = machine["gpu"] or f"{machine['cores']} {machine['cpu']} cores"
        return f"{name}, torch {machine['torch']} (`{path}`)"

    def per_batch(path: str, contender: str, key: str, digits: int) -> str:
        rows = [r for r in runs[path]["in_process"] if r["contender"] == contender]
        return " / ".join(f"{r[key]:.{digits}f}" for r in rows)

    def batches(path: str) -> str:
        return "/".join(str(r["batch"]) for r in runs[path]["in_process"] if r["contender"].startswith("floor"))

    def peer(path: str) -> str:
        rows = runs[path]["in_process"]
        ours = {r["batch"]: r["seconds"] for r in rows if r["contender"] == "engine: Grad-CAM"}
        theirs = {r["batch"]: r["seconds"] for r in rows if r["contender"].startswith("pytorch-grad-cam")}
        return " / ".join(f"{theirs[b] / ours[b]:.2f}" for b in ours)

    def service(path: str) -> str:
        levels = runs[path]["service"]
        best = max(levels, key=lambda level: level["images_per_s"])
        return f"{best['images_per_s']:.1f} at concurrency {best['concurrency']}"

    def latency(path: str) -> str:
        single = next(level for level in runs[path]["service"] if level["concurrency"] == 1)
        return f"{single['p50_ms']:.0f}"

    def memory(path: str) -> str:
        m = runs[path]["memory"]
        return f"{m['rss_after_warmup_mb']:.0f} → {m['rss_after_mb']:.0f} ({m['requests']} requests)"

    def target(path: str, prefix: str) -> str:
        """A service target of the run (its device's), or why there is none: runs before the targets existed."""
        on_gpu = str(runs[path]["machine"]["device"]).startswith("cuda")
        if on_gpu != prefix.startswith("GPU"):
            return ""
        found = next((t for t in runs[path]["targets"] if t["measure"].startswith(prefix)), None)
        if found is None:
            return "not measured (an older run)"
        return f"{found['value']:.2f} (wanted {found['target'].replace('>=', '≥').replace('<=', '≤')})"

    def profile(path: str) -> str:
        prof = runs[path].get("profile") or {}
        if "handler_ms" not in prof:
            return "not measured (an older run)"
        handler = ", ".join(f"{stage} {prof[f'{stage}_ms']:.1f}" for stage in ("decode", "forward", "cam", "encode"))
        return (
            f"{prof['client_p50_ms']:.1f} = handler {prof['handler_ms']:.1f} ({handler}) + worker protocol "
            f"{prof['worker_protocol_ms']:.1f} + queue {prof['queue_ms']:.1f} + HTTP and frontend "
            f"{prof['http_and_frontend_ms']:.1f}"
        )

    def loaded(path: str) -> str:
        prof = runs[path].get("profile") or {}
        if "loaded_handler_ms_per_image" not in prof:
            return "not measured (an older run)"
        levels = runs[path].get("service") or [{}]
        return loaded_stages(prof, levels[-1].get("floor_ms_per_image"))

    def response_bytes(path: str) -> str:
        rows = {r["step"].split(": ")[1]: r["us_per_response"] for r in runs[path].get("response_bytes") or []}
        if not rows:
            return "not measured (an older run)"
        standard, fast = rows["json.dumps(indent=2), TorchServe's"], rows["orjson.dumps"]
        return (
            f"JSON {standard:.0f} → {fast:.0f} (orjson); base64 "
            f"{rows['base64.b64encode']:.0f} → {rows['pybase64.b64encode']:.0f} (pybase64)"
        )

    def batch_delays(path: str) -> str:
        rows = runs[path].get("batch_delays") or []
        if not rows:
            return "not measured (an older run)"
        return "; ".join(
            f"{r['batch_delay_ms']} ms, concurrency {r['concurrency']}: {r['images_per_s']:.1f}/s, "
            f"p50 {r['p50_ms']:.0f}"
            for r in rows
        )

    def channels_last(path: str) -> str:
        rows = runs[path].get("channels_last") or []
        return " / ".join(f"{r['speedup']:.2f}× (batch {r['batch']})" for r in rows) or "not measured (an older run)"

    paths = list(FIGURE_RUNS)

    def ratios(contender: str, key: str = "ratio_to_floor", digits: int = 2) -> list[str]:
        return [per_batch(p, contender, key, digits) for p in paths]

    rows = [
        ("batch sizes", *(batches(p) for p in paths)),
        ("forward pass, ms per image, by batch", *ratios("floor: torchvision forward", "ms_per_image", 1)),
        ("Grad-CAM ÷ forward, in process, by batch", *ratios("engine: Grad-CAM")),
        ("Grad-CAM + overlay encoding ÷ forward, by batch", *ratios("engine: Grad-CAM + overlay encoding")),
        ("pytorch-grad-cam ÷ Grad-CAM, by batch", *(peer(p) for p in paths)),
        ("service, images/s at its best concurrency", *(service(p) for p in paths)),
        ("service p50 at concurrency 1, ms", *(latency(p) for p in paths)),
        ("CPU: p50 at concurrency 1 − fp32 forward at batch 1, ms", *(target(p, "CPU: p50") for p in paths)),
        ("CPU: service images/s ÷ fp32 forward images/s at batch 8", *(target(p, "CPU: service") for p in paths)),
        ("GPU: service images/s ÷ in-process Grad-CAM images/s", *(target(p, "GPU: service") for p in paths)),
        ("GPU: p50 at concurrency 1 − in-process batch 1, ms", *(target(p, "GPU: p50") for p in paths)),
        ("channels_last speed-up of Grad-CAM, by batch", *(channels_last(p) for p in paths)),
        ("a lone request's p50, where it goes, ms", *(profile(p) for p in paths)),
        ("under load, where an image's service time goes, ms", *(loaded(p) for p in paths)),
        ("response bytes, µs per response", *(response_bytes(p) for p in paths)),
        ("maxBatchDelay: images/s and p50 ms", *(batch_delays(p) for p in paths)),
        ("worker RSS after warm-up → after the soak, MB", *(memory(p) for p in paths)),
    ]
    method_names = [row["method"] for row in runs[paths[0]]["methods"]]
    method_rows = []
    for name in method_names:
        cells = []
        for path in paths:
            row = next((r for r in runs[path]["methods"] if r["method"] == name), None)
            cells.append(f"{row['ratio_to_floor']:.2f} (batch {row['batch']})" if row else "")
        method_rows.append((f"`{name}` ÷ forward, timed alone against it", *cells))
    header = ["figure", *(FIGURE_RUNS[p] for p in paths)]
    lines = [
        f"{FIGURES_START} (generated by `python scripts/bench.py --readme-figures` from the runs named in each "
        "column; rerun the benchmark, not this block) -->",
        *markdown_table(header, "l" + "r" * len(paths), [*rows, *method_rows])[1:],
        "",
        f"Runs: {'; '.join(device(p) for p in paths)}. Seeded random weights. The in-process rows time four "
        "contenders round-robin; the method rows time each method against the forward pass alone in the same run, "
        "so the two Grad-CAM ratios are two timings of one call and differ by that run's noise.",
        FIGURES_END,
    ]
    return "\n".join(lines)


COSTS_START = "<!-- methods:start"


COSTS_END = "<!-- methods:end -->"


COSTS_RUN = "docs/bench/bench.json"
"""The benchmark run whose method rows docs/methods.md's table quotes."""


def methods_table(root: Path) -> str:
    """docs/methods.md's table of every method: its record (family, formula, needs) and its measured cost from
    :data:`COSTS_RUN`; a method the run did not time says what it costs in passes."""
    run = json.loads((root / COSTS_RUN).read_text())
    machine = run["machine"]
    timed = {row["method"]: row for row in run["methods"]}
    on_vit = {row["method"]: row for row in run.get("vit", []) if row["method"] not in timed}
    engine = _Counting(run["config"].get("scorecam_channels", 64))
    rows = []
    for record in METHODS.values():
        row = timed.get(record.name)
        if row:
            cost = f"{row['ratio_to_floor']:.2f}"
        elif record.name in on_vit:
            cost = f"{on_vit[record.name]['ratio_to_floor']:.2f} on ViT-B/16, at its last block"
        elif record.applies is not None:
            cost = "not timed: does not apply to a ResNet"
        else:
            cost = f"not timed: {engine.passes(record)} passes"
        rows.append((f"`{record.name}`", str(record.family), record.formula, record.needs, cost))
    lines = [
        f"{COSTS_START} (generated by `python scripts/bench.py --readme-figures` from the method registry and "
        f"`{COSTS_RUN}`) -->",
        *markdown_table(["method", "family", "what it computes", "needs", "× forward pass"], "lllll", rows)[1:],
        "",
        f"Cost: measured at `{run['config']['layer']}` of a ResNet-50 with seeded random weights on {machine['cores']} "
        f"{machine['cpu']} cores (torch {machine['torch']}), each method timed round-robin against the plain forward "
        "pass at the same batch (8; the perturbation methods one image, 64 channels). Not timed: the methods over "
        "the default budget of 100 passes per image (their passes at 224 pixels and 64 channels are given), and "
        "`faithfulness`, 2S + 1 extra passes per explanation (33 at S = 16); all are counted in the work budget.",
        *_sanity_costs(run),
        COSTS_END,
    ]
    return "\n".join(lines)


def _sanity_costs(run: dict) -> list[str]:
    """The cost note's line on the ``sanity`` option, from the run's sanity rows (none in older runs)."""
    rows = run.get("sanity") or []
    if not rows:
        return []
    cases = "; ".join(
        f"`{row['method']}` at `{row['layer']}` {row['ratio_to_floor']:.2f} → {row['with_sanity_ratio_to_floor']:.2f}"
        for row in rows
    )
    return [
        "",
        f"`sanity` (one more pass of the model after the layer, batched; none for an activation-only method), in the "
        f"same run, × forward pass without → with it at batch {rows[0]['batch']}: {cases}.",
    ]


class _Counting:
    """What a method record's pass count reads of an engine: ResNet-50's ``layer4`` (2048 channels) at 224 pixels."""

    input_size = 224

    def __init__(self, scorecam_channels: int) -> None:
        self.scorecam_channels = scorecam_channels

    def spatial_layer(self, _layer):
        from types import SimpleNamespace

        return SimpleNamespace(grid=(2048, 7, 7))

    default_layer = "layer4"

    def passes(self, record) -> int:
        from camserve.cam import CamRequest

        return record.forward_passes(self, CamRequest(method=record.name))


def replace_readme_block(readme: str, start_marker: str, end_marker: str, block: str) -> str:
    start, end = readme.index(start_marker), readme.index(end_marker) + len(end_marker)
    return readme[:start] + block + readme[end:]
