"""The one error type that becomes a 4xx answer: it says what was wrong and what is accepted."""

from __future__ import annotations


class ClientError(ValueError):
    """A request that is answered with ``status`` (a 4xx). ``kind`` is the error type that the API reports."""

    def __init__(self, kind: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status

    def to_dict(self) -> dict[str, object]:
        """The error body: ``{"code": 400, "type": "...", "message": "..."}``."""
        return {"code": self.status, "type": self.kind, "message": self.message}
