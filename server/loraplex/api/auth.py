"""Who is calling and what it may do: the auth seam, shared by every transport.

    transport (gRPC interceptor, HTTP middleware)
      └── Auth.identify(bearer token) ──> Caller | None (None: UNAUTHENTICATED)
    handlers, for that caller
      ├── authorize_use(caller, id)       use / get: NOT_FOUND, worded as for an unknown id
      ├── authorize_change(caller, id)    load / upload / unload: PERMISSION_DENIED
      ├── check_load_path(caller, ...)    a member registers only files under its own namespaces
      └── caller.can_use(id)              list: what a caller may see
    the transport's error path
      └── Auth.denied(caller, rpc, error) one audit line and the denial counter

Decisions are plain functions that raise typed errors (AccessError with an Outcome, or
HiddenAdapterError); each transport maps those to its statuses in one place. Identity is
read once per call, by the transport, through `identify`; nothing else looks at tokens.
Tokens are compared as SHA-256 digests with hmac.compare_digest and never logged.

Both transports build on this seam and nothing else (grpc_auth.py for gRPC, openai_front.py
for HTTP); this module imports neither grpc nor torch (tests/test_import_rules.py). A
transport:
  1. per call, `caller = auth.identify(bearer_token(request's Authorization header))`;
     None -> its 401 after `auth.denied(None, rpc, AccessError(Outcome.UNAUTHENTICATED, ...))`;
  2. `set_current_caller(caller)` if its handlers read `current_caller()`;
  3. generation through `EngineLoop.stream(args, caller)` (quotas, namespaces, auto-register),
     adapters through `access.AdapterAccess` (register / unregister / get / visible);
  4. its error path maps AccessError.outcome (NOT_FOUND 404, PERMISSION_DENIED 403,
     RESOURCE_EXHAUSTED 429 with `retry_after_s` as Retry-After) and HiddenAdapterError (404,
     the unknown id's message), and calls `auth.denied(caller, rpc, error)` once: the audit
     line and the denial counter.

A namespace "acme" owns the ids "acme/..." (tenants.in_namespaces). The engine and the
adapter store know nothing of tenants: the id a caller names is checked here, before the
engine resolves it, and stays the whole namespaced id in every cache key.
"""

from __future__ import annotations

import contextvars
import enum
import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraplex.api.tenants import (
    Role,
    Tenant,
    TenantFileError,
    TenantTable,
    in_namespaces,
    load_tenants,
    token_digest,
)
from loraplex.engine.request import ANONYMOUS_TENANT
from loraplex.lora.adapter_version import AdapterNotFoundError, not_registered

log = logging.getLogger(__name__)
audit_log = logging.getLogger("loraplex.audit")

ADMIN_TOKEN = "(admin token)"  # the caller name of an --auth-token: never a tenant name ('(' is not allowed)
UNAUTHENTICATED = "(unauthenticated)"  # the audit line's tenant for a call without a valid token


class Outcome(enum.StrEnum):
    """How an access decision, or an audited change, came out."""

    OK = "ok"
    UNAUTHENTICATED = "unauthenticated"  # no or unknown token
    NOT_FOUND = "not_found"  # an id outside the caller's namespaces, answered as unknown
    PERMISSION_DENIED = "permission_denied"  # a change outside the caller's own namespaces
    RESOURCE_EXHAUSTED = "resource_exhausted"  # a tenant limit (AccessError.limit names it)
    FAILED = "failed"  # audit only: the change was allowed but failed (bad adapter, ...)


