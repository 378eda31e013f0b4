"""Medical images: DICOM radiographs, read under limits and decoded as the standard says.

A DICOM file is recognised by its ``DICM`` magic (after the 128-byte preamble) and read with pydicom: its header
first, checked against the limits before any pixel is decoded; then its pixels, through the standard's chain
(DICOM PS3.3 C.11): stored values to modality values by RescaleSlope and RescaleIntercept (or the Modality LUT), to
the VOI window (the request's ``window``, else the file's own WindowCenter/WindowWidth or VOI LUT, else the modality
values' own range), MONOCHROME1 inverted. The result is a grayscale image in [0, 1] at full precision. No tag of the
file is ever echoed in a response: only its Columns × Rows.
"""

from __future__ import annotations

import io

import numpy as np

from camserve.errors import ClientError

__all__ = ["DICOM_MAGIC", "dicom_gray", "grey_to_rgb", "is_dicom", "open_dicom", "window_linear"]

DICOM_MAGIC = b"DICM"
"""At byte 128 of a DICOM Part 10 file, after its preamble."""


def is_dicom(data: bytes | bytearray) -> bool:
    return bytes(data[128:132]) == DICOM_MAGIC


def open_dicom(data: bytes | bytearray):
    """The file's dataset with its header read and its pixels not decoded, after the checks a request can fail:
    pixel data present, one grayscale frame, a transfer syntax that a pinned decoder reads. Returns (dataset, width,
    height)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(bytes(data)))
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        samples = int(dataset.get("SamplesPerPixel", 1))
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    except (InvalidDicomError, *_READ_ERRORS) as error:
        raise ClientError("InvalidImage", f"the DICOM file could not be read: {_short(error)}") from None
    if "PixelData" not in dataset:
        raise ClientError("InvalidImage", "the DICOM file has no pixel data (PixelData): send an image object")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ClientError(
            "InvalidImage",
            f"the DICOM image is {photometric} with {samples} samples per pixel; accepted: a grayscale radiograph "
            "(MONOCHROME1 or MONOCHROME2)",
        )
    if frames != 1:
        raise ClientError("InvalidImage", f"the DICOM image has {frames} frames; accepted: a single-frame image")
    syntax = dataset.file_meta.get("TransferSyntaxUID") if "file_meta" in dir(dataset) else None
    if syntax is not None and syntax.is_compressed and not _decodable(syntax):
        raise ClientError(
            "UnsupportedImage",
            f"the DICOM file's transfer syntax {syntax.name} ({syntax}) has no decoder here; accepted: uncompressed, "
            "RLE, JPEG, JPEG-LS and JPEG 2000 where pylibjpeg decodes them",
        )
    return dataset, columns, rows


_READ_ERRORS = (AttributeError, KeyError, ValueError, TypeError, OverflowError, EOFError, OSError, IndexError)
"""What pydicom raises on a malformed file, beside its InvalidDicomError."""


def _decodable(syntax) -> bool:
    from pydicom.pixels import get_decoder

    try:
        return get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):
        return False


def _short(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error)[:160]}"


def window_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The VOI window's LINEAR function (DICOM PS3.3 C.11.2.1.2.1) to [0, 1]: 0 at or below c − ½ − (w − 1)/2, 1
    above c − ½ + (w − 1)/2, and ((x − (c − ½)) / (w − 1) + ½) between."""
    if width <= 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def dicom_gray(dataset, window: tuple[float, float] | None = None) -> np.ndarray:
    """The image as a float32 (Rows, Columns) grayscale in [0, 1]: modality values, the VOI window (``window`` =
    (center, width) first, then the file's own), MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        stored = dataset.pixel_array
        values = np.asarray(apply_modality_lut(stored, dataset), dtype=np.float64)
    except Exception as error:  # pydicom's and the decoders' many errors mean one thing to the client
        raise ClientError("InvalidImage", f"the DICOM pixel data could not be decoded: {_short(error)}") from None
    if values.ndim != 2:
        raise ClientError("InvalidImage", f"the DICOM pixel data is {values.shape}, not one grayscale frame")
    if window is not None:
        grey = window_linear(values, *window)
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        center, width = (_first(dataset.WindowCenter), _first(dataset.WindowWidth))
        if center is None or width is None or width < 1:
            raise ClientError(
                "InvalidImage",
                "the DICOM file's WindowCenter and WindowWidth are not a window (two numbers, the width at least 1): "
                "give the request's window, such as [40, 400]",
            )
        grey = window_linear(values, center, width)
    elif "VOILUTSequence" in dataset:
        grey = _min_max(np.asarray(apply_voi_lut(values, dataset), dtype=np.float64))
    else:
        grey = _min_max(values)
    if str(dataset.get("PhotometricInterpretation")) == "MONOCHROME1":
        grey = 1.0 - grey
    return np.ascontiguousarray(grey, dtype=np.float32)


def _first(value) -> float | None:
    """A window value, the first of a multi-valued one; None when it is no finite number."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if np.isfinite(number) else None


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """A [0, 1] float grayscale as an 8-bit RGB image (what an overlay is drawn on)."""
    levels = np.round(np.clip(grey, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(levels[:, :, None], 3, axis=2))
