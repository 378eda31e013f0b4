"""From an audit's rows to its findings: per-class figures, each class's mean map and its peak region, SpRAy's
strategies (spectral clustering of the maps, the eigengap choosing their count) and the Clever-Hans flags.

The rules, with their thresholds (docs/audit.md):

- **With boxes** a class is flagged when its pointing (the share of its maps that peak inside the object's box) is
  below :data:`POINTING_FLOOR` and below :data:`RELATIVE` times the median of the other classes' pointing, or its
  energy in the box is below :data:`ENERGY_FLOOR` and below :data:`ENERGY_RELATIVE` times the others' median energy.
  Energy is the weaker signal at a coarse layer (a smooth map spreads its mass over a small box's neighbours), so
  its thresholds are stricter.
- **Without boxes** a class is flagged when at least :data:`CONCENTRATION` of its maps peak inside one small fixed
  region (its mean map's peak region, at most :data:`REGION_AREA` of the image) and that share is at least
  :data:`CONTRAST` times the other classes' pooled share for the same region: the class's evidence sits in one place
  whatever its images show, where other classes' evidence moves with their content. SpRAy's dominant cluster and
  its prototype are reported beside it.

A class needs :data:`MIN_IMAGES` explained images to be judged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "CONCENTRATION",
    "CONTRAST",
    "ENERGY_FLOOR",
    "ENERGY_RELATIVE",
    "MIN_IMAGES",
    "POINTING_FLOOR",
    "REGION_AREA",
    "RELATIVE",
    "ClassFindings",
    "Strategy",
    "analyse",
    "peak_region",
    "spray",
]

POINTING_FLOOR = 0.5
ENERGY_FLOOR = 0.05
RELATIVE = 0.5
ENERGY_RELATIVE = 0.25
CONCENTRATION = 0.6
CONTRAST = 2.0
REGION_AREA = 0.1
MIN_IMAGES = 5
MAX_STRATEGIES = 6


@dataclass
class Strategy:
    """One SpRAy cluster of a class's maps: its members (row indices into the class), prototype (mean map) and
    tightness (mean correlation of its maps with the prototype)."""

    members: list[int]
    prototype: np.ndarray
    tightness: float


@dataclass
class ClassFindings:
    index: int
    name: str
    images: int
    """Rows of this class explained without error."""
    accuracy: float | None
    pointing: float | None
    energy_in_box: float | None
    peak_region: tuple[float, float, float, float]
    """(x0, y0, x1, y1) in 0–1 image coordinates."""
    concentration: float
    """The share of the class's maps whose peak lies in ``peak_region``."""
    mean_map: np.ndarray
    strategies: list[Strategy] = field(default_factory=list)
    flagged: bool = False
    reason: str | None = None
    rows: list[int] = field(default_factory=list)
    """Indices of this class's rows in the audit's ok rows."""

    def summary(self) -> dict[str, object]:
        rounded = lambda v: None if v is None else round(float(v), 4)  # noqa: E731
        return {
            "class": self.name,
            "index": self.index,
            "images": self.images,
            "accuracy": rounded(self.accuracy),
            "pointing": rounded(self.pointing),
            "energy_in_box": rounded(self.energy_in_box),
            "peak_region": [round(float(v), 3) for v in self.peak_region],
            "concentration": rounded(self.concentration),
            "strategies": [len(s.members) for s in self.strategies],
            "flagged": self.flagged,
            "reason": self.reason,
        }


def peak_region(mean_map: np.ndarray, level: float = 0.5, max_area: float = REGION_AREA) -> tuple[float, ...]:
    """The hottest region of a map, (x0, y0, x1, y1) in 0–1 coordinates: the bounding box of the connected area
    around its peak where it reaches ``level`` of its peak (above its minimum), raised until the box covers at most
    ``max_area`` of the image."""
    import cv2

    height, width = mean_map.shape
    span = float(mean_map.max() - mean_map.min())
    if span <= 0:
        return (0.0, 0.0, 1.0, 1.0)
    scaled = (mean_map - mean_map.min()) / span
    peak = np.unravel_index(int(np.argmax(scaled)), scaled.shape)
    for threshold in np.linspace(level, 0.99, 25):
        _, labels = cv2.connectedComponents((scaled >= threshold).astype(np.uint8), connectivity=8)
        ys, xs = np.nonzero(labels == labels[peak])
        box = (xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height)
        if (box[2] - box[0]) * (box[3] - box[1]) <= max_area:
            return box
    return box


def _peaks_in(thumbnails: np.ndarray, region: Sequence[float]) -> np.ndarray:
    """For each (side, side) map, whether its peak lies in ``region`` (0–1 coordinates)."""
    count, side = len(thumbnails), thumbnails.shape[-1]
    if count == 0:
        return np.zeros(0, dtype=bool)
    flat = thumbnails.reshape(count, -1).argmax(axis=1)
    ys, xs = (flat // side + 0.5) / side, (flat % side + 0.5) / side
    x0, y0, x1, y1 = region
    return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)


