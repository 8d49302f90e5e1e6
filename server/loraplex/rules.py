"""Rules on what callers send that more than one layer applies, each written once.

- `InvalidFieldError`: a value is outside its rule. It carries the field's name, so the CLI
  names the option it came from and the API answers INVALID_ARGUMENT naming the field,
  without reading the message. Only this error (never a stray ValueError) is a caller's
  mistake in the API's eyes.
- Adapter ids: checked by the API (every call that names one), the adapter store
  (register, and resolve before it auto-registers a directory of that name).
- s3:// adapter locations: checked by the config (adapter roots) and the S3 source
  (LoadAdapter paths).
- Request ids: made by `new_request_id` and checked by `check_request_id` (the engine, for
  every request; the API for its own before the call is logged).

The ranges of single values live beside their owner: config.py's dataclasses (options),
SamplingParams (sampling), the engine (prompt length, vocabulary). No torch here.
"""

from __future__ import annotations

import itertools
import re
import uuid


class InvalidFieldError(ValueError):
    """A value outside its rule. `field` names it; the message says what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


ADAPTER_ID_MAX_LEN = 128
_ADAPTER_ID_PART = re.compile(r"[A-Za-z0-9._-]+")


def adapter_id_problem(adapter_id: str) -> str | None:
    """Why an adapter id is invalid, or None.

    1-128 characters of A-Z a-z 0-9 . _ - in parts joined by '/' ("acme/support-v3"); no
    part is empty, "." or "..": an id names a directory under an adapter root and must
    never climb out of it or name the same directory two ways.
    """
    if not adapter_id or len(adapter_id) > ADAPTER_ID_MAX_LEN:
        return f"must have 1-{ADAPTER_ID_MAX_LEN} characters"
    parts = adapter_id.split("/")
    if not all(_ADAPTER_ID_PART.fullmatch(p) for p in parts):
        return "use A-Z a-z 0-9 . _ - in parts joined by single '/'"
    if any(p in (".", "..") for p in parts):
        return "no '.' or '..' parts"
    return None


def check_adapter_id(adapter_id: str, field: str = "adapter_id") -> None:
    problem = adapter_id_problem(adapter_id)
    if problem is not None:
        raise InvalidFieldError(field, f"{field} {adapter_id!r} is invalid: {problem}")


S3_SCHEME = "s3://"
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")


def is_s3_uri(path: object) -> bool:
    return isinstance(path, str) and path.startswith(S3_SCHEME)


def s3_uri_problem(uri: str) -> str | None:
    """Why `s3://bucket[/prefix]` is not a usable adapter location, or None."""
    if not is_s3_uri(uri):
        return "is not an s3:// URI"
    bucket, _, prefix = uri[len(S3_SCHEME) :].partition("/")
    if not _S3_BUCKET.fullmatch(bucket):
        return f"{bucket!r} is not a valid S3 bucket name"
    if any(p in ("", ".", "..") for p in prefix.strip("/").split("/")) and prefix.strip("/"):
        return "an S3 prefix may not hold empty, '.' or '..' parts"
    return None


REQUEST_ID_MAX_LEN = 128
_REQUEST_ID = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
_request_counter = itertools.count()


def check_request_id(request_id: str) -> str:
    """The id, if it is valid."""
    if not (len(request_id) <= REQUEST_ID_MAX_LEN and _REQUEST_ID.fullmatch(request_id)):
        raise InvalidFieldError(
            "request_id", f"request_id must be 1-{REQUEST_ID_MAX_LEN} printable ASCII characters without spaces"
        )
    return request_id


def new_request_id() -> str:
    """A fresh id for a request that came without one (unique in this process, and beyond it in practice)."""
    return f"req-{next(_request_counter)}-{uuid.uuid4().hex[:12]}"
