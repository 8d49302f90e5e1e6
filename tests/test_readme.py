"""The README runs as written: every ```python block against the demo that `make demo` builds,
every `loraplex` command line of a ```sh block through the CLI's own parser and settings.

The Python blocks run in a fresh interpreter against `loraplex serve --model demo` (the
session's demo server); only the addresses are replaced, 127.0.0.1:50051 (gRPC) and
127.0.0.1:8000 (the OpenAI-compatible HTTP API) by its free ports.
The TLS client block needs certificates: tests/api/test_tls.py runs it against an mTLS
server; the tenants file block is parsed by tests/api/test_tenants.py."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ServedDemo
from loraplex import cli, settings

README = Path(__file__).resolve().parents[1] / "README.md"
DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_HTTP_ADDRESS = "127.0.0.1:8000"  # the OpenAI-compatible HTTP API


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def demo_blocks() -> list[str]:
    """The python blocks that run against the demo (all but the TLS client's)."""
    return [b for b in blocks("python") if "ssl_channel_credentials" not in b]


def config_block() -> str:
    """The `loraplex.toml` example (the other toml block is a tenants file)."""
    (block,) = [b for b in blocks("toml") if "[[tenant]]" not in b]
    return block


def commands(block: str) -> list[str]:
    """The block's command lines: continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in block.splitlines():
        line = pending + line.split("  #", 1)[0].split(" # ", 1)[0].rstrip()
        pending = line[:-1] if line.endswith("\\") else ""
        if not pending and line.strip():
            out.append(line.strip())
    return out


def test_the_readme_has_python_and_shell_blocks() -> None:
    assert len(demo_blocks()) == 3 and len(blocks("python")) == 4  # the fourth: the TLS client (test_tls.py)
    assert len(blocks("sh")) >= 4 and len(blocks("toml")) == 2  # the second: a tenants file (test_tenants.py)
    assert "### Install without make" in README.read_text()


@pytest.mark.timeout(900)  # the session's demo is built on first use: ~30 s alone, minutes on a busy machine
@pytest.mark.parametrize("index", [0, 1, 2], ids=["client", "openai", "library"])
def test_python_blocks_run_against_the_demo(index: int, demo_server: ServedDemo, tmp_path: Path) -> None:
    code = demo_blocks()[index].replace(DEFAULT_ADDRESS, demo_server.address)
    code = code.replace(DEFAULT_HTTP_ADDRESS, demo_server.http_address)
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=300, env=demo_server.env, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # The pirate adapter answers as it was trained to (the demo checks every adapter the same way).
    assert "Arr, I be a pirate" in run.stdout, run.stdout
    if index == 0:
        assert re.search(r"\('acme/robot', '\w+', 1\)", run.stdout), run.stdout  # uploaded: version 1 of its id
        assert "StatusCode.NOT_FOUND" in run.stdout and "acme/nope" in run.stdout
    if index == 1:
        assert "['demo', " in run.stdout and "'pirate'" in run.stdout, run.stdout  # the models list
        assert "BEEP" in run.stdout, run.stdout  # the robot's stream


def test_loraplex_command_lines_parse_with_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loraplex.toml").write_text(config_block())  # the file the README's commands name
    checked = serve_ray_lines = 0
    try:
        from loraplex.cluster.app import ClusterOptions  # the ray extra (make install puts it in .venv)
    except ImportError:
        ClusterOptions = None  # type: ignore[assignment,misc]

    for block in blocks("sh"):
        for line in commands(block):
            words = shlex.split(line)
            env = {}
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            if not words or words[0] != "loraplex":
                continue  # make, pip, docker, python -m benchmarks...
            args = cli.build_parser().parse_args(words[1:])
            if args.command in ("serve", "serve-ray"):
                settings.build_config(settings.resolve(args, env))
            if args.command == "serve-ray":
                serve_ray_lines += 1
                if ClusterOptions is not None:
                    ClusterOptions(**{k: getattr(args, k) for k in cli.CLUSTER_FLAGS if getattr(args, k) is not None})
            checked += 1
    assert checked >= 3 and serve_ray_lines == 2
    # The one with a comment that says what it does, does it.
    args = cli.build_parser().parse_args(["serve", "--config", "loraplex.toml", "--port", "6000"])
    values = settings.resolve(args, {"LORAPLEX_MAX_LORAS": "32"})
    assert (values["max_loras"], values["port"]) == (32, 6000)


def test_serve_help_runs_without_torch() -> None:
    code = "import sys\nfrom loraplex.cli import main\ntry:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
    run = subprocess.run([sys.executable, "-c", code + "print('torch:', 'torch' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert "--metrics-port" in run.stdout and run.stdout.endswith("torch: False\n"), run.stdout + run.stderr
