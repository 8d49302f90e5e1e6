"""The standard grpc.health.v1 Check call, without grpcio-health-checking.

Who calls it: Client.health and AsyncClient.health (through `check_stub`), and the server's
`loraplex healthcheck` command, which must run where only grpcio and the client are
installed. That package would be a third dependency for two one-field messages, so they
are declared here in a private descriptor pool (private, so they never clash with
grpc_health's own registration of the same names when both are imported):
    HealthCheckRequest  { string service = 1; }
    HealthCheckResponse { ServingStatus status = 1; }  // read as int32: same wire format
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from loraplex_proto.v1 import loraplex_pb2

CHECK_METHOD = "/grpc.health.v1.Health/Check"
# The readiness service: SERVING once the server has warmed up; "" is liveness.
READY_SERVICE = loraplex_pb2.DESCRIPTOR.services_by_name["LoraPlex"].full_name  # "loraplex.v1.LoraPlex"
# grpc.health.v1.HealthCheckResponse.ServingStatus
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
SERVING = 1

_Field = descriptor_pb2.FieldDescriptorProto


def _message(name: str, field: str, kind: int) -> descriptor_pb2.DescriptorProto:
    return descriptor_pb2.DescriptorProto(
        name=name, field=[_Field(name=field, number=1, type=kind, label=_Field.LABEL_OPTIONAL)]
    )


_pool = descriptor_pool.DescriptorPool()
_pool.Add(
    descriptor_pb2.FileDescriptorProto(
        name="loraplex_proto/grpc_health_v1.proto",
        package="grpc.health.v1",
        syntax="proto3",
        message_type=[
            _message("HealthCheckRequest", "service", _Field.TYPE_STRING),
            _message("HealthCheckResponse", "status", _Field.TYPE_INT32),
        ],
    )
)
HealthCheckRequest: Any = message_factory.GetMessageClass(
    _pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")
)
HealthCheckResponse: Any = message_factory.GetMessageClass(
    _pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
)


def check_stub(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """The Check call on a channel: `stub(HealthCheckRequest(service=...), timeout=...)`.

    A blocking channel gives a blocking callable, a grpc.aio channel an awaitable one.
    """
    return channel.unary_unary(
        CHECK_METHOD,
        request_serializer=HealthCheckRequest.SerializeToString,
        response_deserializer=HealthCheckResponse.FromString,
    )
