"""The messages of the standard grpc.health.v1 Check call, without grpcio-health-checking.

That package would be a third dependency for two one-field messages, so they are declared
here in a private descriptor pool (private, so they never clash with grpc_health's own
registration of the same names when both are imported):
    HealthCheckRequest  { string service = 1; }
    HealthCheckResponse { ServingStatus status = 1; }  // read as int32: same wire format
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_METHOD = "/grpc.health.v1.Health/Check"
READY_SERVICE = "loraplex.v1.LoraPlex"  # SERVING once the server has warmed up; "" is liveness
SERVING = 1

_Field = descriptor_pb2.FieldDescriptorProto


def _message(name: str, field: str, kind: int) -> descriptor_pb2.DescriptorProto:
    return descriptor_pb2.DescriptorProto(
        name=name, field=[_Field(name=field, number=1, type=kind, label=_Field.LABEL_OPTIONAL)]
    )


_pool = descriptor_pool.DescriptorPool()
_pool.Add(
    descriptor_pb2.FileDescriptorProto(
        name="loraplex_client/grpc_health_v1.proto",
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
