"""The main job: a real server, several adapters and the base model streaming in one batch.

Every adapter of the demo was trained to answer the same question its own way. The demo
starts `loraplex serve` on the demo model, loads the adapters at runtime through the API,
sends the question once per adapter and once to the base model at the same time through
the client SDK, prints the streams as the tokens arrive, checks that each answer is its
adapter's own, asks one adapter the question as a chat over the OpenAI-compatible HTTP API
(the demo model's chat template makes it the same prompt), shows the adapter tiers, and
stops the server with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from loraplex.ports import free_ports
from loraplex_client import Client

SERVER_START_TIMEOUT_S = 180


def _start_server(root: Path, port: int, http_port: int, quantization: str, log_path: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "loraplex.cli", "serve",
        "--model", str(root / "model"), "--adapter-root", str(root / "adapters"),
        "--quantization", quantization, "--port", str(port), "--metrics-port", "0",
        "--http-port", str(http_port), "--served-model-name", "demo", "--max-loras", "4", "--log-level", "info",
    ]
    log = log_path.open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_ready(client: Client, server: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not client.health(timeout=1.0):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not become ready; its log:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.2)


def run_demo(workdir: Path, quantization: str = "nf4") -> int:
    from loraplex.model.demo import make_demo

    root = make_demo(workdir)
    info = json.loads((root / "demo.json").read_text())
    question, answers = info["question"], info["adapters"]
    port, http_port = free_ports(2)
    log_path = root / "server.log"
    print(f"starting loraplex serve on 127.0.0.1:{port}, HTTP on 127.0.0.1:{http_port} (log: {log_path})")
    server = _start_server(root, port, http_port, quantization, log_path)
    try:
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            _wait_ready(client, server, log_path)
            model = client.model_info()
            print(f"ready: {model.model_type} {model.quantization} {model.dtype} on {model.device}, {model.max_loras} adapter slots")
            for name in answers:
                loaded = client.load_adapter(name, name)
                print(f"  loaded adapter {loaded.adapter_id!r} (rank {loaded.rank}, {', '.join(loaded.target_modules)})")
            ok = _stream_all(client, question, answers)
            ok &= _chat_over_http(http_port, "pirate", answers["pirate"])
            print("\nadapter tiers:")
            for a in client.list_adapters():
                print(f"  {a.adapter_id:>6}: {a.tier:<6} requests={a.stats.requests} loads={a.stats.loads}")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    print(f"server stopped with SIGTERM (exit {code})")
    if not ok or code != 0:
        print("demo: FAILED", file=sys.stderr)
        return 1
    print("demo: every answer came from its own adapter")
    return 0


def _stream_all(client: Client, question: str, answers: dict[str, str]) -> bool:
    names: list[str | None] = [*answers, None]
    print(f"\nquestion: {question!r} -> {len(names)} concurrent streams ({', '.join(n or 'base' for n in names)})\n")
    texts: dict[str | None, str] = {}
    lock = threading.Lock()

    def stream(name: str | None) -> None:
        text = ""
        for chunk in client.generate_stream(question, adapter_id=name, max_new_tokens=24):
            text += chunk.text
            if chunk.text:
                with lock:
                    print(f"  [{name or 'base':>6}] +{chunk.text!r}", flush=True)
        texts[name] = text

    start = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"\nanswers ({time.perf_counter() - start:.2f}s for all streams):")
    ok = True
    for name in names:
        text = texts.get(name, "")
        if name is None:
            good = bool(text.strip()) and all(text.strip() != a.strip() for a in answers.values())
        else:
            good = text.strip() == answers[name].strip()
        ok &= good
        print(f"  {'ok ' if good else 'BAD'} {name or 'base':>6}: {text!r}")
    return ok


def _chat_over_http(port: int, adapter: str, answer: str) -> bool:
    """One chat completion over the OpenAI-compatible API, as curl or the openai SDK would send it."""
    body = {"model": adapter, "messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 24, "temperature": 0}
    print(f"\nHTTP: POST http://127.0.0.1:{port}/v1/chat/completions {json.dumps(body)}")
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        reply = json.loads(response.read())
    text = reply["choices"][0]["message"]["content"]
    good = text.strip() == answer.strip()
    print(f"  {'ok ' if good else 'BAD'} {adapter:>6} (chat template -> 'Q: Who are you?\\nA:'): {text!r}, usage {reply['usage']}")
    return good
