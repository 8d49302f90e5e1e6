"""The main job: one base, several adapters and the base model streaming in one batch.

Every adapter of the demo was trained to answer the same question its own way; the demo
sends the question once per adapter and once to the base, in one mixed batch, prints the
streams as the tokens arrive, and checks that each answer is its adapter's own.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from loraplex.config import EngineConfig, LoraConfig, ModelConfig
from loraplex.engine.request import SamplingParams


def run_demo(workdir: Path, quantization: str = "nf4") -> int:
    from loraplex.engine.engine import Engine
    from loraplex.model.demo import make_demo

    root = make_demo(workdir)
    info = json.loads((root / "demo.json").read_text())
    question, answers = info["question"], info["adapters"]
    engine = Engine(
        EngineConfig(
            model=ModelConfig(str(root / "model"), quantization=quantization),  # type: ignore[arg-type]
            lora=LoraConfig(max_loras=4, adapter_roots=(str(root / "adapters"),)),
        )
    )
    names: list[str | None] = [*answers, None]
    params = SamplingParams(max_new_tokens=24)
    print(f"\nquestion: {question!r} -> {len(names)} streams in one batch ({', '.join(n or 'base' for n in names)})\n")
    ids = {engine.add_request(question, params, adapter_id=name): name for name in names}
    texts = {rid: "" for rid in ids}
    start = time.perf_counter()
    finished: set[str] = set()
    while len(finished) < len(ids):
        outputs = engine.step()
        if not outputs:
            engine.wait_for_work(0.01)
        for out in outputs:
            texts[out.request_id] += out.new_text
            label = ids[out.request_id] or "base"
            if out.new_text:
                print(f"  [{label:>6}] +{out.new_text!r}", flush=True)
            if out.finished:
                finished.add(out.request_id)
    elapsed = time.perf_counter() - start
    engine.close()

    print(f"\nanswers ({elapsed:.2f}s for the batch):")
    ok = True
    for rid, name in ids.items():
        text = texts[rid]
        expected = answers.get(name) if name else None
        good = text.strip() == expected.strip() if expected else all(text.strip() != a.strip() for a in answers.values())
        ok &= good
        print(f"  {'ok ' if good else 'BAD'} {name or 'base':>6}: {text!r}")
    if not ok:
        print("demo: some answers did not come from their adapter", file=sys.stderr)
        return 1
    print("\ndemo: every answer came from its own adapter")
    return 0