def spray(thumbnails: np.ndarray, max_strategies: int = MAX_STRATEGIES, seed: int = 0) -> list[Strategy]:
    """SpRAy (Lapuschkin et al., Nature Communications 2019) on one class's maps: each map downsampled (2×2 means)
    and normalised to unit sum, a symmetric k-nearest-neighbour affinity, the eigenvalues of its normalised
    Laplacian, the count of clusters at the largest gap among the first ``max_strategies`` (the eigengap), then
    spectral clustering with that count. Largest cluster first."""
    from sklearn.cluster import SpectralClustering
    from sklearn.neighbors import kneighbors_graph

    count = len(thumbnails)
    if count < 4:
        return [_strategy(thumbnails, list(range(count)))] if count else []
    side = thumbnails.shape[-1]
    small = thumbnails.reshape(count, side // 2, 2, side // 2, 2).mean(axis=(2, 4)).reshape(count, -1)
    small = small / np.maximum(small.sum(axis=1, keepdims=True), 1e-12)
    neighbours = min(10, count - 1)
    graph = kneighbors_graph(small, neighbours, include_self=False)
    affinity = 0.5 * (graph + graph.T).toarray()
    degree = affinity.sum(axis=1)
    inverse_root = 1 / np.sqrt(np.maximum(degree, 1e-12))
    laplacian = np.eye(count) - inverse_root[:, None] * affinity * inverse_root[None, :]
    values = np.sort(np.linalg.eigvalsh(laplacian))[: max_strategies + 1]
    clusters = int(np.argmax(np.diff(values))) + 1
    if clusters == 1:
        labels = np.zeros(count, dtype=int)
    else:
        model = SpectralClustering(clusters, affinity="precomputed", random_state=seed, assign_labels="discretize")
        labels = model.fit_predict(affinity)
    strategies = [_strategy(thumbnails, np.flatnonzero(labels == k).tolist()) for k in np.unique(labels)]
    return sorted(strategies, key=lambda s: -len(s.members))


def _strategy(thumbnails: np.ndarray, members: list[int]) -> Strategy:
    maps = thumbnails[members].reshape(len(members), -1)
    prototype = maps.mean(axis=0)
    correlations = [np.corrcoef(m, prototype)[0, 1] if m.std() > 0 and prototype.std() > 0 else 0.0 for m in maps]
    return Strategy(members, prototype.reshape(thumbnails.shape[1:]), float(np.mean(correlations)))


def _where(region: Sequence[float]) -> str:
    """A region in words: its place in the image and its share of the image's area."""
    x0, y0, x1, y1 = region
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    place = "centre" if (vertical, horizontal) == ("middle", "centre") else f"{vertical}-{horizontal}"
    return f"the {place} {100 * (x1 - x0) * (y1 - y0):.0f}% of the image"


def analyse(rows: Sequence[dict], thumbnails: np.ndarray, labels: Sequence[str], seed: int = 0) -> list[ClassFindings]:
    """Per-class findings from the audit's ok rows (``target``, ``predicted``, ``explained``, ``pointing``,
    ``energy_in_box``) and their (N, side, side) map thumbnails. A row's class is its given class, else the class
    explained (its top prediction)."""
    classes: dict[int, list[int]] = {}
    for n, row in enumerate(rows):
        index = row["target"] if row.get("target") is not None else row["explained"]
        classes.setdefault(int(index), []).append(n)
    found = []
    for index, members in sorted(classes.items()):
        given = [rows[n] for n in members if rows[n].get("target") is not None]
        accuracy = float(np.mean([r["predicted"] == r["target"] for r in given])) if given else None
        pointing = [rows[n]["pointing"] for n in members if rows[n].get("pointing") is not None]
        energy = [rows[n]["energy_in_box"] for n in members if rows[n].get("energy_in_box") is not None]
        maps = thumbnails[members]
        mean_map = maps.mean(axis=0)
        region = peak_region(mean_map)
        found.append(
            ClassFindings(
                index=index,
                name=labels[index] if index < len(labels) else str(index),
                images=len(members),
                accuracy=accuracy,
                pointing=float(np.mean(pointing)) if pointing else None,
                energy_in_box=float(np.mean(energy)) if energy else None,
                peak_region=region,
                concentration=float(_peaks_in(maps, region).mean()),
                mean_map=mean_map,
                strategies=spray(maps, seed=seed),
                rows=members,
            )
        )
    _flag(found, thumbnails)
    return found


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.median(known)) if known else None


def _flag(found: list[ClassFindings], thumbnails: np.ndarray) -> None:
    for item in found:
        if item.images < MIN_IMAGES:
            continue
        others = [other for other in found if other is not item]
        where = f"{100 * item.concentration:.0f}% of the maps peak in {_where(item.peak_region)}"
        reasons = []
        if item.pointing is not None:
            pointing = _median([o.pointing for o in others])
            energy = _median([o.energy_in_box for o in others])
            low_pointing = pointing is not None and item.pointing < min(POINTING_FLOOR, RELATIVE * pointing)
            low_energy = energy is not None and item.energy_in_box < min(ENERGY_FLOOR, ENERGY_RELATIVE * energy)
            if low_pointing or low_energy:
                reasons.append(
                    f"{where}; pointing {item.pointing:.2f} against {pointing:.2f} for the other classes (median), "
                    f"energy in the box {item.energy_in_box:.2f} against {energy:.2f}"
                )
        else:
            other_rows = [n for o in others for n in o.rows]
            elsewhere = float(_peaks_in(thumbnails[other_rows], item.peak_region).mean()) if other_rows else 0.0
            area = (item.peak_region[2] - item.peak_region[0]) * (item.peak_region[3] - item.peak_region[1])
            if (
                item.concentration >= CONCENTRATION
                and area <= REGION_AREA
                and item.concentration >= CONTRAST * max(elsewhere, 1e-9)
            ):
                dominant = item.strategies[0] if item.strategies else None
                cluster = (
                    f"; SpRAy's dominant strategy holds {len(dominant.members)} of {item.images} maps "
                    f"(tightness {dominant.tightness:.2f})"
                    if dominant
                    else ""
                )
                reasons.append(f"{where}, against {100 * elsewhere:.0f}% of the other classes' maps{cluster}")
        if reasons:
            item.flagged, item.reason = True, "; ".join(reasons)
