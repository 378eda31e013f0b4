"""The input corpus, generated: bad bodies, dimension bombs and every image kind. No binary file is committed."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
from PIL import Image

from tests.conftest import encode


def gradient_image(width: int = 64, height: int = 48) -> np.ndarray:
    """A deterministic RGB image whose every pixel differs from its neighbours."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], axis=2).astype(np.uint8)


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header that declares width x height, then a tiny compressed stream: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is patched to declare width x height."""
    data = bytearray(encode(gradient_image(32, 32), "JPEG", quality=80))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def truncated(fmt: str) -> bytes:
    data = encode(gradient_image(256, 256), fmt)
    return data[: len(data) // 2]


def random_bytes(count: int = 4096) -> bytes:
    return bytes(np.random.default_rng(0).integers(0, 256, count, dtype=np.uint8))


def animated_gif() -> bytes:
    """Two frames, dark then bright: the first frame is the one explained."""
    frames = [Image.fromarray(np.full((40, 48, 3), value, np.uint8)) for value in (10, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def multipage_tiff() -> bytes:
    pages = [Image.fromarray(gradient_image(64, 48)), Image.fromarray(gradient_image(32, 32))]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    return buffer.getvalue()


def png16() -> bytes:
    levels = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    ok, data = cv2.imencode(".png", levels)
    assert ok
    return data.tobytes()


def cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(gradient_image()).convert("CMYK"), "JPEG", quality=95)


def exif_rotated_jpeg(width: int = 64, height: int = 32) -> bytes:
    """A width x height JPEG whose EXIF orientation 6 says: rotate 90° clockwise to display (height x width)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(gradient_image(width, height)), "JPEG", quality=95, exif=exif.tobytes())


def phone_heic(width: int = 64, height: int = 32) -> bytes:
    """A width x height HEIC, as an iPhone writes them, whose EXIF orientation 6 says: display it rotated 90°
    clockwise (height x width)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(gradient_image(width, height)), "HEIF", quality=90, exif=exif.tobytes())


def avif() -> bytes:
    return encode(Image.fromarray(gradient_image()), "AVIF", quality=90)


def rgba_png() -> bytes:
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (255, 0, 0, 255)
    return encode(rgba, "PNG")


def palette_png() -> bytes:
    return encode(Image.fromarray(gradient_image()).convert("P"), "PNG")


def grayscale_png() -> bytes:
    return encode(Image.fromarray(gradient_image()).convert("L"), "PNG")


BAD_BODIES: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "EmptyImage"),
    "text": (b"hello, this is text and not an image", "InvalidImage"),
    "random bytes": (random_bytes(), "InvalidImage"),
    "JPEG cut in half": (truncated("JPEG"), "InvalidImage"),
    "PNG cut in half": (truncated("PNG"), "InvalidImage"),
    "1x1 image": (encode(np.zeros((1, 1, 3), np.uint8), "PNG"), "ImageTooSmall"),
    "0-sized image": (png_declaring(0, 0), "InvalidImage"),
    "PNG bomb 50000x50000": (png_declaring(50_000, 50_000), "ImageTooLarge"),
    "JPEG declaring 60000x60000": (jpeg_declaring(60_000, 60_000), "ImageTooLarge"),
}
"""Bodies that must be refused, with the error type each gets."""

IMAGE_KINDS: dict[str, tuple[bytes, tuple[int, int]]] = {
    "animated GIF": (animated_gif(), (48, 40)),
    "multi-page TIFF": (multipage_tiff(), (64, 48)),
    "16-bit PNG": (png16(), (64, 48)),
    "CMYK JPEG": (cmyk_jpeg(), (64, 48)),
    "EXIF-rotated JPEG": (exif_rotated_jpeg(), (32, 64)),
    "phone HEIC, EXIF-rotated": (phone_heic(), (32, 64)),
    "AVIF": (avif(), (64, 48)),
    "RGBA PNG": (rgba_png(), (32, 32)),
    "palette PNG": (palette_png(), (64, 48)),
    "grayscale PNG": (grayscale_png(), (64, 48)),
}
"""Images that must be served, with the (width, height) the response reports: upright, first frame or page."""
