"""What can stop `loraplex serve` before it serves, each reported as one StartupError.

A StartupError is a failure the user can fix: a cause and a fix, one line each.
`loraplex serve` prints the two lines and exits 2 (cli.py); anything else that escapes
start-up is a bug (exit 1, with its traceback).

The checks run before torch is imported, so a wrong path or a taken port is reported in
a second instead of after the model has loaded:

    check_server_extra()     the `server` extra's modules are installed
    check_model_dir(path)    a local Hugging Face directory whose config.json names a model_type
    check_adapter_roots(..)  every --adapter-root is a readable directory
    check_port_free(..)      nothing listens on the port yet (gRPC, metrics, HTTP)

The servers check again when they bind, since a port can be taken in between:
`binding()` turns the OSError of a server that binds by itself (prometheus' /metrics, an
HTTP server) into the same StartupError; gRPC returns port 0 instead of raising, and
`bind_failed()` finds out why. Only the standard library here.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from loraplex.rules import is_s3_uri

# Top-level modules of the `server` extra (pyproject.toml) that `loraplex serve` imports.
SERVER_MODULES = (
    "torch", "transformers", "peft", "bitsandbytes", "safetensors", "tokenizers",
    "prometheus_client", "grpc_health", "grpc_reflection", "fastapi", "uvicorn", "jinja2",
)
INSTALL_SERVER = "install the server extra: pip install 'loraplex[server]'"
HOST_FIX = "set --host to one of this machine's addresses, or 0.0.0.0"
MODEL_FIX = "give --model a local Hugging Face model directory (config.json, weights, tokenizer), or --model demo"


class StartupError(Exception):
    """A start-up failure the user can fix: `cause` says what is wrong, `fix` what to do
    (empty when the cause says it: a configuration error names the option and its source)."""

    def __init__(self, cause: str, fix: str = "") -> None:
        super().__init__(cause, fix)
        self.cause = cause
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.cause}; {self.fix}" if self.fix else self.cause


# -- the server extra ------------------------------------------------------------------------


def check_server_extra() -> None:
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise StartupError(f"the server extra is not installed (no module {', '.join(map(repr, missing))})", INSTALL_SERVER)


def missing_server_extra(error: ImportError) -> StartupError | None:
    """The StartupError for an import that failed because part of the server extra is missing."""
    name = (error.name or "").split(".")[0]
    if isinstance(error, ModuleNotFoundError) and name in SERVER_MODULES:
        return StartupError(f"the server extra is not installed (no module {name!r})", INSTALL_SERVER)
    return None


# -- paths -----------------------------------------------------------------------------------


def check_model_dir(path: str) -> None:
    """A local Hugging Face model directory: config.json readable, JSON, naming a model_type."""
    where = Path(path)
    if not where.exists():
        raise StartupError(f"model {path!r} does not exist", MODEL_FIX)
    if not where.is_dir():
        raise StartupError(f"model {path!r} is not a directory", MODEL_FIX)
    config = where / "config.json"
    if not config.is_file():
        raise StartupError(f"model {path!r} is not a Hugging Face model directory: it has no config.json", MODEL_FIX)
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except OSError as e:
        raise StartupError(f"model {path!r}: cannot read config.json ({e.strerror})", "check the file's permissions") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise StartupError(
            f"model {path!r}: config.json is not valid JSON ({e})", "restore config.json from the model's original files"
        ) from e
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise StartupError(
            f"model {path!r}: config.json names no model_type", "restore config.json from the model's original files"
        )


def check_adapter_roots(roots: Sequence[str]) -> None:
    """Every local root; an s3:// root is checked when an adapter is read from it."""
    for root in roots:
        if is_s3_uri(root):
            continue
        where = Path(root)
        fix = "point --adapter-root at an existing directory that holds PEFT adapters (or create it)"
        if not where.exists():
            raise StartupError(f"adapter root {root!r} does not exist", fix)
        if not where.is_dir():
            raise StartupError(f"adapter root {root!r} is not a directory", fix)
        try:
            next(os.scandir(where), None)
        except OSError as e:
            raise StartupError(
                f"adapter root {root!r} cannot be read ({e.strerror})",
                "give the user running loraplex read access to it (chmod u+rx), or choose another --adapter-root",
            ) from e


# -- ports -----------------------------------------------------------------------------------


def bind_error(error: OSError, what: str, host: str, port: int, flag: str) -> StartupError:
    """Why binding host:port for `what` (gRPC, metrics, HTTP) failed, and the flag that changes it."""
    if error.errno == errno.EADDRINUSE:
        return StartupError(
            f"port {port} is already in use ({what} on {host}:{port})",
            f"stop the process that holds it, or choose another port with {flag}",
        )
    if error.errno == errno.EACCES:
        return StartupError(f"no permission to listen on port {port} ({what})", f"choose a port above 1023 with {flag}")
    if error.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"cannot listen on {host!r} ({what}): not an address of this machine", HOST_FIX)
    return StartupError(f"cannot listen on {host}:{port} ({what}): {error.strerror or error}", f"choose another port with {flag}")


def check_port_free(host: str, port: int, what: str, flag: str) -> None:
    """Raise StartupError if host:port cannot be bound now. Port 0 (any free port) always can."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                # As the servers do: a port whose last connections are in TIME_WAIT is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
    except socket.gaierror as e:  # a host name that does not resolve
        raise StartupError(f"cannot listen on {host!r} ({what}): {e.strerror}", HOST_FIX) from e
    except OSError as e:
        raise bind_error(e, what, host, port, flag) from e


def bind_failed(what: str, host: str, port: int, flag: str) -> StartupError:
    """The StartupError for a server that could not bind but did not say why (gRPC returns port 0)."""
    try:
        check_port_free(host, port, what, flag)
    except StartupError as e:
        return e
    return StartupError(f"cannot listen on {host}:{port} ({what})", f"choose another port with {flag}")


@contextmanager
def binding(what: str, host: str, port: int, flag: str) -> Iterator[None]:
    """Around a server's bind: an OSError becomes the StartupError that names the port and the flag."""
    try:
        yield
    except OSError as e:
        raise bind_error(e, what, host, port, flag) from e
