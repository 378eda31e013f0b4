"""Everything that touches pixels as images: decoding under limits, resizing, the heatmap overlay and encoding."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import pybase64
from PIL import Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

from camserve import settings
from camserve.errors import ClientError
from camserve.medical import dicom_gray, grey_to_rgb, is_dicom, open_dicom
from camserve.volumes import is_nifti

register_heif_opener()
"""HEIC and HEIF (an iPhone's default) through pillow-heif: the header is read on open, so the limits are checked
before any pixel is decoded, and the image decodes upright (its orientation applied, its EXIF orientation reset)."""

__all__ = [
    "COLORMAPS",
    "PRECISE_MODES",
    "OVERLAYS",
    "clip_map",
    "map_at",
    "DecodeLimits",
    "OUTPUT_FORMATS",
    "OpenedImage",
    "decode_image",
    "draw_detection",
    "encode_binary_mask",
    "encode_class_mask",
    "fit_within",
    "outline_segment",
    "voc_palette",
    "load_rgb",
    "open_image",
    "encode_heatmap_png16",
    "encode_image",
    "render_overlay",
    "snap_to_decode_scale",
    "resize_for_model",
    "resize_image",
    "to_base64",
]

COLORMAPS: dict[str, int] = {
    name.removeprefix("COLORMAP_").lower(): getattr(cv2, name) for name in dir(cv2) if name.startswith("COLORMAP_")
}
"""OpenCV colormaps by lower-case name: ``jet``, ``turbo``, ``viridis``, ``inferno``, ..."""

OUTPUT_FORMATS: dict[str, tuple[str, list[int]]] = {
    "jpeg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]),
    "png": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 3]),
    "webp": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 90]),
}
"""Overlay encodings: the OpenCV extension and its quality settings."""

ACCEPTED_INPUTS = "JPEG, PNG, WebP, HEIC/HEIF, AVIF, GIF (first frame), TIFF (first page), BMP or DICOM"


@dataclass(frozen=True)
class DecodeLimits:
    """What an upload may be. Checked on the byte count and the header, before any pixel is decoded."""

    max_bytes: int = settings.MAX_IMAGE_BYTES
    max_pixels: int = settings.MAX_IMAGE_PIXELS
    min_side: int = settings.MIN_IMAGE_SIDE
    max_voxels: int = settings.MAX_VOLUME_VOXELS
    """A volume's declared voxels (a 3D model's NIfTI)."""


@dataclass(frozen=True)
class OpenedImage:
    """An upload whose header has been read and checked against the limits; no pixel is decoded yet."""

    image: Image.Image | None  # Pillow's (None for a DICOM file)
    width: int
    """The upright width, after the EXIF orientation."""
    height: int
    dicom: object | None = None
    """A DICOM file's pydicom dataset, its pixels not decoded (:mod:`camserve.medical`)."""

    @property
    def precise(self) -> bool:
        """Its values have more precision than 8 bits: a DICOM file, a 16-bit or float grayscale image."""
        return self.dicom is not None or self.image.mode in PRECISE_MODES


PRECISE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


_TRANSPOSED = (5, 6, 7, 8)
"""EXIF orientations that swap width and height."""


