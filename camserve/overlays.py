"""Drawing on images: a map at an image's size, its colours, the overlay styles, detection boxes and segment
outlines, the PASCAL VOC palette. Pure OpenCV and NumPy over uint8 where it can be: these run in the render threads,
which must not start a torch operator (:func:`map_at`)."""

from __future__ import annotations

import functools

import cv2
import numpy as np

__all__ = [
    "COLORMAPS",
    "LEVEL_OVERLAYS",
    "OVERLAYS",
    "clip_map",
    "colour_table",
    "draw_detection",
    "levels_at",
    "map_at",
    "outline_segment",
    "render_overlay",
    "voc_palette",
]


COLORMAPS: dict[str, int] = {
    name.removeprefix("COLORMAP_").lower(): getattr(cv2, name) for name in dir(cv2) if name.startswith("COLORMAP_")
}
"""OpenCV colormaps by lower-case name: ``jet``, ``turbo``, ``viridis``, ``inferno``, ..."""


OVERLAYS = ("heatmap", "outline", "mask", "grayscale")
"""How a map is drawn on the photo; see :func:`render_overlay`."""
LEVEL_OVERLAYS = ("heatmap", "grayscale")
"""The styles drawn from the map's uint8 levels alone (:func:`levels_at`): its colours blended over the photo."""


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
    else:
        cam = cam.copy()
    low, high, _, _ = cv2.minMaxLoc(cam)
    if high <= low:
        return np.zeros_like(cam)
    cam -= np.float32(low)  # in place: two passes over the full-size map, no temporaries
    cam /= np.float32(high - low)
    return cam


def levels_at(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The map's colour levels at ``size`` = (H, W), uint8: round(255 · :func:`map_at`) within one level (tested,
    growing and shrinking), without its full-size float map. The grid is brought to 16-bit fixed point
    (0–32000), resized with OpenCV's bilinear (the same half-pixel sampling), then min–maxed into 8 bits in one
    saturating pass, and the colours need no conversion of their own: map, colours and blend took 4.9 ms against
    5.7 from the float map on a 1080p photo (alternated 60 times; docs/performance.md). What the heatmap and
    grayscale overlays draw when nothing needs the float map (no clip, no heatmap PNG)."""
    cam = np.asarray(cam, dtype=np.float32)
    if not np.isfinite(cam).all():  # a model's NaN or inf: the float map's levels, as served before
        return cv2.convertScaleAbs(map_at(cam, size), alpha=255.0)
    low, high = float(cam.min()), float(cam.max())
    if high <= low:  # constant: all zero, as map_at makes it
        return np.zeros(size, np.uint8)
    grid = np.round((cam - low) * np.float32(32000.0 / (high - low))).astype(np.int16)
    if grid.shape != tuple(size):
        grid = cv2.resize(grid, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    low, high, _, _ = cv2.minMaxLoc(grid)
    if high <= low:
        return np.zeros(size, np.uint8)
    return cv2.convertScaleAbs(grid, alpha=255.0 / (high - low), beta=-low * 255.0 / (high - low))


def clip_map(heat: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip a [0, 1] map to its ``low`` and ``high`` percentiles (0–100), then min–max it back to [0, 1]:
    h' = (clip(h, P_low, P_high) − P_low) / (P_high − P_low). Clipping the low end removes the faint haze, the high
    end a single hot pixel. A map that is constant between the two percentiles becomes all zero."""
    bottom, top = np.percentile(heat, (low, high))
    if top <= bottom:
        return np.zeros_like(heat)
    return (np.clip(heat, bottom, top) - bottom) / (top - bottom)


@functools.cache
def colour_table(colormap: str) -> np.ndarray:
    """The colormap's 256 colours in RGB order, (256, 1, 3) uint8: OpenCV's, whose own are BGR."""
    levels = np.arange(256, dtype=np.uint8)[:, None]
    return np.ascontiguousarray(cv2.applyColorMap(levels, COLORMAPS[colormap])[:, :, ::-1])


def _colour_map(heat: np.ndarray, colormap: str) -> np.ndarray:
    """The map's colours, RGB uint8: its levels (uint8 ``heat`` as it is; a [0, 1] float map's round(255 · heat),
    one pass, saturating) looked up in the colormap's table (one pass), with no float image and no channel swap."""
    levels = heat if heat.dtype == np.uint8 else cv2.convertScaleAbs(np.asarray(heat, dtype=np.float32), alpha=255.0)
    return cv2.applyColorMap(levels, colour_table(colormap))


def render_overlay(
    rgb: np.ndarray, heat: np.ndarray, alpha: float, colormap: str, overlay: str = "heatmap", region: float = 0.2
) -> np.ndarray:
    """Draw the map on the image. ``heat`` is an (H, W) float map in [0, 1] at the image's resolution, or its uint8
    levels (:func:`levels_at`; level / 255 where a style needs the float map).

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
    if heat.dtype == np.uint8:
        heat = heat.astype(np.float32) / np.float32(255.0)
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
