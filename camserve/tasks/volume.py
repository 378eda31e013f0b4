"""A classifier of volumes: a 3D network (MONAI's, or one's own) that reads a NIfTI volume.

Any classifier task (multiclass, multi-label, binary, regression) becomes one when its spec has a ``volume``
input: its predictions and targets are the classifier's, and what differs is owned here. The request is a NIfTI
file, checked against the voxel limit in its header; its values are scaled to [0, 1] (``minmax`` or the build's
window) and resized trilinearly to the network's input. An explanation is the layer's map (ReLU, then min–max at
the layer's grid, pytorch-grad-cam's order), upsampled trilinearly (``align_corners=False``) to the volume's own
shape: a NIfTI of the float map with the input's affine, a montage of the three orthogonal slices through its peak,
and the peak in voxels and in world coordinates. The methods are those that read a layer's positions as a set, the
gradient and activation families; the 2D-only options are refused with the reason.
"""

from __future__ import annotations

from dataclasses import fields
from functools import cache, partial

import numpy as np

from camserve.api import ExplainOptions, Explanation
from camserve.cam import CamRequest
from camserve.cam.layers import volume_map
from camserve.errors import ClientError
from camserve.imaging import encode_image, to_base64
from camserve.overlays import render_overlay
from camserve.tasks.base import Task
from camserve.volumes import heatmap_nifti, montage, open_nifti, peak_of, resize_volume, scale_intensity
from camserve.work import PreparedRequest, ServiceView, Terms

__all__ = ["of_volumes"]

_TWO_D = ("aug_smooth", "sanity", "faithfulness", "window", "clip")
"""Options that work on a 2D image: flips and brightness, a 2D copy's map, 2D deletion curves, a DICOM window,
percentiles of a 2D map."""


class _Volumes:
    """What a classifier of volumes does differently; mixed in before the classifier's own task class."""

    def prepare_input(
        self, service: ServiceView, data: bytes, options: ExplainOptions, cam: CamRequest, terms: Terms
    ) -> PreparedRequest:
        """The NIfTI volume: its header checked against the voxel limit and its maps against the budget, then its
        voxels scaled and resized to the network's input."""
        asked = [name for name in _TWO_D if getattr(options, name) not in (None, False)]
        if asked:
            raise ClientError(
                "InvalidOption",
                f"{', '.join(asked)} work on 2D images; this model explains 3D volumes: leave "
                f"{'it' if len(asked) == 1 else 'them'} out",
            )
        spec, limits = service.spec, service.limits
        opened = open_nifti(data, limits.max_voxels, limits.max_bytes * 8)
        voxels = int(np.prod(opened.shape))
        service.budget.check_voxels(cam.targets.count, voxels)
        service.budget.check(cam.targets.count, (1, 1), options.method, self.forward_passes(service.engine, cam))
        grey = scale_intensity(opened.voxels(), spec.intensity)
        model_input = resize_volume(grey, spec.volume)[..., None]
        if spec.channels > 1:
            model_input = np.repeat(model_input, spec.channels, axis=-1)
        width, height, depth = opened.shape
        return PreparedRequest(
            options, cam, grey, model_input, width, height, terms, depth=depth, affine=opened.affine
        )  # fmt: skip

    def sample_input(self) -> bytes:
        """A seeded noise volume, 24x20x16 voxels of 2 mm, as a gzip'd NIfTI."""
        noise = np.random.default_rng(0).normal(100.0, 20.0, (24, 20, 16)).astype(np.float32)
        return heatmap_nifti(noise, np.diag([2.0, 2.0, 2.0, 1.0]))

    def render_explanation(
        self, service: ServiceView, item: PreparedRequest, index: int, label: str, figure, cam, decorate=None
    ) -> Explanation:
        """The map at the volume's shape as a NIfTI, the montage through its peak, and the peak."""
        options = item.options
        grid = volume_map(np.asarray(cam, dtype=np.float32), service.engine.layers()[options.layer].shape)
        low, high = float(grid.min()), float(grid.max())
        grid = (grid - low) / (high - low) if high > low else np.zeros_like(grid)
        heat = np.clip(resize_volume(grid, item.display.shape), 0.0, 1.0)
        peak = peak_of(heat, item.affine)
        draw = partial(
            render_overlay, alpha=options.alpha, colormap=options.colormap, overlay=options.overlay,
            region=options.region,
        )  # fmt: skip
        picture = montage(item.display, heat, peak["voxel"], lambda rgb, plane: draw(rgb, plane))
        return Explanation(
            index=index, label=label, **figure, method=options.method, layer=options.layer, format=options.format,
            width=picture.shape[1], height=picture.shape[0], overlay=to_base64(encode_image(picture, options.format)),
            heatmap=to_base64(heatmap_nifti(heat, item.affine)), peak=peak,
        )  # fmt: skip


@cache
def of_volumes(task: Task) -> Task:
    """``task`` (a classifier's) for a 3D network that reads volumes."""
    volume_class = type(f"Volume{type(task).__name__}", (_Volumes, type(task)), {})
    return volume_class(**{f.name: getattr(task, f.name) for f in fields(task)})
