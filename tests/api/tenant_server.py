"""One real server with five tenants, shared by the tenant test modules (session fixture in conftest).

    acme    member  owns acme/     reads public/
    globex  member  owns globex/   reads public/
    boss    admin
    busy    member  owns busy/     max_requests = 1
    chatty  member  owns chatty/   tokens_per_minute = 30
    hoarder member  owns hoarder/  max_adapters = 2
    big     member  owns big/      the default limits: the "other tenant" of the quota tests

Adapter root: acme/{a0, a1}, acme/link -> globex/g0, acme/broken (bad config), globex/g0,
public/p0, hoarder/{h0, h1, h2}, big/b0. acme/a0, globex/g0 and public/p0 are registered by
the operator at start-up.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from conftest import TinyModel, engine_config
from loraplex.api.server import BackgroundServer
from loraplex.config import ANY_PORT, ApiConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex_client import Client

TOKENS = {name: f"{name}-token-{i}-x7Qm" for i, name in enumerate(("acme", "globex", "boss", "busy", "chatty", "hoarder", "big"))}
ADMIN_TOKEN = "legacy-admin-token-Zq"  # --auth-token keeps working as an admin token
LIMITS = {
    "acme": 'namespaces = ["acme"]\nread = ["public"]',
    "globex": 'namespaces = ["globex"]\nread = ["public"]',
    "boss": 'role = "admin"',
    "busy": 'namespaces = ["busy"]\nmax_requests = 1',
    "chatty": 'namespaces = ["chatty"]\ntokens_per_minute = 30',
    "hoarder": 'namespaces = ["hoarder"]\nmax_adapters = 2',
    "big": 'namespaces = ["big"]',
}


def tenants_toml(names: tuple[str, ...] = tuple(LIMITS)) -> str:
    entries = []
    for name in names:
        digest = hashlib.sha256(TOKENS[name].encode()).hexdigest()
        entries.append(f'[[tenant]]\nname = "{name}"\ntoken_sha256 = "{digest}"\n{LIMITS[name]}\n')
    return "\n".join(entries)


def build_root(tiny: TinyModel, root: Path) -> None:
    source = tiny.adapters["qv-r4"]
    for rel in ("acme/a0", "globex/g0", "public/p0", "hoarder/h0", "hoarder/h1", "hoarder/h2", "big/b0", "chatty/c0"):
        shutil.copytree(source, root / rel)
    shutil.copytree(tiny.adapters["attn-r8-layer0"], root / "acme" / "a1")
    (root / "acme" / "link").symlink_to(root / "globex" / "g0")
    shutil.copytree(source, root / "acme" / "broken")
    (root / "acme" / "broken" / "adapter_config.json").write_text("{not json")


@dataclass
class TenantServer:
    background: BackgroundServer
    root: Path
    clients: dict[str, Client] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.background.server.port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (a server started with http=True)."""
        return f"http://127.0.0.1:{self.background.server.http_port}"

    @property
    def engine(self) -> Engine:
        return self.background.server.engine

    def client(self, who: str | None) -> Client:
        """A client with that tenant's token; None: no token; "admin-token": the --auth-token;
        any other name: that string as a token nobody has."""
        key = who or "(none)"
        if key not in self.clients:
            token = None if who is None else ADMIN_TOKEN if who == "admin-token" else TOKENS.get(who, who)
            self.clients[key] = Client(self.address, token=token, timeout=60)
        return self.clients[key]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.background.stop()


def start_tenant_server(tiny: TinyModel, base: Path, metrics_port: int, *, http: bool = False) -> TenantServer:
    root = base / "adapters"
    build_root(tiny, root)
    tenants = base / "tenants.toml"
    tenants.write_text(tenants_toml())
    config = engine_config(tiny, roots=(str(root),), max_loras=4)
    api = ApiConfig(
        port=0, metrics_port=metrics_port, auth_tokens=(ADMIN_TOKEN,), tenants_file=str(tenants),
        http_port=ANY_PORT if http else 0,
    )
    engine = Engine(config)
    for rel in ("acme/a0", "globex/g0", "public/p0"):
        engine.register_adapter(rel, rel)
    background = BackgroundServer(ServerConfig(engine=config, api=api), engine)
    background.start()
    return TenantServer(background, root)
