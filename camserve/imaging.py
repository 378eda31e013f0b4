"""Everything that touches pixels as images: decoding under limits, resizing, the heatmap overlay and encoding."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import pybase64
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

from camserve import settings
from camserve.errors import ClientError
from camserve.medical import dicom_gray, grey_to_rgb, is_dicom, open_dicom
from camserve.overlays import voc_palette
from camserve.volumes import is_nifti

register_heif_opener()
"""HEIC and HEIF (an iPhone's default) through pillow-heif: the header is read on open, so the limits are checked
before any pixel is decoded, and the image decodes upright (its orientation applied, its EXIF orientation reset)."""

__all__ = [
    "PRECISE_MODES",
    "DecodeLimits",
    "JPEG_QUALITY",
    "OUTPUT_FORMATS",
    "OpenedImage",
    "decode_image",
    "encode_binary_mask",
    "encode_class_mask",
    "fit_within",
    "load_rgb",
    "open_image",
    "encode_heatmap_png16",
    "encode_image",
    "snap_to_decode_scale",
    "resize_image",
    "to_base64",
]


JPEG_QUALITY = 90
"""The overlay's JPEG quality."""

OUTPUT_FORMATS: dict[str, tuple[str, list[int]]] = {
    "jpeg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]),
    "png": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 3]),
    "webp": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 90]),
}
"""Overlay encodings: the OpenCV extension and its quality settings. JPEG is encoded by simplejpeg at the same
settings (:func:`encode_image`); its OpenCV entry is the benchmark's comparison."""

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
    data: bytes | bytearray | None = None
    """The upload's bytes: a JPEG's pixels decode from them with libjpeg-turbo's own API (:func:`load_rgb`)."""
    orientation: int = 1
    """The EXIF orientation (1–8) that the pixels still need."""

    @property
    def precise(self) -> bool:
        """Its values have more precision than 8 bits: a DICOM file, a 16-bit or float grayscale image."""
        return self.dicom is not None or self.image.mode in PRECISE_MODES


PRECISE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


_TRANSPOSED = (5, 6, 7, 8)
"""EXIF orientations that swap width and height."""
_UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: a[::-1].swapaxes(0, 1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: a[:, ::-1].swapaxes(0, 1),
}
"""Each EXIF orientation's view of the stored (H, W, C) pixels that displays upright, as Pillow's
``ImageOps.exif_transpose`` turns them (equal, tested for all eight)."""


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
    return OpenedImage(image, width, height, data=data, orientation=orientation if orientation in _UPRIGHT else 1)


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
        scaled = _scaled((opened.width, opened.height), scale)
        if SNAP * width <= scaled[0] <= width and SNAP * height <= scaled[1] <= height:
            return scaled
    return output


def load_rgb(opened: OpenedImage, at_least: tuple[int, int] | None = None) -> np.ndarray:
    """Decode to an upright (EXIF orientation applied) RGB uint8 array of shape (H, W, 3).

    ``at_least`` = (width, height) lets a JPEG decode at a reduced scale (1/2, 1/4, 1/8) that still covers that
    size: less time and memory for large photos. Grayscale, palette, CMYK and 16-bit images are converted to RGB;
    transparency is composited over white; animations and multi-page files give their first frame.

    A YCbCr or grayscale JPEG decodes with simplejpeg (libjpeg-turbo's TurboJPEG API, into one array, without the
    GIL): the same pixels as Pillow's decoder, bit for bit (tested), in about two thirds of the time
    (``scripts/bench.py``, "Image work"). Anything it refuses, a truncated file included, goes to Pillow, which
    decides.
    """
    if opened.dicom is not None:  # its own VOI window (a request's is applied by camserve.pixels)
        return grey_to_rgb(dicom_gray(opened.dicom))
    image = opened.image
    stored = image.size
    if at_least is not None and image.format == "JPEG":
        wanted = at_least if (stored[0] >= stored[1]) == (opened.width >= opened.height) else at_least[::-1]
        scale = _decode_scale(stored, wanted)
    else:
        scale = 1
    if image.format == "JPEG" and image.mode in ("RGB", "L") and opened.data is not None:
        rgb = _turbo_decode(opened, stored, scale)
        if rgb is not None:
            return rgb
    try:
        image.seek(0)
        if scale > 1:
            image.draft("RGB", (stored[0] // scale, stored[1] // scale))  # Pillow's scale: the floor of the ratio
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception:  # Pillow raises many types for corrupt data; each means the same to the client.
        raise ClientError("InvalidImage", "the image data is truncated or corrupt") from None
    return _to_rgb(image)


def _turbo_decode(opened: OpenedImage, stored: tuple[int, int], scale: int) -> np.ndarray | None:
    """A JPEG's upright RGB pixels at 1/``scale`` from simplejpeg, or None where it refuses the file."""
    size = _scaled(stored, scale)
    try:
        rgb = simplejpeg.decode_jpeg(opened.data, colorspace="RGB", min_width=size[0], min_height=size[1])
    except ValueError:  # corrupt, truncated, or a kind it does not decode (arithmetic coding, 12 bits)
        return None
    if (rgb.shape[1], rgb.shape[0]) != size:  # another frame than the one whose header was checked: Pillow decides
        return None
    return np.ascontiguousarray(_UPRIGHT[opened.orientation](rgb))


def _decode_scale(size: tuple[int, int], wanted: tuple[int, int]) -> int:
    """The largest of libjpeg's reduced scales 1/s whose size (rounded up, as libjpeg does) still covers
    ``wanted``; 1 when none does."""
    for scale in JPEG_SCALES:
        if all(side >= want for side, want in zip(_scaled(size, scale), wanted, strict=True)):
            return scale
    return 1


def _scaled(size: tuple[int, int], scale: int) -> tuple[int, int]:
    """(width, height) at libjpeg's reduced scale 1/``scale``: each side rounded up, as libjpeg rounds it."""
    return -(-size[0] // scale), -(-size[1] // scale)


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


def resize_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``rgb`` at ``size`` = (width, height), area-averaged when shrinking, bilinear when growing; as is if equal."""
    if (rgb.shape[1], rgb.shape[0]) == tuple(size):
        return rgb
    shrinking = rgb.shape[0] * rgb.shape[1] > size[0] * size[1]
    return cv2.resize(rgb, tuple(size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def encode_image(rgb: np.ndarray, fmt: str) -> bytes:
    """Encode an RGB uint8 image as ``jpeg``, ``png`` or ``webp``. JPEG comes from simplejpeg (libjpeg-turbo, from
    the RGB pixels as they are, without the GIL), at OpenCV's settings (quality 90, 4:2:0): a quarter less time than
    OpenCV's encoder after its channel swap, the same quality (PSNR within 0.1 dB, tested)."""
    if fmt == "jpeg":
        return simplejpeg.encode_jpeg(
            np.ascontiguousarray(rgb), quality=JPEG_QUALITY, colorspace="RGB", colorsubsampling="420"
        )
    extension, params = OUTPUT_FORMATS[fmt]
    ok, encoded = cv2.imencode(extension, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {rgb.shape} image as {fmt}")
    return encoded.tobytes()


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
