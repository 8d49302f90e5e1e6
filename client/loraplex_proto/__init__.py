"""The wire API of loraplex, shared by the server (`loraplex.api`) and the client SDK.

    v1/         stubs generated from protos/loraplex/v1/loraplex.proto (`make protos`;
                never edit by hand: tests/client/test_protos.py fails when they are stale)
    health.py   the grpc.health.v1 Check call: its two messages and one stub builder

Needs only grpcio and protobuf.
"""
