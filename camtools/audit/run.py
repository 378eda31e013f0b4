"""The audit: every image of a dataset explained by an archive's explanation service on Ray Data, the rows written
as Parquet, then the per-class findings, ``summary.json`` and the report (``scripts/audit.py`` is its CLI).

Ray runs in-process and local by default (``ray.init()`` with its own temporary folder, on the machine's cores), or
joins a running cluster by ``address``. The work is ``map_batches`` over :class:`~camtools.audit.worker.Explainer`,
a callable class that loads the archive once per actor, in an actor pool; Ray Data streams the rows with
backpressure, so memory stays bounded for any dataset size, and retries the batches of an actor that dies.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camserve.cam import DEFAULT_METHOD
from camserve.tasks import TASKS
from camtools.audit.analysis import analyse
from camtools.audit.sources import SourceError, read_source
from camtools.audit.worker import COLUMNS, SCHEMA, THUMBNAIL, Explainer

__all__ = ["AuditError", "AuditOptions", "audit", "read_rows"]

ROWS_PER_FILE = 10_000
"""Rows per Parquet file of ``DIR/explanations``."""
AUDITED_TASKS = tuple(name for name, task in TASKS.items() if task.classifies and task.probabilities)
"""The tasks whose archives an audit explains: a class per image, by probability (a detector's or segmenter's many
are not, nor a regression model's values)."""


class AuditError(ValueError):
    """A wrong archive, source or folder: one line for the user, exit 2."""


@dataclass(frozen=True)
class AuditOptions:
    method: str | None = None
    layer: str | None = None
    faithfulness: bool = False
    sanity: bool = False
    address: str | None = None
    batch_size: int = 8
    workers: int | None = None
    gpus_per_worker: float = 0.0
    limit: int | None = None
    resume: bool = False
    object_store_mb: int | None = None
    pid_folder: str | None = None
    """For the tests: a folder where each actor writes its process id."""


def _archive_spec(archive: Path) -> dict:
    if not archive.is_file():
        raise AuditError(f"--archive {archive} does not exist")
    if not zipfile.is_zipfile(archive):
        raise AuditError(f"--archive {archive} is not a .mar (a zip archive built by scripts/build_mar.py)")
    with zipfile.ZipFile(archive) as packed:
        names = set(packed.namelist())
        if "model_spec.json" not in names or "MAR-INF/MANIFEST.json" not in names:
            raise AuditError(f"--archive {archive} has no model_spec.json: build it with scripts/build_mar.py")
        spec = json.loads(packed.read("model_spec.json"))
    if spec.get("task", "multiclass") not in AUDITED_TASKS:
        raise AuditError(
            f"--archive {archive} is a {spec['task']} model: the audit explains classifiers "
            f"({', '.join(AUDITED_TASKS)}), one class per image"
        )
    return spec


def _item(row: dict) -> dict:
    """A source row as the actors take it: plain columns, no nulls in numbers (target −1, a box's corners NaN)."""
    box = row["box"] or (float("nan"),) * 4
    target = -1 if row["target"] is None else int(row["target"])
    item = {"path": row["path"], "file": row["file"], "label": row["label"], "target": target}
    return item | dict(zip(("x0", "y0", "x1", "y1"), (float(v) for v in box), strict=True))


def _write(explained, folder: Path) -> None:
    """Stream the explained rows into Parquet files in ``folder``, written here as they arrive: Ray Data's own
    writer would start a worker process of its own once the actors have finished (about 10 s on two cores), for
    no gain in a job whose rows are small. New files never replace a resumed run's."""
    import uuid

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    run = uuid.uuid4().hex[:8]
    writer, part, rows = None, 0, 0
    try:
        for batch in explained.iter_batches(batch_size=None, batch_format="pyarrow"):
            table = pa.Table.from_batches(batch.to_batches(), schema=SCHEMA) if batch.num_rows else None
            if table is None:
                continue
            if writer is None:
                writer = pq.ParquetWriter(folder / f"part-{run}-{part:05d}.parquet", SCHEMA)
            writer.write_table(table)
            rows += table.num_rows
            if rows >= ROWS_PER_FILE:
                writer.close()
                writer, part, rows = None, part + 1, 0
    finally:
        if writer is not None:
            writer.close()


def read_rows(out: Path, columns: list[str] | None = None) -> list[dict]:
    """The rows in ``out/explanations`` (all columns, or ``columns``)."""
    import pyarrow.parquet as pq

    folder = out / "explanations"
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        return []
    return pq.read_table(folder, columns=columns).to_pylist()


def _init_ray(options: AuditOptions) -> tuple[str, str | None]:
    """Start or join Ray; the address in words and a temporary folder to remove after a local run."""
    import ray

    import camserve
    import camtools

    # The actors import camserve and this package from the runtime environment, never from a checkout.
    runtime_env = {"py_modules": [camserve, camtools], "env_vars": {"PYTHONWARNINGS": "ignore"}}
    address = options.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return "already running", None
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        return address, None
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    memory = options.object_store_mb * 1024 * 1024 if options.object_store_mb else None
    ray.init(
        runtime_env=runtime_env, _temp_dir=temp, object_store_memory=memory, include_dashboard=False,
        log_to_driver=False,
    )  # fmt: skip
    return "local", temp


def audit(images: str, archive: Path, out: Path, options: AuditOptions = AuditOptions(), progress=print) -> dict:
    """Audit ``images`` with ``archive``'s model into ``out``; return the summary (also ``out/summary.json``)."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    started = time.perf_counter()
    spec = _archive_spec(Path(archive))
    labels = tuple(spec["labels"])
    try:
        rows = read_source(str(images), labels)
    except SourceError as error:
        raise AuditError(str(error)) from None
    if options.limit is not None:
        rows = rows[: options.limit]
    out = Path(out)
    done = {row["file"] for row in read_rows(out, ["file"])} if options.resume else set()
    if not options.resume and (out / "explanations").exists():
        shutil.rmtree(out / "explanations")
    todo = [row for row in rows if row["file"] not in done]
    out.mkdir(parents=True, exist_ok=True)
    request = {"method": options.method, "layer": options.layer}
    request |= {"faithfulness": "true"} if options.faithfulness else {}
    request |= {"sanity": "true"} if options.sanity else {}
    address, temp = _init_ray(options)
    try:
        workers = options.workers or max(1, int(ray.available_resources().get("CPU", 1)))
        if todo:
            items = [_item(row) for row in todo]
            dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(todo) // options.batch_size, 200)))
            explained = dataset.map_batches(
                Explainer,
                fn_constructor_args=(
                    str(Path(archive).resolve()),
                    request,
                    options.gpus_per_worker > 0,
                    options.pid_folder,
                ),
                batch_size=options.batch_size,
                batch_format="numpy",
                compute=ActorPoolStrategy(size=workers),
                num_gpus=options.gpus_per_worker or None,
                num_cpus=1,
            )  # Ray Data restarts a dead actor and retries its tasks by default (max_restarts, max_task_retries −1)
            _write(explained, out / "explanations")
        engine = {"ray": ray.__version__, "address": address, "workers": workers}
    finally:
        if temp is not None:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
    seconds = time.perf_counter() - started
    paths = {row["file"]: row["path"] for row in rows}
    boxes = {row["file"]: row["box"] for row in rows if row["box"] is not None}
    summary = summarise(out, spec, options, engine, seconds, len(todo), paths, boxes)
    progress(
        f"audited {len(todo)} image{'s' if len(todo) != 1 else ''} ({summary['images']} in {out}): "
        f"{summary['errors']} error{'s' if summary['errors'] != 1 else ''}, {seconds:.1f} s, "
        f"{len(todo) / seconds:.2f} images/s"
    )
    return summary


def summarise(
    out: Path,
    spec: dict,
    options: AuditOptions,
    engine: dict,
    seconds: float,
    new: int,
    paths: dict[str, str],
    boxes: dict[str, tuple[float, ...]],
) -> dict:
    """``summary.json``, ``report.html`` and ``report.md`` from every row in ``out/explanations``; ``paths``, each
    file's location, and ``boxes``, its object's box, for the report's example overlays."""
    from camtools.audit.report import write_report

    rows = read_rows(out, [c for c in COLUMNS if c != "heatmap"])
    ok = [row for row in rows if row["status"] == "ok"]
    for row in ok:  # a given class is the class explained
        row["target"] = row["explained"] if row["label"] is not None else None
    thumbnails = np.zeros((len(ok), THUMBNAIL, THUMBNAIL), np.float32)
    for n, row in enumerate(ok):
        thumbnails[n] = np.frombuffer(row["thumbnail"], np.float32).reshape(THUMBNAIL, THUMBNAIL)
    findings = analyse(ok, thumbnails, spec["labels"])
    labelled = [row for row in ok if row["target"] is not None]
    summary = {
        "images": len(rows),
        "errors": len(rows) - len(ok),
        "accuracy": round(float(np.mean([r["predicted"] == r["target"] for r in labelled])), 4) if labelled else None,
        "method": options.method or DEFAULT_METHOD,
        "layer": options.layer or spec["default_layer"],
        "model": {"name": spec.get("name"), "arch": spec.get("arch"), "weights": spec.get("weights")},
        "classes": [item.summary() for item in findings],
        "flagged": [item.name for item in findings if item.flagged],
        "engine": engine,
        "seconds": round(seconds, 2),
        "new_images": new,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out, summary, findings, ok, thumbnails, paths, boxes)
    return summary
