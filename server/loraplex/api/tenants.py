"""The tenant table: who may call, which adapter ids each owns or may read, and its limits.

    --tenants FILE (TOML)                      TenantTable (immutable)
    [[tenant]]                                 ├── tenants: Tenant(name, role, namespaces, read,
    name = "acme"                              │            max_adapters, max_requests,
    token_sha256 = "9f86d0..."                 │            tokens_per_minute, weight)
    role = "member"        # or "admin"        └── find(token): the tenant whose digest matches
    namespaces = ["acme"]  # owns ids acme/...
    read = ["public"]      # may use, get and list ids public/...
    max_adapters = 100     # registered ids in its namespaces (0: no limit)
    max_requests = 32      # in flight at once (0: no limit)
    tokens_per_minute = 0  # prompt + generated (0: no limit)
    weight = 1.0           # its share when tenants compete (read by the scheduler's fair share)

Tokens are never held in clear: the file has each token's SHA-256 (hex); a caller's token
is hashed and compared with every tenant's digest by hmac.compare_digest. A reload builds a
new table and swaps it in whole (auth.Auth), so a call sees one table from start to end.
No grpc, no torch: the gRPC and HTTP transports share this through auth.py.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.rules import adapter_id_problem

TOKEN_BYTES = 32  # secrets.token_urlsafe(32): 43 characters, 256 random bits


class Role(enum.StrEnum):
    MEMBER = "member"  # its own namespaces and read namespaces only
    ADMIN = "admin"  # every adapter id and every operation


class TenantFileError(ValueError):
    """The tenants file cannot be used; the message names the file, the tenant and the key."""


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    token_sha256: bytes = field(repr=False)  # the raw 32-byte digest
    role: Role = Role.MEMBER
    namespaces: tuple[str, ...] = ()  # owned: load / upload / unload / use ids "<ns>/..."
    read: tuple[str, ...] = ()  # may use, get and list ids "<ns>/...", never change them
    max_adapters: int = 100  # 0: no limit
    max_requests: int = 32  # 0: no limit
    tokens_per_minute: int = 0  # 0: no limit
    weight: float = 1.0


def in_namespaces(adapter_id: str, namespaces: tuple[str, ...]) -> bool:
    """Whether an id lies in one of the namespaces: "acme/x" is in "acme", "acme" and "acme2/x" are not.

    Ids have no empty, '.' or '..' parts (rules.adapter_id_problem), so the id's text says
    which directory it names: a prefix test on whole parts is the whole check.
    """
    return any(adapter_id.startswith(ns + "/") for ns in namespaces)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def new_token() -> tuple[str, str]:
    """A fresh random bearer token and the `token_sha256 = "..."` line for the tenants file."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return token, f'token_sha256 = "{token_digest(token).hex()}"'


@dataclass(frozen=True, slots=True)
class TenantTable:
    tenants: tuple[Tenant, ...] = ()
    source: str = ""  # the file it came from, for log lines
    names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", frozenset(t.name for t in self.tenants))

    def find(self, token: str) -> Tenant | None:
        """The tenant with this token, comparing the digest with every tenant's (no early exit)."""
        digest = token_digest(token)
        found = None
        for tenant in self.tenants:
            if hmac.compare_digest(digest, tenant.token_sha256):
                found = tenant
        return found

    def get(self, name: str) -> Tenant | None:
        return next((t for t in self.tenants if t.name == name), None)


# -- the file ---------------------------------------------------------------------------

_KEYS = {
    "name", "token_sha256", "role", "namespaces", "read", "max_adapters", "max_requests", "tokens_per_minute", "weight",
}


def load_tenants(path: str | Path) -> TenantTable:
    """Read and check a tenants file; TenantFileError says what is wrong and where."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise TenantFileError(f"tenants file {path}: {e}") from None
    return parse_tenants(data, str(path))


def parse_tenants(data: Mapping[str, Any], source: str = "<tenants>") -> TenantTable:
    extra = sorted(set(data) - {"tenant"})
    if extra:
        raise TenantFileError(f"tenants file {source}: unknown key {extra[0]!r} (tenants are [[tenant]] tables)")
    entries = data.get("tenant", [])
    if not isinstance(entries, list):
        raise TenantFileError(f"tenants file {source}: 'tenant' must be an array of tables ([[tenant]])")
    tenants = tuple(_tenant(entry, f"tenants file {source}: tenant {i + 1}") for i, entry in enumerate(entries))
    seen: set[str] = set()
    digests: dict[bytes, str] = {}
    for t in tenants:
        if t.name in seen:
            raise TenantFileError(f"tenants file {source}: tenant name {t.name!r} appears twice")
        seen.add(t.name)
        if t.token_sha256 in digests:
            raise TenantFileError(
                f"tenants file {source}: tenants {digests[t.token_sha256]!r} and {t.name!r} have the same token_sha256"
            )
        digests[t.token_sha256] = t.name
    return TenantTable(tenants, source)


def _tenant(entry: Any, where: str) -> Tenant:
    if not isinstance(entry, dict):
        raise TenantFileError(f"{where}: must be a table ([[tenant]])")
    name = entry.get("name")
    if not isinstance(name, str) or adapter_id_problem(name) is not None or "/" in name:
        raise TenantFileError(f"{where}: name must be 1-128 characters of A-Z a-z 0-9 . _ - (got {name!r})")
    where = f"{where} ({name})"
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise TenantFileError(f"{where}: unknown key {unknown[0]!r}; keys are {', '.join(sorted(_KEYS))}")
    digest = entry.get("token_sha256")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdefABCDEF" for c in digest)):
        raise TenantFileError(f"{where}: token_sha256 must be 64 hex digits (`loraplex token` prints one)")
    role = entry.get("role", Role.MEMBER.value)
    if role not in tuple(Role):
        raise TenantFileError(f"{where}: role must be one of {', '.join(Role)}, got {role!r}")
    return Tenant(
        name=name,
        token_sha256=bytes.fromhex(digest),
        role=Role(role),
        namespaces=_namespaces(entry, "namespaces", where),
        read=_namespaces(entry, "read", where),
        max_adapters=_limit(entry, "max_adapters", where),
        max_requests=_limit(entry, "max_requests", where),
        tokens_per_minute=_limit(entry, "tokens_per_minute", where),
        weight=_weight(entry, where),
    )


def _namespaces(entry: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TenantFileError(f"{where}: {key} must be an array of strings")
    for ns in value:
        problem = adapter_id_problem(ns)
        if problem is not None:
            raise TenantFileError(f"{where}: {key} entry {ns!r} is not a namespace: {problem}")
    return tuple(dict.fromkeys(value))


def _limit(entry: Mapping[str, Any], key: str, where: str) -> int:
    value = entry.get(key, Tenant.__dataclass_fields__[key].default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TenantFileError(f"{where}: {key} must be an integer >= 0 (0: no limit), got {value!r}")
    return value


def _weight(entry: Mapping[str, Any], where: str) -> float:
    value = entry.get("weight", 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise TenantFileError(f"{where}: weight must be a number > 0, got {value!r}")
    return float(value)
