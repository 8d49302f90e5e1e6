"""The rich status details of a failed call: google.rpc RetryInfo and QuotaFailure.

The server puts them in the `grpc-status-details-bin` trailer (a serialized google.rpc.Status)
when a tenant limit refuses a call. The SDK needs only grpcio and protobuf, so it does not
import googleapis-common-protos: the few message types it reads are declared here, with the
same field numbers, in a private descriptor pool (no clash with google.rpc's own, wherever
that is also loaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

TRAILER = "grpc-status-details-bin"
_RETRY_INFO = "google.rpc.RetryInfo"
_QUOTA_FAILURE = "google.rpc.QuotaFailure"

_F = descriptor_pb2.FieldDescriptorProto


def _message(file: descriptor_pb2.FileDescriptorProto, name: str, *fields: tuple[str, int, int, str | None, bool]) -> None:
    m = file.message_type.add(name=name)
    for field_name, number, kind, type_name, repeated in fields:
        f = m.field.add(name=field_name, number=number, type=kind)  # type: ignore[arg-type]
        f.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
        if type_name is not None:
            f.type_name = type_name


def _classes() -> dict[str, Any]:
    file = descriptor_pb2.FileDescriptorProto(name="loraplex_client/status_details.proto", package="lx", syntax="proto3")
    _message(file, "Any", ("type_url", 1, _F.TYPE_STRING, None, False), ("value", 2, _F.TYPE_BYTES, None, False))
    _message(
        file, "Status", ("code", 1, _F.TYPE_INT32, None, False), ("message", 2, _F.TYPE_STRING, None, False),
        ("details", 3, _F.TYPE_MESSAGE, ".lx.Any", True),
    )
    _message(file, "Duration", ("seconds", 1, _F.TYPE_INT64, None, False), ("nanos", 2, _F.TYPE_INT32, None, False))
    _message(file, "RetryInfo", ("retry_delay", 1, _F.TYPE_MESSAGE, ".lx.Duration", False))
    _message(file, "Violation", ("subject", 1, _F.TYPE_STRING, None, False), ("description", 2, _F.TYPE_STRING, None, False))
    _message(file, "QuotaFailure", ("violations", 1, _F.TYPE_MESSAGE, ".lx.Violation", True))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"lx.{name}"))
        for name in ("Status", "RetryInfo", "QuotaFailure")
    }


_CLASSES = _classes()


@dataclass(frozen=True, slots=True)
class StatusDetails:
    retry_delay: float | None = None  # seconds, from RetryInfo
    quota_limit: str | None = None  # the violated limit's name, from QuotaFailure (e.g. "max_requests")


def status_details(error: Any) -> StatusDetails:
    """What a failed call's trailer says; empty when it has no (readable) details."""
    trailer = None
    try:
        for key, value in error.trailing_metadata() or ():
            if key == TRAILER:
                trailer = value
    except Exception:  # a bare RpcError, or a call without trailers
        return StatusDetails()
    if not isinstance(trailer, bytes):
        return StatusDetails()
    retry_delay, limit = None, None
    try:
        status = _CLASSES["Status"].FromString(trailer)
        for detail in status.details:
            kind = detail.type_url.rsplit("/", 1)[-1]
            if kind == _RETRY_INFO:
                delay = _CLASSES["RetryInfo"].FromString(detail.value).retry_delay
                retry_delay = delay.seconds + delay.nanos / 1e9
            elif kind == _QUOTA_FAILURE:
                violations = _CLASSES["QuotaFailure"].FromString(detail.value).violations
                if violations:
                    limit = violations[0].subject
    except DecodeError:
        return StatusDetails()
    return StatusDetails(retry_delay, limit)
