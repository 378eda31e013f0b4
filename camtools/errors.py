"""The build's errors: one module that every build step can raise from, below them all in the imports."""

from __future__ import annotations

__all__ = ["BuildError", "WeightsUnavailableError"]


class BuildError(ValueError):
    """A model that cannot be served as asked; the message says what is wrong and how to fix it."""


class WeightsUnavailableError(BuildError):
    """The requested weights could not be obtained."""
