"""The image work around the forward pass, step by step, on camera-like photos: each step with the codec the
service ships and with the well-kept alternatives, and the overlay's fidelity against the one served before.

The photos are :func:`camera_photo`: a real photo with sensor-like noise, saved as a phone does (quality 90), so
that decoding and encoding pay what they pay on users' photos. A smooth photo resized (the benchmark's earlier
input) compresses three times better and underestimates both.

On a CUDA device the section also times the same steps on the device, in torch, a batch of photos at a time
(:func:`device_steps`: torchvision's nvJPEG decoder and encoder): what a GPU service could run instead of the host's
codecs. No GPU service serves them yet; this is the measurement that decides whether one should.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import replace

import cv2
import numpy as np
import simplejpeg
import torch
import torchvision.io
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from camserve import settings
from camserve.imaging import (
    JPEG_QUALITY,
    OUTPUT_FORMATS,
    encode_image,
    fit_within,
    load_rgb,
    open_image,
    snap_to_decode_scale,
    to_base64,
)
from camserve.model import model_square
from camserve.overlays import COLORMAPS, colour_table, levels_at, map_at, render_overlay
from camtools.bench.context import BenchContext

__all__ = [
    "IMAGE_WORK_TARGET_MS",
    "PHOTOS",
    "camera_photo",
    "device_steps",
    "image_work",
    "image_work_lines",
    "image_work_totals",
    "smooth_photo",
]

PHOTOS = {"1080p": (1920, 1080), "12 MP": (4032, 3024)}
"""Phone-photo sizes: a 1080p frame and a 12-megapixel photo."""
SENSOR_NOISE = 8.0
"""The camera-like photo's noise, σ in grey levels, as a phone's sensor leaves in an evenly lit scene."""
IMAGE_WORK_TARGET_MS = {"1080p": 14.0}
"""The most the service's own image work may cost per 1080p photo, in process (the serving-speed issue)."""
SMOOTH = "1080p smooth"
"""The smooth 1080p photo (no sensor noise), timed beside the camera-like ones: the photo the target above was
set on, before the benchmark's photos became camera-like. The target is read on the camera-like photo."""
DEVICE_BATCH = 32
"""Photos per call of :func:`device_steps` on a CUDA device: a GPU service's batch."""
MAX_SIDES = (settings.DEFAULT_OUTPUT_SIDE, settings.DEFAULT_OUTPUT_SIDE // 2)
"""The overlay's longest side: the shipped ``max_side``, then half of it (``--max-side 1024`` at build time, or a
request's ``max_side``), at which a 1080p photo decodes at 1/2 scale from its DCT coefficients."""


def smooth_photo(size: tuple[int, int]) -> np.ndarray:
    """scikit-image's astronaut resized to ``size``: smooth, as no camera delivers."""
    import skimage.data

    return cv2.resize(skimage.data.astronaut(), size, interpolation=cv2.INTER_CUBIC)


@functools.cache
def camera_photo(size: tuple[int, int], smooth: bool = False) -> bytes:
    """A camera-like JPEG of ``size`` at quality 90: the astronaut with Gaussian sensor noise (σ =
    :data:`SENSOR_NOISE`, seeded); 12 MP is about 3.3 MB, as a phone's. ``smooth`` leaves the noise out."""
    pixels = smooth_photo(size)
    if not smooth:
        noise = np.random.default_rng(0).normal(0.0, SENSOR_NOISE, pixels.shape).astype(np.float32)
        pixels = np.clip(pixels + noise, 0, 255).round().astype(np.uint8)
    return simplejpeg.encode_jpeg(pixels, quality=90, colorspace="RGB", colorsubsampling="420")


def _float_colours(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The heatmap overlay as served before: float arrays, OpenCV's BGR colormap and a channel swap."""
    levels = np.round(np.clip(heat, 0.0, 1.0) * 255.0).astype(np.uint8)
    colours = cv2.cvtColor(cv2.applyColorMap(levels, COLORMAPS["jet"]), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(rgb, 1.0 - alpha, colours, alpha, 0.0)


def _opencv_jpeg(rgb: np.ndarray) -> bytes:
    """The overlay's JPEG as served before: OpenCV's encoder after its channel swap, at the same settings."""
    extension, params = OUTPUT_FORMATS["jpeg"]
    ok, encoded = cv2.imencode(extension, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    assert ok
    return encoded.tobytes()


def _opencv_decode(body: bytes, scale: int) -> np.ndarray:
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}[scale]
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(body, np.uint8), flags), cv2.COLOR_BGR2RGB)


def _one_torch_thread(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` on one torch thread, as every other step here runs (the service runs it on the forward pass's)."""

    def timed() -> object:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return step()
        finally:
            torch.set_num_threads(threads)

    return timed


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))


def _steps(body, output, scale, side, cam, rgb, heat, levels, overlay, encoded) -> dict[str, dict[str, object]]:
    """Each step's contenders, the service's own first."""
    planar = torch.from_numpy(overlay).permute(2, 0, 1).contiguous()
    data = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    return {
        "decode": {
            "simplejpeg": lambda: load_rgb(open_image(body), at_least=output),
            "Pillow": lambda: load_rgb(replace(open_image(body), data=None), at_least=output),
            "OpenCV": lambda: _opencv_decode(body, scale),
            "torchvision (full size)": lambda: torchvision.io.decode_jpeg(data),
        },
        f"resize to the model's {side}": {
            "torch antialiased bilinear": _one_torch_thread(lambda: model_square(rgb, side)),
            "OpenCV area": lambda: cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA),
        },
        "map at the overlay's size": {
            "uint8 levels, 16-bit fixed point": lambda: levels_at(cam, rgb.shape[:2]),
            "float map, min-max in place": lambda: map_at(cam, rgb.shape[:2]),
        },
        "colours and blend": {
            "uint8 lookup": lambda: render_overlay(rgb, levels, 0.5, "jet"),
            "float arrays": lambda: _float_colours(rgb, heat),
        },
        "encode": {
            "simplejpeg": lambda: encode_image(overlay, "jpeg"),
            "OpenCV": lambda: _opencv_jpeg(overlay),
            "torchvision": lambda: torchvision.io.encode_jpeg(planar, quality=90),
        },
        "base64": {"pybase64": lambda: to_base64(encoded)},
    }


def device_steps(
    body: bytes, output: tuple[int, int], side: int, cam: np.ndarray, device: torch.device, batch: int
) -> dict[str, Callable[[], object]]:
    """The overlay's steps in torch on ``device``, ``batch`` copies of the photo ``body`` at a time, each a callable
    that returns its batch's result: torchvision's decoder (nvJPEG on a CUDA device, from the bytes on the host;
    resized on the device to ``output`` = (W, H) when that is smaller: nvJPEG has no reduced scale), the model's
    ``side`` square (antialiased bilinear), the map's levels at the overlay's size (bilinear, min–max, rounded),
    the colours looked up and blended at alpha 0.5, and torchvision's encoder (nvJPEG) with the JPEGs back on the
    host. The later steps read the earlier ones' results, made once here."""
    width, height = output
    data = [torch.frombuffer(bytearray(body), dtype=torch.uint8)] * batch
    colours = torch.from_numpy(colour_table("jet")[:, 0]).to(device)  # (256, 3), RGB
    grids = torch.from_numpy(np.asarray(cam, np.float32)).to(device).expand(batch, 1, *cam.shape)

    def decode() -> torch.Tensor:
        images = torch.stack(torchvision.io.decode_jpeg(data, device=device))
        return images if images.shape[2:] == (height, width) else TF.resize(images, [height, width], antialias=True)

    def levels() -> torch.Tensor:
        heat = F.interpolate(grids, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        low, high = heat.amin(dim=(1, 2), keepdim=True), heat.amax(dim=(1, 2), keepdim=True)
        return ((heat - low) * (255.0 / (high - low).clamp_min(1e-12))).round_().to(torch.uint8)

    images, maps = decode(), levels()

    def blend() -> torch.Tensor:
        heat = colours[maps.long()].permute(0, 3, 1, 2)
        return images.float().mul_(0.5).add_(heat.float().mul_(0.5)).round_().to(torch.uint8)

    overlays = list(blend())
    return {
        "decode": decode,
        f"resize to the model's {side}": lambda: TF.resize(images, [side, side], antialias=True),
        "map at the overlay's size": levels,
        "colours and blend": blend,
        "encode": lambda: [jpeg.cpu() for jpeg in torchvision.io.encode_jpeg(overlays, quality=JPEG_QUALITY)],
    }


def _device_rows(ctx: BenchContext, name, max_side, body, output, cam, encoded) -> list[dict[str, object]]:
    """:func:`device_steps` timed on the run's device, ms per image, and the device's overlay's PSNR against the one
    the service ships."""
    steps = device_steps(body, output, ctx.spec.input_size, cam, ctx.device, DEVICE_BATCH)
    medians = ctx.timed(steps, ctx.config.repeats, 1)
    contender = f"torch on {ctx.device}, batch {DEVICE_BATCH}"
    rows = [
        {"photo": name, "max_side": max_side, "jpeg_bytes": len(body), "step": step, "contender": contender,
         "ms": 1000 * seconds / DEVICE_BATCH, "ships": False, "device": True}
        for step, seconds in medians.items()
    ]  # fmt: skip
    jpeg = steps["encode"]()[0].numpy().tobytes()
    psnr = _psnr(simplejpeg.decode_jpeg(jpeg), simplejpeg.decode_jpeg(encoded))
    rows.append(
        {"photo": name, "max_side": max_side, "jpeg_bytes": len(body), "step": "device fidelity",
         "contender": contender, "psnr_against_shipped_db": psnr}
    )  # fmt: skip
    return rows


def image_work(ctx: BenchContext) -> list[dict[str, object]]:
    """Each step of one photo's image work, median ms per image, every contender timed round-robin within its
    step; one row per (photo, step, contender), ``ships`` marking the service's own. The service's decode is the
    one at the overlay's size (a 12 MP photo at 1/2 scale, from its DCT coefficients); torchvision's CPU decoder
    has no reduced scale, so it decodes in full. A last row per photo gives the overlay's PSNR against the one
    served before, beside JPEG's own noise (that overlay's PSNR against its pixels). The smooth 1080p photo
    (:data:`SMOOTH`) is timed the same way at the shipped ``max_side``. On a CUDA device, each camera-like photo at
    the shipped ``max_side`` also gets :func:`device_steps`' rows (``device``: True), and its overlay's PSNR
    against the shipped one."""
    timed, repeats = ctx.timed, ctx.config.repeats
    rows: list[dict[str, object]] = []
    cam = np.random.default_rng(1).random((7, 7)).astype(np.float32)  # a layer4 map of ResNet-50
    photos = [(name, max_side, camera_photo(size)) for (name, size), max_side in itertools.product(
        PHOTOS.items(), MAX_SIDES)]  # fmt: skip
    photos.append((SMOOTH, MAX_SIDES[0], camera_photo(PHOTOS["1080p"], smooth=True)))
    for name, max_side, body in photos:
        opened = open_image(body)
        output = snap_to_decode_scale(opened, fit_within(opened.width, opened.height, max_side))
        scale = opened.width // output[0]
        rgb = load_rgb(opened, at_least=output)
        heat, levels = map_at(cam, rgb.shape[:2]), levels_at(cam, rgb.shape[:2])
        overlay = render_overlay(rgb, levels, 0.5, "jet")
        encoded = encode_image(overlay, "jpeg")
        steps = _steps(body, output, scale, ctx.spec.input_size, cam, rgb, heat, levels, overlay, encoded)
        for step, contenders in steps.items():
            medians = timed(contenders, repeats, 1)
            for index, (contender, seconds) in enumerate(medians.items()):
                rows.append(
                    {"photo": name, "max_side": max_side, "jpeg_bytes": len(body), "step": step,
                     "contender": contender, "ms": 1000 * seconds, "ships": index == 0}
                )  # fmt: skip
        before = _opencv_jpeg(_float_colours(rgb, heat))
        rows.append(
            {
                "photo": name, "max_side": max_side, "jpeg_bytes": len(body), "step": "fidelity",
                "output": f"{rgb.shape[1]}x{rgb.shape[0]}",
                "psnr_against_before_db": _psnr(simplejpeg.decode_jpeg(encoded), simplejpeg.decode_jpeg(before)),
                "jpeg_noise_psnr_db": _psnr(simplejpeg.decode_jpeg(before), _float_colours(rgb, heat)),
            }
        )  # fmt: skip
        if ctx.device.type == "cuda" and max_side == MAX_SIDES[0] and name != SMOOTH:
            rows += _device_rows(ctx, name, max_side, body, output, cam, encoded)
    return rows


def image_work_totals(rows: list[dict[str, object]]) -> dict[tuple[str, int], dict[str, float]]:
    """Per photo and max_side: the service's image work per image (its shipped contender of every step) and the
    same steps as served before (Pillow's decode, the float map and its colours, OpenCV's encode), in ms; and where
    the run timed them, the same steps on the device (``device``), per image of its batch."""
    before = {
        "decode": "Pillow",
        "map at the overlay's size": "float map, min-max in place",
        "colours and blend": "float arrays",
        "encode": "OpenCV",
    }
    before |= {step: "OpenCV area" for step in {row["step"] for row in rows} if step.startswith("resize")}
    totals: dict[tuple[str, int], dict[str, float]] = {}
    for row in rows:
        if "fidelity" in row["step"]:
            continue
        photo = totals.setdefault((row["photo"], row["max_side"]), {"ships": 0.0, "before": 0.0})
        if row.get("device"):
            photo["device"] = photo.get("device", 0.0) + row["ms"]
            continue
        if row["ships"]:
            photo["ships"] += row["ms"]
        if row["contender"] == before.get(row["step"]) or (row["ships"] and row["step"] not in before):
            photo["before"] += row["ms"]
    return totals


def image_work_lines(rows: list[dict[str, object]]) -> list[str]:
    """The report's lines: every step's contenders, the totals and the overlay's fidelity."""
    lines = ["", "Image work per photo, in process, one thread (medians, ms; * ships; the camera-like photos, then the "
             f"{SMOOTH} photo the target was set on; rows on a device are per image of its batch):", ""]  # fmt: skip
    lines += ["| photo | max_side | step | contender | ms |", "|---|---:|---|---|---:|"]
    for row in rows:
        if "fidelity" not in row["step"]:
            mark = " *" if row["ships"] else ""
            lines.append(
                f"| {row['photo']} | {row['max_side']} | {row['step']} | {row['contender']}{mark} | {row['ms']:.2f} |"
            )
    lines.append("")
    for (photo, max_side), total in image_work_totals(rows).items():
        fidelity = next(r for r in rows if (r["photo"], r["max_side"]) == (photo, max_side) and r["step"] == "fidelity")
        lines.append(
            f"- {photo} at max_side {max_side} ({fidelity['jpeg_bytes']} bytes, overlay {fidelity['output']}): "
            f"{total['ships']:.1f} ms "
            f"per image, {total['before']:.1f} ms with the codecs served before; the overlay's PSNR against the "
            f"one served before {fidelity['psnr_against_before_db']:.1f} dB, JPEG's own noise "
            f"{fidelity['jpeg_noise_psnr_db']:.1f} dB."
        )
        device = next((r for r in rows if (r["photo"], r["max_side"], r["step"]) == (photo, max_side,
                       "device fidelity")), None)  # fmt: skip
        if device:
            lines.append(
                f"  - the same steps {device['contender']}: {total['device']:.1f} ms per image, its overlay's PSNR "
                f"against the shipped one {device['psnr_against_shipped_db']:.1f} dB."
            )
    return lines
