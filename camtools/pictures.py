"""Pictures for people to look at, made by the tools (never served): contact sheets of overlays."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["describe", "render_contact_sheet"]


def render_contact_sheet(tiles: list[np.ndarray], captions: list[str], height: int = 320) -> np.ndarray:
    """RGB tiles side by side at one height, each above a caption bar: the original, then one overlay per target."""
    bar, gap, font = 44, 8, cv2.FONT_HERSHEY_SIMPLEX
    columns = []
    for tile, caption in zip(tiles, captions, strict=True):
        width = max(1, round(tile.shape[1] * height / tile.shape[0]))
        resized = cv2.resize(tile, (width, height), interpolation=cv2.INTER_AREA)
        label = np.full((bar, width, 3), 255, np.uint8)
        scale = min(0.6, 0.95 * width / max(1, cv2.getTextSize(caption, font, 1.0, 1)[0][0]))
        cv2.putText(label, caption, (6, bar - 14), font, scale, (20, 20, 20), 1, cv2.LINE_AA)
        columns += [np.vstack([resized, label]), np.full((height + bar, gap, 3), 255, np.uint8)]
    return np.hstack(columns[:-1])


def describe(item: dict[str, object]) -> str:
    """A prediction or explanation of a response in a few words: its probability (and whether a multi-label class
    is positive), a regression output's value, a detection's score or a segment's share; never a probability where
    there is none."""
    if "value" in item:
        return f"value={item['value']:.4g}"
    if "score" in item:
        return f"score={item['score']:.3f}"
    if "share" in item:
        return f"share={item['share']:.1%}"
    if "similarity" in item:
        return f"similarity={item['similarity']:.3f}"
    text = f"p={item['probability']:.3f}"
    return text + (" positive" if item.get("positive") else "") if "positive" in item else text
