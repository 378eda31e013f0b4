"""Volumes: NIfTI files (``.nii``, ``.nii.gz``) read under a voxel limit, their intensities scaled, resized for a 3D
network, and an explanation's answer: the map as a NIfTI with the input's affine, a montage of the three orthogonal
slices through its peak, and the peak in voxels and in world coordinates.

The header is read first (a header may declare 3000³ voxels in a few bytes): its dimensions are checked against the
limit before any voxel is read, and a gzip'd file is inflated only up to the bytes its header declares. Resizing is
separable linear interpolation with OpenCV, trilinear with half-pixel centres (torch's ``align_corners=False``): the
decode and render threads call no torch operator.
"""

from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass

import cv2
import numpy as np

from camserve.errors import ClientError

__all__ = [
    "OpenedVolume",
    "heatmap_nifti",
    "is_nifti",
    "montage",
    "open_nifti",
    "peak_of",
    "resize_volume",
    "scale_intensity",
]

NIFTI_HEADER = 348
"""A NIfTI-1 header's size; the voxels start at its ``vox_offset`` (352 in a single file)."""


@dataclass(frozen=True)
class OpenedVolume:
    """A NIfTI file whose header has been read and checked; its voxels are read on :meth:`voxels`."""

    image: object
    """nibabel's image."""
    shape: tuple[int, int, int]
    """Its (i, j, k) voxels."""
    affine: np.ndarray
    """Voxel (i, j, k) to world (x, y, z) in mm, 4x4."""

    def voxels(self) -> np.ndarray:
        """The volume, float32 (i, j, k), its scale slope and intercept applied."""
        try:
            data = np.asarray(self.image.dataobj, dtype=np.float32)
        except Exception as error:  # nibabel's many errors on a truncated or inconsistent file
            raise ClientError("InvalidImage", f"the NIfTI voxels could not be read: {type(error).__name__}") from None
        if not np.isfinite(data).all():
            data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
        return data.reshape(self.shape)


def is_nifti(data: bytes | bytearray) -> bool:
    """A NIfTI-1 or NIfTI-2 file, or a gzip'd one (every upload to a 3D model is read as one)."""
    head = bytes(data[:4])
    return head[:2] == b"\x1f\x8b" or bytes(data[344:348]) in (b"n+1\x00", b"ni1\x00") or head == b"\x1c\x02\x00\x00"


def open_nifti(data: bytes | bytearray, max_voxels: int, max_bytes: int) -> OpenedVolume:
    """Read and check a NIfTI header: three spatial dimensions (a fourth of size 1 allowed), at most ``max_voxels``
    voxels; then the file, a gzip'd one inflated to at most the bytes its header declares (and ``max_bytes``)."""
    import nibabel

    raw = bytes(data)
    if not is_nifti(raw):
        raise ClientError(
            "InvalidImage",
            "this model explains 3D volumes: send a NIfTI file (.nii or .nii.gz), not a 2D image or another format",
        )
    gzipped = raw[:2] == b"\x1f\x8b"
    head = _inflate(raw, NIFTI_HEADER) if gzipped else raw[:NIFTI_HEADER]
    try:
        header = nibabel.Nifti1Header.from_fileobj(io.BytesIO(head), check=False)
        dims = [int(v) for v in header.get_data_shape()]
        itemsize = int(header.get_data_dtype().itemsize)
        offset = int(header.get_data_offset())
    except Exception as error:
        raise ClientError(
            "InvalidImage", f"the body is not a NIfTI-1 file (.nii or .nii.gz) a 3D model reads: {type(error).__name__}"
        ) from None
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3 or min(dims) < 2:
        raise ClientError(
            "InvalidImage",
            f"the NIfTI volume has dimensions {dims}; this model takes a 3D volume (i, j, k), each side at least 2",
        )
    voxels = dims[0] * dims[1] * dims[2]
    if voxels > max_voxels:
        raise ClientError(
            "ImageTooLarge",
            f"the NIfTI header declares {dims[0]}x{dims[1]}x{dims[2]} = {voxels} voxels; at most {max_voxels} are "
            "accepted",
            status=413,
        )
    needed = offset + voxels * itemsize
    if needed > max_bytes:
        raise ClientError("ImageTooLarge", f"the NIfTI volume needs {needed} bytes; at most {max_bytes}", status=413)
    body = _inflate(raw, needed) if gzipped else raw
    if len(body) < needed:
        raise ClientError("InvalidImage", f"the NIfTI file is truncated: {len(body)} of its {needed} bytes")
    try:
        image = nibabel.Nifti1Image.from_bytes(body[:needed])
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as error:
        raise ClientError("InvalidImage", f"the NIfTI file could not be read: {type(error).__name__}") from None
    if not np.isfinite(affine).all():
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
    return OpenedVolume(image, (dims[0], dims[1], dims[2]), affine)


