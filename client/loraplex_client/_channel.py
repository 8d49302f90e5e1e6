"""What Client and AsyncClient share about connecting: credentials, auth metadata, deadlines."""

from __future__ import annotations

import grpc

Metadata = tuple[tuple[str, str], ...]


def channel_credentials(tls: bool | grpc.ChannelCredentials | None) -> grpc.ChannelCredentials | None:
    """None (or False): an insecure channel; True: the system's root certificates."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    return tls


def auth_metadata(token: str | None) -> Metadata:
    # Plain metadata rather than grpc call credentials: those refuse insecure channels,
    # and a local server without TLS may still check tokens.
    if not token:
        return ()
    return (("authorization", f"Bearer {token}"),)


def deadline(call_timeout: float | None, default: float | None) -> float | None:
    """Seconds for this call: its own timeout, else the client's default (None: no deadline)."""
    return default if call_timeout is None else call_timeout
