"""A test-only TorchServe entry point: the shipped handler, whose engine fails every batch that holds an all-white
image, as a fault in one row would. The live tests use it to check that only that row fails."""

from __future__ import annotations

from camserve.gradcam_handler import GradCamHandler


class FaultInjectingHandler(GradCamHandler):
    def initialize(self, context) -> None:
        super().initialize(context)
        engine = self.service.engine
        original = type(engine).__call__

        def fail_on_white(self, images, requests, keep=()):
            if any(bool((image > 2.0).all()) for image in images):  # white, after ImageNet normalisation
                raise RuntimeError("injected engine failure")
            return original(self, images, requests, keep)

        # A class made here, not at module level: TorchServe wants exactly one class in a handler module.
        engine.__class__ = type("FaultyEngine", (type(engine),), {"__call__": fail_on_white})
