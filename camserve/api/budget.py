"""The server's work budget: what one request may ask of a worker, checked from its options and the image header
before any pixel is decoded, with advice that comes from the method records."""

from __future__ import annotations

from dataclasses import dataclass

from camserve import settings
from camserve.cam import METHODS
from camserve.errors import ClientError

__all__ = ["WorkBudget"]


@dataclass(frozen=True)
class WorkBudget:
    """Set at build time (``scripts/build_mar.py --max-side ...``); the defaults (:mod:`camserve.settings`) keep a
    full batch of the largest allowed requests well inside the response timeout on two CPU cores."""

    max_side: int = settings.DEFAULT_OUTPUT_SIDE
    """The longer side of the overlays and heatmaps when a request gives no ``max_side``."""
    max_output_pixels: int = settings.MAX_OUTPUT_PIXELS
    """Output pixels × explanations, per request."""
    max_forward_passes: int = settings.MAX_FORWARD_PASSES
    """Forward passes per request, as the method records count them, plus faithfulness's and the sanity check's."""
    max_response_bytes: int = settings.MAX_RESPONSE_BYTES
    max_output_voxels: int = settings.MAX_OUTPUT_VOXELS
    """A volume's voxels × explanations, per request (each map is upsampled to the volume)."""
    """The largest response body: TorchServe's ``max_response_size`` in the shipped config.properties."""

    def output_size(self, width: int, height: int, max_side: int | None) -> tuple[int, int]:
        """(width, height) of the overlays: the image scaled so that its longer side is at most ``max_side``."""
        side = self.max_side if max_side is None else max_side
        scale = min(1.0, side / max(width, height))
        return max(1, round(width * scale)), max(1, round(height * scale))

    def check(
        self,
        explanations: int,
        output: tuple[int, int],
        method: str,
        method_passes: int,
        faithfulness_passes: int = 0,
        sanity_passes: int = 0,
    ) -> None:
        """Refuse a request whose work is over budget, saying how much it asked for and how to fit."""
        width, height = output
        pixels = explanations * width * height
        if pixels > self.max_output_pixels:
            fitting = self.max_output_pixels // (width * height)
            side = int(max(width, height) * (self.max_output_pixels / pixels) ** 0.5)
            advice = f"ask for at most {fitting} explanations at this size, or " if fitting else ""
            raise ClientError(
                "OverBudget",
                f"this request asks for {explanations} explanation(s) of {width}x{height} pixels = "
                f"{pixels / 1e6:.1f} megapixels of output; at most {self.max_output_pixels / 1e6:g} megapixels are "
                f"rendered per request: {advice}set max_side to {max(settings.MIN_OUTPUT_SIDE, side)} or less",
            )
        passes = method_passes + faithfulness_passes + sanity_passes
        if passes > self.max_forward_passes:
            raise ClientError(
                "OverBudget", self._passes_advice(method, method_passes, faithfulness_passes, sanity_passes)
            )

    def _passes_advice(self, method: str, method_passes: int, faithfulness_passes: int, sanity_passes: int) -> str:
        total = method_passes + faithfulness_passes + sanity_passes
        parts = [f"{method}: {method_passes}"] + (
            [f"faithfulness: {faithfulness_passes}"] if faithfulness_passes else []
        )
        parts += [f"sanity: {sanity_passes}"] if sanity_passes else []
        ways = []
        if method_passes > 1:
            one_pass = ", ".join(name for name, record in METHODS.items() if record.one_pass)
            ways.append(f"a method that costs one pass ({one_pass}) and no aug_smooth")
        if faithfulness_passes:
            ways.append("fewer faithfulness_steps or no faithfulness")
        if sanity_passes > 1:
            ways.append("no sanity")
        ways.append(f"or an archive built with --max-forward-passes {total} or more")
        return (
            f"this request needs {total} forward passes ({'; '.join(parts)}); at most {self.max_forward_passes} are "
            f"run per request: choose {', '.join(ways)}"
        )

    def check_voxels(self, explanations: int, voxels: int) -> None:
        """Refuse a volume whose maps, at its own shape, would be over budget."""
        if explanations * voxels > self.max_output_voxels:
            fitting = self.max_output_voxels // voxels
            raise ClientError(
                "OverBudget",
                f"this request asks for {explanations} explanation(s) of a {voxels}-voxel volume; at most "
                f"{self.max_output_voxels} voxels of maps are made per request: ask for at most {max(fitting, 1)}",
            )

    def check_response(self, size: int) -> None:
        if size > self.max_response_bytes:
            raise ClientError(
                "ResponseTooLarge",
                f"the response would be over {size} bytes; at most {self.max_response_bytes} are sent: ask for "
                "fewer explanations, a smaller max_side, format jpeg, or no heatmap",
            )
