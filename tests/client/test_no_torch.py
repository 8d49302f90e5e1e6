"""The SDK needs only grpcio and protobuf: run it in a fresh virtualenv holding just those
two, against the fake server running in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from fake_loraplex import serve_fake

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import asyncio, importlib.util, json, sys

import loraplex_client
from loraplex_client import AdapterNotFoundError, AsyncClient, Client

with Client(sys.argv[1], token="t") as client:
    result = client.generate("hi", adapter_id="acme/a")
    chunks = [c.text for c in client.generate_stream("abc")]
    try:
        client.get_adapter("acme/nope")
        not_found = False
    except AdapterNotFoundError:
        not_found = True
    healthy = client.health()


async def main():
    async with AsyncClient(sys.argv[1]) as client:
        return (await client.generate("async")).text

print(json.dumps({
    "file": loraplex_client.__file__,
    "text": result.text,
    "chunks": chunks,
    "not_found": not_found,
    "healthy": healthy,
    "async_text": asyncio.run(main()),
    "imported": sorted(m for m in ("torch", "transformers", "numpy", "loraplex", "grpc_health") if m in sys.modules),
    "installed": sorted(m for m in ("torch", "transformers", "grpc_health") if importlib.util.find_spec(m)),
}))
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sdk_works_with_only_grpcio_and_protobuf(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"

    # The versions this suite runs with: the generated stubs refuse older ones.
    pins = [f"{name}=={metadata.version(name)}" for name in ("grpcio", "protobuf")]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--retries", "2", "--timeout", "30", *pins],
        capture_output=True, text=True, timeout=600, env=env,
    )
    if pip.returncode != 0:
        pytest.skip(f"pip could not install {pins} (no package registry?): {pip.stderr.strip()[-500:]}")

    # Only the SDK's own folder on the path, no user site-packages: nothing else to lean on.
    env |= {"PYTHONPATH": str(ROOT / "client"), "PYTHONNOUSERSITE": "1"}
    with serve_fake() as server:
        run = subprocess.run(
            [str(python), "-c", SCRIPT, server.address],
            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
        )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)

    assert Path(report["file"]).resolve() == ROOT / "client" / "loraplex_client" / "__init__.py"
    assert report["installed"] == [] and report["imported"] == []
    assert (report["text"], report["chunks"], report["async_text"]) == ("hi", ["a", "b", "c", ""], "async")
    assert report["not_found"] and report["healthy"]

    # `loraplex serve` on this client-only install: two lines naming the missing extra, exit 2.
    env |= {"PYTHONPATH": os.pathsep.join([str(ROOT / "server"), str(ROOT / "client")])}
    serve = subprocess.run(
        [str(python), "-m", "loraplex.cli", "serve", "--model", "/m", "--port", "0", "--metrics-port", "0", "--http-port", "0"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert serve.returncode == 2, serve.stderr
    assert serve.stderr.splitlines() == [
        "loraplex serve: the server extra is not installed (no module 'torch', 'transformers', 'peft', 'bitsandbytes', "
        "'safetensors', 'tokenizers', 'prometheus_client', 'grpc_health', 'grpc_reflection', 'fastapi', 'uvicorn', "
        "'jinja2')",
        "  install the server extra: pip install 'loraplex[server]'",
    ]
