"""`loraplex serve` run as a user runs it: a subprocess, its exit code and its stderr.

A start-up failure the user can fix exits 2 with at most two lines on stderr (the cause,
then the fix) and no traceback; Ctrl-C while starting exits 130 with one line; a second
server on a taken port exits 2 while the first keeps serving. Most cases fail before torch
is imported, in about a second; the ones that need the model load the tiny Llama."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ServedDemo, TinyModel, cli_env
from loraplex import startup
from loraplex_client import Client

SERVE = [sys.executable, "-m", "loraplex.cli", "serve"]


def serve(*args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """`loraplex serve` on ports from the OS (never the defaults), unless args name ports of their own."""
    argv = [*(prefix or SERVE), "--port", "0", "--metrics-port", "0", "--http-port", "0", *args]  # a later flag wins
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env or cli_env())


def assert_refused(run: subprocess.CompletedProcess[str], *fragments: str) -> list[str]:
    """Exit 2, one or two lines (the cause, the fix), no traceback; each fragment is in them."""
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr
    assert 1 <= len(lines) <= 2 and lines[0].startswith("loraplex serve: "), run.stderr
    for fragment in fragments:
        assert fragment in run.stderr, run.stderr
    return lines


@pytest.fixture
def listening() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield int(other.getsockname()[1])


def test_a_model_that_is_not_a_model_directory(tmp_path: Path) -> None:
    nowhere, empty, bad_json, no_type = (tmp_path / n for n in ("nowhere", "empty", "bad-json", "no-type"))
    for d in (empty, bad_json, no_type):
        d.mkdir()
    (bad_json / "config.json").write_text("{not json")
    (no_type / "config.json").write_text("{}")
    fix = "give --model a local Hugging Face model directory"
    assert_refused(serve("--model", str(nowhere)), f"model '{nowhere}' does not exist", fix)
    assert_refused(serve("--model", str(empty)), "no config.json", fix)
    assert_refused(serve("--model", str(bad_json)), "config.json is not valid JSON")
    assert_refused(serve("--model", str(no_type)), "config.json names no model_type")


def test_debug_level_shows_the_traceback_too(tmp_path: Path) -> None:
    run = serve("--model", str(tmp_path / "nowhere"), "--log-level", "debug")
    lines = run.stderr.splitlines()
    assert run.returncode == 2 and lines[0] == "Traceback (most recent call last):", run.stderr
    report = lines.index(f"loraplex serve: model '{tmp_path / 'nowhere'}' does not exist")
    assert lines[report + 1].startswith("  give --model")


def test_a_model_directory_transformers_cannot_load(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # passes the early check; no weights
    run = serve("--model", str(tmp_path), "--log-level", "error")
    assert_refused(run, f"model '{tmp_path}' cannot be loaded", "give --model")


def test_ports_in_use(tmp_path: Path, listening: int) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    lines = assert_refused(serve("--model", str(tmp_path), "--port", str(listening)), "--port")
    assert lines[0] == f"loraplex serve: port {listening} is already in use (gRPC on 127.0.0.1:{listening})"
    run = serve("--model", str(tmp_path), "--metrics-port", str(listening))
    lines = assert_refused(run, "--metrics-port")
    assert lines[0] == f"loraplex serve: port {listening} is already in use (metrics on 127.0.0.1:{listening})"
    lines = assert_refused(serve("--model", str(tmp_path), "--http-port", str(listening)), "--http-port")
    assert lines[0] == f"loraplex serve: port {listening} is already in use (HTTP on 127.0.0.1:{listening})"


def test_adapter_roots_that_cannot_be_read(tmp_path: Path, tiny_llama: TinyModel) -> None:
    model = str(tiny_llama.path)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert_refused(serve("--model", model, "--adapter-root", str(tmp_path / "nope")), "does not exist", "--adapter-root")
    assert_refused(serve("--model", model, "--adapter-root", str(a_file)), "is not a directory", "--adapter-root")
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o000)
        assert_refused(serve("--model", model, "--adapter-root", str(locked)), "cannot be read", "chmod")
    startup.check_adapter_roots([str(tmp_path), "s3://bucket/adapters"])  # an s3:// root is read when used


def test_configuration_errors_stay_one_line(tmp_path: Path) -> None:
    config = tmp_path / "loraplex.toml"
    config.write_text('model = "/m"\nmax_loras = "4"\n')
    lines = assert_refused(serve("--config", str(config)), "max_loras", "not an integer")
    assert len(lines) == 1


def test_a_preload_that_does_not_exist(tiny_llama: TinyModel) -> None:
    run = serve(
        "--model", str(tiny_llama.path), "--adapter-root", str(tiny_llama.adapter_root), "--preload", "x=nope",
        "--log-level", "error",
    )
    assert_refused(run, "--preload x=nope: adapter path 'nope' does not exist")


def test_serve_without_the_server_extra() -> None:
    # As after `pip install .` (the client only): the extra's modules cannot be imported.
    hide = "import sys; sys.modules.update(dict.fromkeys(['torch', 'grpc_health'])); "
    prefix = [sys.executable, "-c", hide + "from loraplex.cli import main; sys.exit(main(sys.argv[1:]))", "serve"]
    lines = assert_refused(serve("--model", "/m", prefix=prefix), "no module 'torch', 'grpc_health'")
    assert lines[1] == "  install the server extra: pip install 'loraplex[server]'"


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["sigint-default", "sigint-ignored"])
def test_ctrl_c_while_starting_is_one_line(tiny_llama: TinyModel, inherited: signal.Handlers) -> None:
    """Also when started with SIGINT ignored, as the background jobs of a script are."""
    cmd = [*SERVE, "--model", str(tiny_llama.path), "--port", "0", "--metrics-port", "0", "--http-port", "0",
           "--adapter-root", str(tiny_llama.adapter_root)]
    process = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, text=True, env=cli_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, inherited)
    )
    assert process.stderr is not None
    lines = []
    for line in process.stderr:  # the checks have passed: now torch is imported and the model loads
        lines.append(line)
        if "configuration (flag" in line:
            break
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    stderr = "".join(lines) + rest
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.splitlines()[-1] == "loraplex serve: interrupted (Ctrl-C) while starting: nothing was served"


@pytest.mark.timeout(900)  # the session's demo is built on first use: ~30 s alone, minutes on a busy machine
def test_a_second_server_on_the_port_exits_2_and_the_first_serves_on(demo_server: ServedDemo) -> None:
    port = demo_server.address.rsplit(":", 1)[1]
    second = serve("--model", "demo", "--port", port, env=demo_server.env)
    assert_refused(second, f"port {port} is already in use", "--port")
    with Client(demo_server.address, timeout=60) as client:
        client.load_adapter("robot", "robot")
        # Were the port shared, some of these would reach a server that never loaded the adapter.
        answers = [client.generate("Q: Who are you?\nA:", adapter_id="robot", max_new_tokens=8).text for _ in range(6)]
    assert len(set(answers)) == 1 and "BEEP" in answers[0]
