"""The errors of an adapter that cannot be served. Their own module, so that every reader of
adapter files (the directory spec, the safetensors header, the S3 source) raises the one kind
the API maps to a status."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter directory that cannot be served; the message names the reason."""


class AdapterReadError(AdapterError):
    """The adapter's files could not be read (an I/O error): the requests waiting for this
    load fail with the reason; a later request tries the disk again."""
