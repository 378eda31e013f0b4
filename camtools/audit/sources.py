"""What an audit reads: a folder of class subfolders, a folder of unlabelled images, a CSV
``file,class[,x0,y0,x1,y1]`` (the form of ``scripts/evaluate.py``, files relative to the CSV's folder) or a Parquet
file or dataset with the same columns; local paths or any URI pyarrow's filesystems open (``s3://``, ``gs://``).

Each becomes rows of ``path`` (what to read), ``file`` (as given), ``label`` (the given class as text, or None),
``target`` (its class index for the model, or None) and ``box`` (x0, y0, x1, y1 in the original image's pixels, or
None). A class that the model does not know is an error before anything runs: the audit explains the given class.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import PurePosixPath

__all__ = ["IMAGE_SUFFIXES", "SourceError", "read_source"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".gif")


class SourceError(ValueError):
    """IMAGES cannot be read as any accepted form: one line for the user."""


def _filesystem(uri: str):
    import pyarrow.fs

    if "://" not in uri:
        return pyarrow.fs.LocalFileSystem(), str(PurePosixPath(uri).as_posix()), ""
    filesystem, inner = pyarrow.fs.FileSystem.from_uri(uri)
    return filesystem, inner, uri[: len(uri) - len(inner)] if uri.endswith(inner) else uri.split("://")[0] + "://"


def _class_index(value: str, labels: Sequence[str], where: str) -> int:
    text = value.strip()
    if text in labels:
        return labels.index(text)
    if text.isdigit() and int(text) < len(labels):
        return int(text)
    raise SourceError(f"{where}: class {text!r} is neither one of the model's labels nor an index below {len(labels)}")


def _box(values: Sequence[str], where: str) -> tuple[float, float, float, float] | None:
    cells = [value.strip() for value in values]
    if not any(cells):
        return None
    try:
        x0, y0, x1, y1 = (float(value) for value in cells)
    except ValueError:
        raise SourceError(f"{where}: a box is four numbers x0,y0,x1,y1 (or four empty fields), got {values}") from None
    if not (x1 > x0 and y1 > y0):
        raise SourceError(f"{where}: a box needs x1 > x0 and y1 > y0, got {values}")
    return (x0, y0, x1, y1)


def _row(path: str, file: str, label: str | None, labels: Sequence[str], where: str, box=None) -> dict:
    target = None if label is None or not label.strip() else _class_index(label, labels, where)
    return {"path": path, "file": file, "label": label.strip() if target is not None else None, "target": target,
            "box": box}  # fmt: skip


def _from_table(records: list[dict], base: str, labels: Sequence[str], where: str) -> list[dict]:
    rows = []
    for number, record in enumerate(records, start=2):
        file = str(record.get("file") or "").strip()
        if not file:
            raise SourceError(f"{where} row {number}: no file")
        path = file if "://" in file or file.startswith("/") else f"{base.rstrip('/')}/{file}"
        label = record.get("class")
        label = None if label is None else str(label)
        corners = [record.get(key) for key in ("x0", "y0", "x1", "y1")]
        box = _box(["" if v is None else str(v) for v in corners], f"{where} row {number}")
        rows.append(_row(path, file, label, labels, f"{where} row {number}", box))
    return rows


def read_source(images: str, labels: Sequence[str]) -> list[dict]:
    """The rows of ``images`` (see the module's docstring), in a stable order; :class:`SourceError` if it is none
    of the accepted forms."""
    import pyarrow.fs

    filesystem, inner, scheme = _filesystem(images)
    info = filesystem.get_file_info(inner)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise SourceError(f"IMAGES {images} does not exist")
    uri = lambda path: path if not scheme else f"{scheme}{path}"  # noqa: E731
    if info.type == pyarrow.fs.FileType.File and inner.lower().endswith(".csv"):
        with filesystem.open_input_stream(inner) as stream:
            text = stream.read().decode("utf-8-sig")
        reader = csv.reader(io.StringIO(text))
        records = []
        for cells in reader:
            if not cells or cells[0].strip().lower() == "file":
                continue
            cells = cells + [""] * (6 - len(cells))
            records.append(dict(zip(("file", "class", "x0", "y0", "x1", "y1"), cells[:6], strict=True)))
        return _from_table(records, uri(str(PurePosixPath(inner).parent)), labels, images)
    if info.type == pyarrow.fs.FileType.File and not inner.lower().endswith(".parquet"):
        raise SourceError(f"IMAGES {images} is a file, but not a .csv or .parquet: give a folder, a CSV or Parquet")
    if info.type == pyarrow.fs.FileType.File or _is_parquet_dataset(filesystem, inner):
        import pyarrow.parquet as pq

        table = pq.read_table(inner, filesystem=filesystem)
        if "file" not in table.column_names:
            raise SourceError(
                f"IMAGES {images}: a Parquet source needs a 'file' column (and optionally 'class', x0..y1)"
            )
        base = str(PurePosixPath(inner).parent if info.type == pyarrow.fs.FileType.File else PurePosixPath(inner))
        return _from_table(table.to_pylist(), uri(base), labels, images)
    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(inner))
    folders = sorted(e.path for e in entries if e.type == pyarrow.fs.FileType.Directory)
    files = sorted(
        e.path for e in entries if e.type == pyarrow.fs.FileType.File and e.path.lower().endswith(IMAGE_SUFFIXES)
    )
    rows = []
    if folders:  # class subfolders: each folder's name is its class
        for folder in folders:
            name = PurePosixPath(folder).name
            index = _class_index(name, labels, f"IMAGES folder {name}")
            for entry in sorted(filesystem.get_file_info(pyarrow.fs.FileSelector(folder)), key=lambda e: e.path):
                if entry.type == pyarrow.fs.FileType.File and not PurePosixPath(entry.path).name.startswith("."):
                    file = f"{name}/{PurePosixPath(entry.path).name}"
                    rows.append({"path": uri(entry.path), "file": file, "label": name, "target": index, "box": None})
    for path in files:  # unlabelled images: the top prediction is explained
        rows.append({"path": uri(path), "file": PurePosixPath(path).name, "label": None, "target": None, "box": None})
    if not rows:
        raise SourceError(f"IMAGES {images} holds no images: give class subfolders, images, a CSV or Parquet")
    return rows


def _is_parquet_dataset(filesystem, inner: str) -> bool:
    import pyarrow.fs

    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
    files = [e for e in entries if e.type == pyarrow.fs.FileType.File]
    return bool(files) and all(e.path.endswith(".parquet") for e in files)