class AccessError(Exception):
    """A call refused by the seam. `retry_after_s`: when waiting helps, how long."""

    def __init__(
        self, outcome: Outcome, message: str, *, adapter_id: str | None = None, limit: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.adapter_id = adapter_id
        self.limit = limit  # RESOURCE_EXHAUSTED: max_adapters, max_requests or tokens_per_minute
        self.retry_after_s = retry_after_s


class HiddenAdapterError(AdapterNotFoundError):
    """An id outside the caller's namespaces. Its message is the unknown id's, byte for byte
    (both come from not_registered); only the audit line tells them apart."""

    def __init__(self, adapter_id: str) -> None:
        super().__init__(*not_registered(adapter_id).args)
        self.adapter_id = adapter_id


@dataclass(frozen=True, slots=True)
class Caller:
    name: str  # the tenant's name, ADMIN_TOKEN, or ANONYMOUS_TENANT (open server)
    admin: bool
    tenant: Tenant | None = None  # its namespaces and limits; None: no limits apply

    @property
    def owned(self) -> tuple[str, ...]:
        return self.tenant.namespaces if self.tenant is not None else ()

    def can_use(self, adapter_id: str) -> bool:
        """Generate with it, get it, see it in the list."""
        if self.admin:
            return True
        assert self.tenant is not None
        return in_namespaces(adapter_id, self.tenant.namespaces + self.tenant.read)

    def can_change(self, adapter_id: str) -> bool:
        """Load, upload or unload it."""
        return self.admin or in_namespaces(adapter_id, self.owned)


ANONYMOUS = Caller(ANONYMOUS_TENANT, admin=True)  # a server without --tenants or --auth-token
_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("loraplex_caller", default=ANONYMOUS)


def current_caller() -> Caller:
    """The caller of the call being served (set by the transport after identify)."""
    return _caller.get()


def set_current_caller(caller: Caller) -> None:
    _caller.set(caller)


# -- decisions ---------------------------------------------------------------------------


def authorize_use(caller: Caller, adapter_id: str) -> None:
    """Raise HiddenAdapterError (NOT_FOUND, the unknown id's message) unless the caller may use the id."""
    if not caller.can_use(adapter_id):
        raise HiddenAdapterError(adapter_id)


def authorize_change(caller: Caller, adapter_id: str) -> None:
    """Raise AccessError(PERMISSION_DENIED) unless the id is in the caller's own namespaces.

    The message names only the caller's own namespaces, and says the same whether or not
    the id exists.
    """
    if not caller.can_change(adapter_id):
        owned = ", ".join(f"{ns}/" for ns in caller.owned) or "none"
        raise AccessError(
            Outcome.PERMISSION_DENIED,
            f"tenant {caller.name!r} may not load, upload or unload {adapter_id!r}: its namespaces are {owned}",
            adapter_id=adapter_id,
        )


def check_load_path(caller: Caller, roots: tuple[Path, ...], path: str, namespaces: tuple[str, ...] | None = None) -> None:
    """A member may register only a directory under `<adapter root>/<an owned namespace>/`
    (`namespaces`: these instead of the owned ones).

    First by the path's text (no disk access, so nothing is learnt of other tenants'
    directories), then by where it resolves, symlinks included: the directory and the two
    files the store reads must all lie under one of the namespaces in an adapter root.
    Admins pass.
    """
    if caller.admin:
        return
    homes = caller.owned if namespaces is None else namespaces
    denied = AccessError(
        Outcome.PERMISSION_DENIED,
        f"tenant {caller.name!r} may load only paths under its namespaces "
        f"({', '.join(f'{ns}/' for ns in homes) or 'none'}), not {path!r}",
    )
    if os.path.isabs(path) or not in_namespaces(os.path.normpath(path), homes):
        raise denied
    resolved_homes = [(root / ns).resolve() for root in roots for ns in homes]
    for root in roots:
        # The store resolves root / path as given ('link/..' follows the link): so do we.
        candidate = root / path
        for target in (candidate, candidate / "adapter_config.json", candidate / "adapter_model.safetensors"):
            if target.exists() or target.is_symlink():
                resolved = target.resolve()
                if not any(home in resolved.parents for home in resolved_homes):
                    raise denied


# -- identity ----------------------------------------------------------------------------


def bearer_token(value: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` value (gRPC metadata, HTTP header); None otherwise.

    The scheme is case-insensitive, as HTTP has it (RFC 7235).
    """
    if value is None or value[:7].lower() != "bearer ":
        return None
    return value[7:].strip() or None


class Auth:
    """The table of tenants and admin tokens, read by every transport's `identify`.

    `reload` (SIGHUP) swaps in a new immutable table in one assignment: calls in flight keep
    the Caller they were given, new calls see the new table. A file that cannot be used
    leaves the old table in place.
    """

    def __init__(self, table: TenantTable | None = None, admin_tokens: tuple[str, ...] = (), path: str | None = None):
        self.table = table
        self.path = path
        self._admin_digests = tuple(token_digest(t) for t in admin_tokens)
        self.on_denied: Callable[[str, Outcome], None] | None = None  # metrics: caller label, outcome

    @classmethod
    def from_options(cls, tenants_file: str | None, admin_tokens: tuple[str, ...]) -> Auth:
        """Raises TenantFileError when the file cannot be used (the server does not start)."""
        table = load_tenants(tenants_file) if tenants_file else None
        return cls(table, admin_tokens, tenants_file)

    @property
    def open(self) -> bool:
        """No tenants and no admin tokens: every caller is an administrator."""
        return self.table is None and not self._admin_digests

    def describe(self) -> str:
        if self.open:
            return "no --tenants and no --auth-token: the server is open, every caller is an administrator"
        parts = []
        if self.table is not None:
            admins = sum(1 for t in self.table.tenants if t.role is Role.ADMIN)
            parts.append(f"{len(self.table.tenants)} tenants ({admins} admin) from {self.path}")
        if self._admin_digests:
            parts.append(f"{len(self._admin_digests)} --auth-token admin tokens")
        return "bearer tokens required: " + ", ".join(parts)

    def identify(self, token: str | None) -> Caller | None:
        """The caller a bearer token stands for; None when it stands for nobody."""
        if self.open:
            return ANONYMOUS
        if not token:
            return None
        table = self.table  # one read: a reload cannot change the table under this call
        if table is not None:
            tenant = table.find(token)
            if tenant is not None:
                return Caller(tenant.name, tenant.role is Role.ADMIN, tenant)
        digest = token_digest(token)
        if any(hmac.compare_digest(digest, d) for d in self._admin_digests):
            return Caller(ADMIN_TOKEN, admin=True)
        return None

    def reload(self) -> bool:
        """Read the tenants file again (SIGHUP). A broken file keeps the old table and logs why."""
        if self.path is None:
            log.warning("reload: no --tenants file to reload")
            return False
        try:
            table = load_tenants(self.path)
        except TenantFileError as e:
            log.error("reload: keeping the previous %d tenants: %s", len(self.table.tenants) if self.table else 0, e)
            return False
        before = self.table.names if self.table is not None else frozenset()
        self.table = table
        added, removed = sorted(table.names - before), sorted(before - table.names)
        log.info(
            "reload: %d tenants from %s (added: %s; removed: %s)", len(table.tenants), self.path,
            ", ".join(added) or "none", ", ".join(removed) or "none",
        )
        return True

    def label(self, name: str) -> str:
        """A bounded metrics label: a configured tenant's name, or ANONYMOUS_TENANT for anyone else."""
        table = self.table
        return name if table is not None and name in table.names else ANONYMOUS_TENANT

    def denied(self, caller: Caller | None, rpc: str, error: BaseException) -> None:
        """A call the seam refused: one audit line, one count. Other errors are not denials."""
        adapter_id: str | None
        if isinstance(error, HiddenAdapterError):
            outcome, adapter_id = Outcome.NOT_FOUND, error.adapter_id
        elif isinstance(error, AccessError):
            outcome, adapter_id = error.outcome, error.adapter_id
        else:
            return
        name = caller.name if caller is not None else UNAUTHENTICATED
        audit(name, rpc, outcome, adapter_id=adapter_id, reason=str(error))
        if self.on_denied is not None:
            self.on_denied(self.label(name), outcome)


def audit(
    tenant: str, rpc: str, outcome: Outcome, *, adapter_id: str | None = None, version: int | None = None,
    content_hash: str | None = None, reason: str | None = None,
) -> None:
    """One structured line on the `loraplex.audit` logger (JSON: the fields under "audit")."""
    fields = {
        "tenant": tenant, "rpc": rpc, "adapter_id": adapter_id, "version": version, "content_hash": content_hash,
        "outcome": outcome.value,
    }
    if reason:
        fields["reason"] = reason
    text = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None and k != "reason")
    audit_log.info("audit %s%s", text, f" reason={reason!r}" if reason else "", extra={"audit": fields})