def _inflate(data: bytes, most: int) -> bytes:
    """At most ``most`` bytes of a gzip stream, inflated as far as needed and no further (no gzip bomb)."""
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    try:
        return inflater.decompress(data, most)
    except zlib.error:
        raise ClientError("InvalidImage", "the .nii.gz file is not valid gzip") from None


def scale_intensity(volume: np.ndarray, intensity: str) -> np.ndarray:
    """The volume to [0, 1]: ``minmax`` (its own range) or ``window:LOW,HIGH`` (clipped to the window, then scaled:
    CT in Hounsfield units)."""
    if intensity.startswith("window:"):
        low, high = (float(v) for v in intensity.removeprefix("window:").split(","))
    else:
        low, high = float(volume.min()), float(volume.max())
    if high <= low:
        return np.zeros_like(volume, dtype=np.float32)
    return np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)


def resize_volume(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A float32 (i, j, k) volume at ``shape``, by linear interpolation along each axis with half-pixel centres:
    torch's ``interpolate(mode="trilinear", align_corners=False)`` (no antialiasing)."""
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    if volume.shape == tuple(shape):
        return volume
    i, j, k = volume.shape
    target_i, target_j, target_k = shape
    planes = volume.reshape(i, j, k)
    if (j, k) != (target_j, target_k):
        planes = np.stack([cv2.resize(plane, (target_k, target_j), interpolation=cv2.INTER_LINEAR) for plane in planes])
    if i != target_i:
        flat = planes.reshape(i, target_j * target_k)
        planes = _resize_rows(flat, target_i).reshape(target_i, target_j, target_k)
    return np.ascontiguousarray(planes)


def _resize_rows(flat: np.ndarray, rows: int) -> np.ndarray:
    """(n, m) to (rows, m) along the first axis, linear with half-pixel centres, in chunks of columns (OpenCV
    resizes images of at most 32767 columns)."""
    chunks = [
        cv2.resize(
            flat[:, start : start + 32000], (min(32000, flat.shape[1] - start), rows), interpolation=cv2.INTER_LINEAR
        )
        for start in range(0, flat.shape[1], 32000)
    ]
    return np.concatenate(chunks, axis=1)


def peak_of(heat: np.ndarray, affine: np.ndarray) -> dict[str, list]:
    """The map's highest voxel (i, j, k), and its world coordinates (x, y, z) in mm by the affine."""
    voxel = [int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape)]
    world = affine @ np.array([*voxel, 1.0])
    return {"voxel": voxel, "world": [round(float(v), 3) for v in world[:3]]}


def heatmap_nifti(heat: np.ndarray, affine: np.ndarray) -> bytes:
    """The map, float32 in [0, 1] at the input's shape, as a gzip'd NIfTI-1 file with the input's affine: it opens
    over the input in 3D Slicer or ITK-SNAP."""
    import nibabel

    image = nibabel.Nifti1Image(np.asarray(heat, dtype=np.float32), affine)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def montage(grey: np.ndarray, heat: np.ndarray, voxel: list[int], render, side: int = 256) -> np.ndarray:
    """The three orthogonal slices through ``voxel`` (the planes k, j and i), each the map over the scaled volume
    drawn by ``render(rgb, heat)``, side by side at ``side`` pixels high."""
    i, j, k = voxel
    cuts = [(grey[:, :, k], heat[:, :, k]), (grey[:, j, :], heat[:, j, :]), (grey[i, :, :], heat[i, :, :])]
    tiles = []
    for plane, plane_heat in cuts:
        plane, plane_heat = np.rot90(plane), np.rot90(plane_heat)  # the first axis across, the second up
        rgb = np.repeat(np.round(np.clip(plane, 0, 1) * 255).astype(np.uint8)[:, :, None], 3, axis=2)
        drawn = render(np.ascontiguousarray(rgb), np.ascontiguousarray(plane_heat, dtype=np.float32))
        width = max(1, round(drawn.shape[1] * side / drawn.shape[0]))
        tiles += [cv2.resize(drawn, (width, side), interpolation=cv2.INTER_LINEAR), np.zeros((side, 4, 3), np.uint8)]
    return np.hstack(tiles[:-1])
