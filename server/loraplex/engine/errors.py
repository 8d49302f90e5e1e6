"""What the engine raises at add_request; the API maps each to its gRPC status."""

from __future__ import annotations


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full."""


class EngineClosedError(RuntimeError):
    """The engine no longer takes requests."""


class DuplicateRequestError(ValueError):
    """A request with this id is still unfinished."""
