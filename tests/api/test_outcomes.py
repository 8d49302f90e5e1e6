"""Outcomes are enums end to end: each finish reason has one spelling from the engine through
the proto to the SDK, each way a request ends early maps to one gRPC status by its kind
(never by its message), and only a validation error is INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest

from loraplex.api.errors import ENDED_STATUS, ended_status, status_of
from loraplex.api.service import FINISH
from loraplex.engine.request import ErrorKind, FinishReason, RequestOutput, RequestStatus, Usage
from loraplex.rules import InvalidFieldError
from loraplex_client import FinishReason as ClientFinishReason
from loraplex_client._convert import generate_chunk, generate_result
from loraplex_proto.v1 import loraplex_pb2 as pb

# The spellings, written out: the engine's, the wire's and the SDK's must all be these.
REASONS = {"STOP": "stop", "LENGTH": "length", "ABORTED": "aborted"}


def test_finish_reasons_have_one_spelling_everywhere() -> None:
    assert {r.name: r.value for r in FinishReason if r is not FinishReason.ERROR} == REASONS
    assert {r.name: r.value for r in ClientFinishReason if r is not ClientFinishReason.UNKNOWN} == REASONS
    names = pb.FinishReason.keys()  # an EnumTypeWrapper: its names
    wire = {name.removeprefix("FINISH_REASON_") for name in names} - {"UNSPECIFIED"}
    assert wire == set(REASONS)
    # A request's final status names its reason.
    assert {s.finish_reason for s in RequestStatus if s.finished} == set(FinishReason)


@pytest.mark.parametrize("reason", [r for r in FinishReason if r is not FinishReason.ERROR])
def test_finish_reasons_round_trip_engine_to_proto_to_client(reason: FinishReason) -> None:
    on_the_wire = FINISH[reason]
    assert pb.FinishReason.Name(on_the_wire) == f"FINISH_REASON_{reason.name}"
    result = generate_result(pb.GenerateResponse(finish_reason=on_the_wire, usage=pb.Usage()))
    chunk = generate_chunk(pb.GenerateStreamResponse(finish_reason=on_the_wire))
    for got in (result.finish_reason, chunk.finish_reason):
        assert got is ClientFinishReason[reason.name]
        assert got == reason.value == REASONS[reason.name]


def test_a_reason_from_a_newer_server_reads_as_unknown() -> None:
    result = generate_result(pb.GenerateResponse(finish_reason=99))  # type: ignore[arg-type]
    assert result.finish_reason is ClientFinishReason.UNKNOWN
    assert generate_chunk(pb.GenerateStreamResponse()).finish_reason is None  # not finished yet


def _ended(kind: ErrorKind, message: str) -> RequestOutput:
    return RequestOutput(
        "r-1", [], "", finished=True, finish_reason=kind.status.finish_reason, error=message, error_kind=kind,
        usage=Usage(1, 0, 0.0, None),
    )


def test_each_kind_of_early_end_has_one_status_chosen_by_the_kind() -> None:
    assert set(ENDED_STATUS) == set(ErrorKind)
    expected = {
        ErrorKind.CANCELLED: (grpc.StatusCode.CANCELLED, FinishReason.ABORTED),
        ErrorKind.UNLOADED: (grpc.StatusCode.ABORTED, FinishReason.ABORTED),
        ErrorKind.SHUTDOWN: (grpc.StatusCode.UNAVAILABLE, FinishReason.ABORTED),
        ErrorKind.ADAPTER: (grpc.StatusCode.FAILED_PRECONDITION, FinishReason.ERROR),
        ErrorKind.INTERNAL: (grpc.StatusCode.INTERNAL, FinishReason.ERROR),
    }
    for kind, (code, reason) in expected.items():
        assert kind.status.finish_reason is reason
        # The message says nothing the status could be read from.
        error = ended_status(_ended(kind, "something happened"))
        assert error is not None and error.code is code and "something happened" in error.message
    # A message that happens to say "shutting down" does not make an unload UNAVAILABLE.
    error = ended_status(_ended(ErrorKind.UNLOADED, "the server is shutting down"))
    assert error is not None and error.code is grpc.StatusCode.ABORTED
    # A normal end is OK.
    ok = RequestOutput("r-2", [1], "a", finished=True, finish_reason=FinishReason.LENGTH, usage=Usage(1, 1, 0.0, 0.1))
    assert ended_status(ok) is None


def test_only_validation_errors_are_invalid_argument() -> None:
    assert status_of(InvalidFieldError("top_p", "top_p must be in (0, 1]")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"
    )
    code, message = status_of(ValueError("math domain error"))  # a bug, not the caller's mistake
    assert code is grpc.StatusCode.INTERNAL and "math domain error" in message
