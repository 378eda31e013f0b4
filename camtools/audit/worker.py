"""The audit's Ray Data actor: the archive's explanation service, loaded once per actor, over batches of rows.

It imports only ``camserve`` (which every archive holds whole), numpy, OpenCV and pyarrow, so that a cluster's nodes
need no checkout: the driver ships ``camserve`` and this package to them as Ray's ``runtime_env`` ``py_modules``.
Each row's bytes are read here, not by Ray's readers, so that an unreadable file is that row's error and rows out
always equal rows in.
"""

from __future__ import annotations

import base64
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

__all__ = ["COLUMNS", "SCHEMA", "THUMBNAIL", "Explainer", "box_figures", "read_file"]

THUMBNAIL = 32
"""The side of the map kept beside the 16-bit PNG for the class statistics and SpRAy's clustering."""

COLUMNS = (
    "file", "label", "status", "error", "predicted", "probability", "explained", "heatmap", "pointing",
    "energy_in_box", "deletion", "insertion", "sanity", "thumbnail",
)  # fmt: skip
"""The columns of ``DIR/explanations``, in order (``thumbnail``: the map at THUMBNAIL², row-major float32 bytes)."""


def _schema():
    import pyarrow as pa

    types = {
        "file": pa.string(), "label": pa.string(), "status": pa.string(), "error": pa.string(),
        "predicted": pa.int64(), "probability": pa.float64(), "explained": pa.int64(), "heatmap": pa.binary(),
        "pointing": pa.bool_(), "energy_in_box": pa.float64(), "deletion": pa.float64(), "insertion": pa.float64(),
        "sanity": pa.float64(), "thumbnail": pa.binary(),
    }  # fmt: skip
    return pa.schema([(column, types[column]) for column in COLUMNS])


SCHEMA = _schema()
"""The Parquet schema of ``DIR/explanations``: every column nullable, so that error rows and runs agree."""


def box_figures(heat: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[bool, float]:
    """Pointing and energy of ``heat`` (H, W) for ``box`` (x0, y0, x1, y1) given in the pixels of an image of
    ``size`` (width, height): whether the map's peak lies inside the box (scaled to the map), and the share of the
    map's mass inside it (0 for an all-zero map)."""
    height, width = heat.shape
    sx, sy = width / size[0], height / size[1]
    x0, x1 = int(np.floor(box[0] * sx)), int(np.ceil(box[2] * sx))
    y0, y1 = int(np.floor(box[1] * sy)), int(np.ceil(box[3] * sy))
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)
    peak_y, peak_x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    total = float(heat.sum(dtype=np.float64))
    inside = float(heat[y0:y1, x0:x1].sum(dtype=np.float64))
    return bool(x0 <= peak_x < x1 and y0 <= peak_y < y1), (inside / total if total > 0 else 0.0)


def read_file(path: str) -> bytes:
    """The file's bytes, local or any filesystem pyarrow knows (``s3://``, ``gs://``, ...)."""
    if "://" not in path:
        return Path(path).read_bytes()
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    with filesystem.open_input_file(inner) as stream:
        return stream.read()