def open_image(data: bytes | bytearray, limits: DecodeLimits = DecodeLimits()) -> OpenedImage:
    """Read and check an upload's header: its byte count, its declared pixels and its smaller side."""
    if not data:
        raise ClientError("EmptyImage", f"the image is empty (0 bytes); send the bytes of a {ACCEPTED_INPUTS} file")
    if len(data) > limits.max_bytes:
        raise ClientError(
            "ImageTooLarge",
            f"the image is {len(data)} bytes; at most {limits.max_bytes} bytes are accepted",
            status=413,
        )
    if is_nifti(data):
        raise ClientError(
            "InvalidImage", f"the body is a NIfTI volume; this model explains 2D images: {ACCEPTED_INPUTS}"
        )
    if is_dicom(data):
        dataset, width, height = open_dicom(data)
        _check_size(width, height, limits)
        return OpenedImage(None, width, height, dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as error:
            raise _too_many_pixels(str(error)) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise ClientError(
                "InvalidImage", f"the body is not a decodable image; accepted: {ACCEPTED_INPUTS}"
            ) from None
    width, height = image.size
    _check_size(width, height, limits)
    try:
        orientation = image.getexif().get(0x0112)
    except Exception:  # a corrupt EXIF block: the image is served as stored
        orientation = None
    if orientation in _TRANSPOSED:
        width, height = height, width
    return OpenedImage(image, width, height)


def _check_size(width: int, height: int, limits: DecodeLimits) -> None:
    if width * height > limits.max_pixels:
        raise _too_many_pixels(f"the image declares {width}x{height} = {width * height} pixels", limits)
    if min(width, height) < limits.min_side:
        raise ClientError(
            "ImageTooSmall",
            f"the image is {width}x{height}; each side must be at least {limits.min_side} pixels",
        )


JPEG_SCALES = (8, 4, 2)
"""The reduced scales 1/8, 1/4 and 1/2 at which libjpeg decodes a JPEG straight from its DCT coefficients."""
SNAP = 0.9
"""How far below the requested output size a JPEG's reduced-scale size may be and still be taken instead."""


def snap_to_decode_scale(opened: OpenedImage, output: tuple[int, int]) -> tuple[int, int]:
    """The output size to render a JPEG at: ``output`` = (width, height), or, when one of the JPEG's reduced decode
    scales gives a size no larger than it and at least :data:`SNAP` of it, that size. A 12-megapixel photo
    (4032x3024) asked at 2048 pixels is then decoded at half scale (2016x1512) and rendered at that size with no
    resize, instead of decoded in full and resized: about a third of the time. Other formats keep ``output``."""
    if opened.image is None or opened.image.format != "JPEG":
        return output
    width, height = output
    for scale in JPEG_SCALES:
        scaled = (-(-opened.width // scale), -(-opened.height // scale))  # libjpeg rounds up
        if SNAP * width <= scaled[0] <= width and SNAP * height <= scaled[1] <= height:
            return scaled
    return output


def load_rgb(opened: OpenedImage, at_least: tuple[int, int] | None = None) -> np.ndarray:
    """Decode to an upright (EXIF orientation applied) RGB uint8 array of shape (H, W, 3).

    ``at_least`` = (width, height) lets a JPEG decode at a reduced scale (1/2, 1/4, 1/8) that still covers that
    size: less time and memory for large photos. Grayscale, palette, CMYK and 16-bit images are converted to RGB;
    transparency is composited over white; animations and multi-page files give their first frame.
    """
    if opened.dicom is not None:  # its own VOI window (a request's is applied by camserve.pixels)
        return grey_to_rgb(dicom_gray(opened.dicom))
    image = opened.image
    try:
        image.seek(0)
        if at_least is not None and image.format == "JPEG":
            wanted = at_least if (image.size[0] >= image.size[1]) == (opened.width >= opened.height) else at_least[::-1]
            image.draft("RGB", _draft_request(image.size, wanted))
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception:  # Pillow raises many types for corrupt data; each means the same to the client.
        raise ClientError("InvalidImage", "the image data is truncated or corrupt") from None
    return _to_rgb(image)


def _draft_request(size: tuple[int, int], wanted: tuple[int, int]) -> tuple[int, int]:
    """What to ask Pillow's ``draft`` for, so that it decodes at the smallest scale 1/s whose size (libjpeg's,
    rounded up) still covers ``wanted``: Pillow picks s from the floor of size / request, which would fall back to a
    full decode for an odd side (4033 / 2017 = 1)."""
    for scale in JPEG_SCALES:
        if all(-(-side // scale) >= want for side, want in zip(size, wanted, strict=True)):
            return size[0] // scale, size[1] // scale
    return size


def decode_image(data: bytes | bytearray, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """:func:`open_image` then :func:`load_rgb` at full resolution."""
    return load_rgb(open_image(data, limits))


def _too_many_pixels(detail: str, limits: DecodeLimits | None = None) -> ClientError:
    limit = f"; at most {limits.max_pixels} pixels are accepted" if limits else ""
    return ClientError("ImageTooLarge", f"{detail}{limit}", status=413)


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in PRECISE_MODES:
        # 16-bit and float grayscale: scale to 8 bits rather than let convert() clip everything above 255.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "F" or values.max() > 1.0 else 1.0
        gray = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def resize_for_model(rgb: np.ndarray, size: int) -> np.ndarray:
    """The whole image squashed to ``size`` x ``size``, area-averaged when shrinking, bilinear when growing."""
    return resize_image(rgb, (size, size))


def resize_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``rgb`` at ``size`` = (width, height), area-averaged when shrinking, bilinear when growing; as is if equal."""
    if (rgb.shape[1], rgb.shape[0]) == tuple(size):
        return rgb
    shrinking = rgb.shape[0] * rgb.shape[1] > size[0] * size[1]
    return cv2.resize(rgb, tuple(size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


OVERLAYS = ("heatmap", "outline", "mask", "grayscale")
"""How a map is drawn on the photo; see :func:`render_overlay`."""


def map_at(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One (h, w) float map at ``size`` = (H, W) in [0, 1]: :func:`camserve.cam.normalize_map` on the host, with
    OpenCV's bilinear resize (the same half-pixel sampling; equal to 1e-5, tested).

    The render threads call this rather than a torch operator: a parallel torch operator in a second thread starts
    a second OpenMP team, which slowed every later forward pass by a third on two cores (measured).
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.max() <= cam.min():  # constant: all zero, as normalize_map makes it (the resize would add rounding noise)
        return np.zeros(size, np.float32)
    if cam.shape != tuple(size):
        cam = cv2.resize(cam, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    low, high = cam.min(), cam.max()
    return (cam - low) / (high - low) if high > low else np.zeros_like(cam)


def clip_map(heat: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip a [0, 1] map to its ``low`` and ``high`` percentiles (0–100), then min–max it back to [0, 1]:
    h' = (clip(h, P_low, P_high) − P_low) / (P_high − P_low). Clipping the low end removes the faint haze, the high
    end a single hot pixel. A map that is constant between the two percentiles becomes all zero."""
    bottom, top = np.percentile(heat, (low, high))
    if top <= bottom:
        return np.zeros_like(heat)
    return (np.clip(heat, bottom, top) - bottom) / (top - bottom)


def _colour_map(heat: np.ndarray, colormap: str) -> np.ndarray:
    heat_u8 = np.round(np.clip(heat, 0.0, 1.0) * 255.0).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(heat_u8, COLORMAPS[colormap]), cv2.COLOR_BGR2RGB)


def render_overlay(
    rgb: np.ndarray, heat: np.ndarray, alpha: float, colormap: str, overlay: str = "heatmap", region: float = 0.2
) -> np.ndarray:
    """Draw the map on the image. ``heat`` is an (H, W) float map in [0, 1] at the image's resolution.

    - ``heatmap``: (1 − alpha)·image + alpha·colormap(heat).
    - ``grayscale``: the same blend over a grey copy of the image, so that only the map has colour.
    - ``mask``: image · (1 − alpha·(1 − heat)): the photo where the map is high, darkened elsewhere.
    - ``outline``: the photo, with the contours of the map's top region drawn in the colormap's hottest colour;
      the region is the ``region`` share of pixels (0–1) where the map is highest.
    """
    if overlay == "heatmap":
        return cv2.addWeighted(rgb, 1.0 - alpha, _colour_map(heat, colormap), alpha, 0.0)
    if overlay == "grayscale":
        grey = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        return cv2.addWeighted(grey, 1.0 - alpha, _colour_map(heat, colormap), alpha, 0.0)
    if overlay == "mask":
        weight = 1.0 - alpha * (1.0 - np.clip(heat, 0.0, 1.0))
        return np.round(rgb * weight[:, :, None].astype(np.float32)).astype(np.uint8)
    if overlay == "outline":
        threshold = np.quantile(heat, 1.0 - region)
        inside = (heat >= threshold).astype(np.uint8)
        contours, _ = cv2.findContours(inside, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        colour = tuple(int(v) for v in _colour_map(np.ones((1, 1)), colormap)[0, 0])
        thickness = max(1, round(max(rgb.shape[:2]) / 150))
        return cv2.drawContours(rgb.copy(), contours, -1, colour, thickness, cv2.LINE_8)
    raise ValueError(f"overlay must be one of {', '.join(OVERLAYS)}, got {overlay!r}")


def encode_image(rgb: np.ndarray, fmt: str) -> bytes:
    """Encode an RGB uint8 image as ``jpeg``, ``png`` or ``webp``."""
    extension, params = OUTPUT_FORMATS[fmt]
    ok, encoded = cv2.imencode(extension, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {rgb.shape} image as {fmt}")
    return encoded.tobytes()


def _line_width(rgb: np.ndarray) -> int:
    return max(1, round(max(rgb.shape[:2]) / 300))


def draw_detection(rgb: np.ndarray, box: tuple[float, float, float, float], text: str) -> np.ndarray:
    """The image with a detection's box (x0, y0, x1, y1, in its pixels) drawn in white on black, and ``text`` (its
    label and score) on a dark tab at its top left, in place."""
    x0, y0, x1, y1 = (round(v) for v in box)
    width = _line_width(rgb)
    cv2.rectangle(rgb, (x0, y0), (x1, y1), (0, 0, 0), width + 2, cv2.LINE_AA)
    cv2.rectangle(rgb, (x0, y0), (x1, y1), (255, 255, 255), width, cv2.LINE_AA)
    scale = max(0.4, max(rgb.shape[:2]) / 1000)
    (text_w, text_h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    top = max(0, y0 - text_h - base - 2)
    cv2.rectangle(rgb, (x0, top), (x0 + text_w + 4, top + text_h + base + 2), (0, 0, 0), cv2.FILLED)
    cv2.putText(rgb, text, (x0 + 2, top + text_h + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return rgb


def outline_segment(rgb: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """The image with the contours of the boolean (H, W) ``inside`` drawn in white over black, in place."""
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    width = _line_width(rgb)
    cv2.drawContours(rgb, contours, -1, (0, 0, 0), width + 2, cv2.LINE_AA)
    return cv2.drawContours(rgb, contours, -1, (255, 255, 255), width, cv2.LINE_AA)


def voc_palette(classes: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map, (classes, 3) uint8: class 0 black, 1 (128, 0, 0), 2 (0, 128, 0), 3 (128, 128, 0),
    15 (192, 128, 128), ... (each class index's bits spread over the three channels' high bits)."""
    palette = np.zeros((classes, 3), dtype=np.uint8)
    for index in range(classes):
        value, shift = index, 7
        while value:
            for channel in range(3):
                palette[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return palette


def encode_class_mask(classes: np.ndarray) -> bytes:
    """A (H, W) map of class indices as a PNG whose pixel values are the indices: 8-bit with the PASCAL VOC palette
    (:func:`voc_palette`) up to 256 classes, else 16-bit grayscale."""
    if classes.max(initial=0) < 256:
        image = Image.fromarray(classes.astype(np.uint8))
        image.putpalette(voc_palette().tobytes())  # an "L" image with a palette becomes a "P" one, values kept
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False, compress_level=6)
        return buffer.getvalue()
    ok, encoded = cv2.imencode(".png", classes.astype(np.uint16))
    if not ok:
        raise RuntimeError("OpenCV could not encode the class mask as a 16-bit PNG")
    return encoded.tobytes()


def encode_binary_mask(inside: np.ndarray) -> bytes:
    """A boolean (H, W) mask as an 8-bit grayscale PNG, 255 inside and 0 outside."""
    ok, encoded = cv2.imencode(".png", inside.astype(np.uint8) * 255)
    if not ok:
        raise RuntimeError("OpenCV could not encode the mask as a PNG")
    return encoded.tobytes()


def fit_within(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) scaled down so that the longer side is at most ``side``; never up."""
    scale = min(1.0, side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_heatmap_png16(heat: np.ndarray) -> bytes:
    """The map as a 16-bit grayscale PNG: value = round(map × 65535)."""
    levels = np.round(np.clip(heat, 0.0, 1.0) * 65535.0).astype(np.uint16)
    ok, encoded = cv2.imencode(".png", levels)
    if not ok:
        raise RuntimeError("OpenCV could not encode the heatmap as a 16-bit PNG")
    return encoded.tobytes()


def to_base64(data: bytes) -> str:
    """Standard base64 (RFC 4648, with padding), by pybase64's SIMD codec: 30x faster than ``base64`` on an overlay
    (``scripts/bench.py``, "Response bytes")."""
    return pybase64.b64encode(data).decode("ascii")
