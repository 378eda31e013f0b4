"""What the model takes of a decoded image: its input square, 8-bit RGB on the fast path, or float32 at full
precision (a DICOM's VOI window, a 16-bit grayscale) and a grayscale model's one channel."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import ImageOps

from camserve.errors import ClientError
from camserve.imaging import PRECISE_MODES, OpenedImage, load_rgb
from camserve.medical import dicom_gray, grey_to_rgb

__all__ = ["load_gray", "model_pixels"]


def load_gray(opened: OpenedImage, window: tuple[float, float] | None = None) -> np.ndarray:
    """Decode to a float32 (H, W) grayscale in [0, 1] at full precision: a DICOM file through its VOI window
    (``window`` = (center, width) overrides the file's), a 16-bit or float grayscale image as its values, any other
    image as its luminance (ITU-R BT.601, OpenCV's)."""
    if opened.dicom is not None:
        return dicom_gray(opened.dicom, window)
    if window is not None:
        raise ClientError("InvalidOption", "window applies to a DICOM image only; this image is not one: leave it out")
    if opened.image.mode in PRECISE_MODES:
        try:
            opened.image.seek(0)
            image = ImageOps.exif_transpose(opened.image)
            values = np.asarray(image, dtype=np.float32)
        except Exception:
            raise ClientError("InvalidImage", "the image data is truncated or corrupt") from None
        top = 65535.0 if image.mode != "F" or values.max() > 1.0 else 1.0
        return np.clip(values / top, 0.0, 1.0)
    return cv2.cvtColor(load_rgb(opened), cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0


def model_pixels(
    opened: OpenedImage,
    output: tuple[int, int],
    side: int,
    channels: int = 3,
    window: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The decoded image to draw on (RGB uint8, at least ``output`` = (width, height)) and the pixels the model
    reads, which the batch squashes to its ``side`` square (:func:`camserve.model.images_to_batch`). An 8-bit image
    for an RGB model stays uint8, decoded once for both (the fast path); a DICOM or 16-bit grayscale image becomes
    one float32 channel in [0, 1] at full precision; an RGB image for a one-channel model, its luminance."""
    if not opened.precise and window is None:
        rgb = load_rgb(opened, at_least=(max(output[0], side), max(output[1], side)))
        if channels == 3:
            return rgb, rgb
        return rgb, (cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0)[:, :, None]
    grey = load_gray(opened, window)
    return grey_to_rgb(grey), grey[:, :, None]
