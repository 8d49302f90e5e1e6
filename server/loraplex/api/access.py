"""Adapters for a caller: the engine's tenant-agnostic adapter calls behind the auth seam.

    transport handler ──> AdapterAccess ──(auth.py decisions, quotas, audit)──> Engine
      resolve(caller, id)          Generate*: NOT_FOUND outside its namespaces; auto-register
                                   only reads a directory under the id's own namespace
      register(caller, rpc, ...)   Load / Upload: PERMISSION_DENIED outside its own namespaces,
                                   paths under them only, max_adapters, one audit line
      unregister(caller, ...)      Unload: PERMISSION_DENIED outside them, one audit line
      get / visible(caller)        GetAdapter / ListAdapters: only what it may use

Both transports (gRPC, HTTP) call this, so the rules hold whichever way a caller comes in.
The engine and its adapter store resolve ids without knowing tenants: the whole namespaced
id is what they key every cache by. Calls that may read adapter files (resolve's
auto-register, register) run on worker threads.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from loraplex.api.auth import (
    AccessError,
    Caller,
    HiddenAdapterError,
    Outcome,
    audit,
    authorize_change,
    authorize_use,
    check_load_path,
)
from loraplex.api.quotas import Quotas
from loraplex.api.tenants import in_namespaces
from loraplex.engine.engine import Engine
from loraplex.lora.adapter_version import AdapterInfo, AdapterVersion
from loraplex.rules import InvalidFieldError

MAX_PATH_CHARS = 4096


def check_path_text(path: str) -> None:
    """A LoadAdapter path as text: given, not absurdly long, no NUL (the OS refuses those)."""
    if not path:
        raise InvalidFieldError("path", "path: is required (a directory relative to the adapter root)")
    if len(path) > MAX_PATH_CHARS or "\x00" in path:
        raise InvalidFieldError("path", f"path: must be 1-{MAX_PATH_CHARS} characters without NUL")


class AdapterAccess:
    def __init__(self, engine: Engine, quotas: Quotas) -> None:
        self.engine = engine
        self.quotas = quotas

    # -- use ---------------------------------------------------------------------------------

    async def resolve(self, caller: Caller, adapter_id: str) -> AdapterVersion:
        """The version a request of this caller runs with (NOT_FOUND as for an unknown id)."""
        authorize_use(caller, adapter_id)
        version = self.engine.lookup_adapter(adapter_id)
        if version is not None:
            return version
        return await asyncio.to_thread(self._auto_register, caller, adapter_id)

    def _auto_register(self, caller: Caller, adapter_id: str) -> AdapterVersion:
        if caller.admin:
            return self.engine.resolve_adapter(adapter_id)
        assert caller.tenant is not None
        # The directory named by the id must lie under that id's own namespace (no symlink
        # from acme/x into another tenant's files); refused as an unknown id would be.
        homes = tuple(ns for ns in caller.tenant.namespaces + caller.tenant.read if in_namespaces(adapter_id, (ns,)))
        try:
            check_load_path(caller, self.engine.adapter_roots, adapter_id, homes)
        except AccessError:
            raise HiddenAdapterError(adapter_id) from None
        if not in_namespaces(adapter_id, caller.owned):  # a read namespace: the operator's files, no limit of its own
            return self.engine.resolve_adapter(adapter_id)
        with self.quotas.registering(caller.name):
            if self.engine.lookup_adapter(adapter_id) is None:
                self._check_room(caller)
            version = self.engine.resolve_adapter(adapter_id)
        audit(caller.name, "auto-register", Outcome.OK, adapter_id=adapter_id, version=version.version,
              content_hash=version.spec.content_hash)
        return version

    def get(self, caller: Caller, adapter_id: str) -> AdapterInfo:
        authorize_use(caller, adapter_id)
        return self.engine.adapter_info(adapter_id)

    def visible(self, caller: Caller) -> list[AdapterInfo]:
        """ListAdapters: the caller's own and read namespaces; admins see every id."""
        return [info for info in self.engine.adapter_infos() if caller.can_use(info.adapter_id)]

    # -- change (audited) ----------------------------------------------------------------------

    def register(self, caller: Caller, rpc: str, adapter_id: str, path: str, *, pin: bool = False) -> AdapterInfo:
        """Load / Upload: register a directory under the adapter root for the caller (worker thread)."""
        try:
            authorize_change(caller, adapter_id)
            check_path_text(path)
            check_load_path(caller, self.engine.adapter_roots, path)
            with self.quotas.registering(caller.name):
                if self.engine.lookup_adapter(adapter_id) is None:
                    self._check_room(caller)
                info = self.engine.register_adapter(adapter_id, path, pin=pin, relative_only=True)
        except AccessError:
            raise  # audited as a denial by the transport
        except Exception as e:
            audit(caller.name, rpc, Outcome.FAILED, adapter_id=adapter_id, reason=str(e))
            raise
        audit(caller.name, rpc, Outcome.OK, adapter_id=adapter_id, version=info.version, content_hash=info.content_hash)
        return info

    def before_upload(self, caller: Caller, adapter_id: str) -> None:
        """UploadAdapter's header: refuse before a byte is stored if the id could not be registered."""
        authorize_change(caller, adapter_id)
        if self.engine.lookup_adapter(adapter_id) is None:
            self._check_room(caller)

    def unregister(
        self, caller: Caller, rpc: str, adapter_id: str, *, force: bool, on_released: Callable[[], None]
    ) -> int:
        """Unload: forget an id of the caller's; returns how many live requests held it."""
        try:
            authorize_change(caller, adapter_id)
            info = self.engine.adapter_info(adapter_id)
            in_use = self.engine.unregister_adapter(adapter_id, force=force, on_released=on_released)
        except AccessError:
            raise  # audited as a denial by the transport
        except Exception as e:
            audit(caller.name, rpc, Outcome.FAILED, adapter_id=adapter_id, reason=str(e))
            raise
        audit(caller.name, rpc, Outcome.OK, adapter_id=adapter_id, version=info.version, content_hash=info.content_hash)
        return in_use

    def _check_room(self, caller: Caller) -> None:
        """max_adapters: a new id must find a place among the caller's registered ids."""
        tenant = caller.tenant
        if tenant is None or not tenant.max_adapters:
            return
        owned = sum(1 for info in self.engine.adapter_infos() if in_namespaces(info.adapter_id, tenant.namespaces))
        if owned >= tenant.max_adapters:
            raise AccessError(
                Outcome.RESOURCE_EXHAUSTED,
                f"tenant {tenant.name!r} has {owned} adapters registered: max_adapters ({tenant.max_adapters}) "
                "reached; unload one first",
                limit="max_adapters",
            )


def upload_home(adapter_id: str) -> str:
    """Where an upload of this id is stored, relative to the adapter root: beside the id's own
    directory ("acme/faq" -> "acme/.uploads/faq"), so inside the namespaces that own the id."""
    parent, name = os.path.split(adapter_id)
    return os.path.join(parent, ".uploads", name)