class Explainer:
    """A Ray Data callable class: ``Explainer(archive, options)`` loads the archive's service once; each call takes
    a batch (``path``, ``file``, ``label``, ``target`` (−1: none), the box's ``x0``, ``y0``, ``x1``, ``y1`` (NaN:
    none)) and returns the rows of :data:`COLUMNS`.

    ``options`` are the request options every image is sent with (``method``, ``layer``, ``faithfulness``,
    ``sanity``, ...), as a request's fields; ``heatmap`` is always asked for. ``gpu``: run on the actor's GPU
    (Ray's ``num_gpus``). ``pid_file``, for the tests, is a
    folder where each actor keeps a file named by its process id, a line per batch begun."""

    def __init__(
        self, archive: str, options: Mapping[str, object], gpu: bool = False, pid_file: str | None = None
    ) -> None:
        import torch

        from camserve.model import select_device
        from camserve.pipeline import ExplanationService
        from camserve.spec import archive_manifest, handler_settings

        cv2.setNumThreads(1)
        self._calls = Path(pid_file, f"{os.getpid()}") if pid_file else None
        if self._calls is not None:
            self._calls.write_text("")
        self._workdir = tempfile.TemporaryDirectory(prefix="camserve-audit-")
        model_dir = Path(self._workdir.name) / "model"
        with zipfile.ZipFile(archive) as packed:
            packed.extractall(model_dir)
        manifest = archive_manifest(model_dir)
        # With GPUs, Ray makes the actor's own the only visible ones; without, the CPU even on a GPU node.
        device = select_device(0) if gpu and torch.cuda.is_available() else torch.device("cpu")
        self.service = ExplanationService.from_archive(
            model_dir, manifest["model"]["serializedFile"], handler_settings(model_dir, manifest), device
        )
        self.fields = {key: str(value).encode() for key, value in options.items() if value is not None}
        self.fields["heatmap"] = b"true"

    def __call__(self, batch: Mapping[str, np.ndarray]):
        if self._calls is not None:  # for the tests: one line per batch this process has begun
            with self._calls.open("a") as calls:
                calls.write(f"{len(batch['file'])}\n")
        count = len(batch["file"])
        rows: list[dict | None] = [None] * count
        out = {column: [None] * count for column in COLUMNS}
        for n in range(count):
            out["file"][n] = str(batch["file"][n])
            label = batch["label"][n]
            out["label"][n] = label if isinstance(label, str) else None  # a column of no labels comes as NaN
            try:
                data = read_file(str(batch["path"][n]))
            except OSError as error:
                out["status"][n], out["error"][n] = "error", f"the file could not be read: {error.strerror or error}"
                continue
            row = {"data": bytearray(data), **self.fields}
            if int(batch["target"][n]) >= 0:
                row["target"] = str(int(batch["target"][n])).encode()
            rows[n] = row
        asked = [n for n in range(count) if rows[n] is not None]
        results = self.service.answer([rows[n] for n in asked]) if asked else []
        for n, result in zip(asked, results, strict=True):
            if result.status != 200:
                out["status"][n], out["error"][n] = "error", str(result.body.get("message"))
                continue
            box = tuple(float(batch[key][n]) for key in ("x0", "y0", "x1", "y1"))
            try:
                self._fill(out, n, result.body, None if np.isnan(box).any() else box)
            except Exception as error:  # a response this code cannot read is that row's error, not the batch's
                out["status"][n], out["error"][n] = "error", f"reading the response failed: {error!r}"
        import pyarrow as pa

        return pa.table(out, schema=SCHEMA)

    @staticmethod
    def _fill(out: dict[str, list], n: int, body: Mapping[str, object], box: tuple[float, ...] | None) -> None:
        top = body["predictions"][0]
        explanation = body["explanations"][0]
        heatmap = base64.b64decode(explanation["heatmap"])
        heat = cv2.imdecode(np.frombuffer(heatmap, np.uint8), cv2.IMREAD_UNCHANGED).astype(np.float32) / 65535.0
        out["status"][n] = "ok"
        out["predicted"][n] = int(top["index"])
        out["probability"][n] = top.get("probability")
        out["explained"][n] = int(explanation["index"])
        out["heatmap"][n] = heatmap
        thumbnail = cv2.resize(heat, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA)
        out["thumbnail"][n] = thumbnail.astype(np.float32).tobytes()
        if box is not None:
            image = body["image"]
            pointing, energy = box_figures(heat, box, (image["width"], image["height"]))
            out["pointing"][n], out["energy_in_box"][n] = pointing, energy
        faithfulness = explanation.get("faithfulness")
        if faithfulness:
            out["deletion"][n], out["insertion"][n] = faithfulness["deletion"], faithfulness["insertion"]
        sanity = explanation.get("sanity")
        if sanity:
            out["sanity"][n] = sanity.get("rank_correlation")
