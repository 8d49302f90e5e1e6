"""The adapter store under load: many adapters, few device slots, a small host budget.

Every request's tokens are checked against PEFT's greedy generate with its adapter; the
tiers evict, and an adapter in use is never evicted (checked at every step)."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TinyModel, make_engine
from loraplex.engine.request import SamplingParams
from loraplex.lora.adapter_spec import AdapterError
from loraplex.lora.adapter_version import AdapterNotFoundError
from loraplex.rules import InvalidFieldError

NUM_ADAPTERS = 50
NUM_REQUESTS = 200
MAX_NEW = 6
TEMPLATES = ["qv-r4", "all-r8-rslora", "attn-r8-layer0"]


def _variant(src: Path, dst: Path, seed: int) -> Path:
    """A PEFT directory like src with fresh random weights of the same shapes and scale."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(dst / "adapter_model.safetensors")
    fresh = {k: torch.randn(v.shape, generator=g) * v.std() for k, v in tensors.items()}
    save_file(fresh, dst / "adapter_model.safetensors")
    return dst


@pytest.fixture(scope="module")
def many_adapters(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("many")
    for i in range(NUM_ADAPTERS):
        template = TEMPLATES[i % len(TEMPLATES)]
        _variant(tiny_llama.adapters[template], root / f"tenant{i % 5}" / f"a{i:02d}", seed=1000 + i)
    return root


class PeftPerAdapter:
    """PEFT's greedy generate, one adapter loaded at a time (an independent per-adapter loop)."""

    def __init__(self, tiny: TinyModel) -> None:
        from peft import PeftModel

        from conftest import PeftReference

        self.base_ref = PeftReference(tiny)  # NF4 base, fp32 compute, like the engine
        self.peft_cls = PeftModel

    def greedy_all(self, jobs: dict[str, list[list[int]]], root: Path) -> dict[tuple[str, tuple[int, ...]], list[int]]:
        model = self.base_ref.model
        out = {}
        for adapter_id, prompts in jobs.items():
            model.load_adapter(root / adapter_id, adapter_name="job")
            model.set_adapter("job")
            for prompt in prompts:
                with torch.inference_mode():
                    ids = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=MAX_NEW, do_sample=False)
                out[(adapter_id, tuple(prompt))] = ids[0, len(prompt) :].tolist()
            model.delete_adapter("job")
        return out


@pytest.mark.timeout(900)  # ~60 s alone (50 PEFT reference runs); minutes on a machine that runs other jobs too
def test_power_law_traffic_over_50_adapters_4_slots(tiny_llama: TinyModel, many_adapters: Path) -> None:
    names = sorted(str(p.relative_to(many_adapters)) for p in many_adapters.glob("*/*"))
    assert len(names) == NUM_ADAPTERS
    probe = make_engine(tiny_llama, register=False, roots=(str(many_adapters),))
    one = probe.store.register(names[0], names[0]).host_bytes
    probe.close()
    engine = make_engine(
        tiny_llama, register=False, roots=(str(many_adapters),), max_loras=4,
        max_host_adapter_bytes=10 * one, max_num_seqs=16,
    )
    rng = random.Random(0)
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(NUM_ADAPTERS)]  # S-LoRA-style power law
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(3, 20))] for _ in range(6)]
    requests = [(rng.choices(names, weights)[0], rng.choice(prompts)) for _ in range(NUM_REQUESTS)]

    # Every step: each running request's adapter sits in its own slot.
    original_step = engine.scheduler.schedule
    checked = 0

    def schedule() -> Any:
        nonlocal checked
        batch = original_step()
        device = engine.store.device_versions()
        for request in engine.scheduler.running:
            if request.adapter is not None:
                assert request.adapter.slot is not None and device[request.adapter.slot] is request.adapter
                checked += 1
        assert len({r.adapter.slot for r in engine.scheduler.running if r.adapter is not None}) <= 4
        return batch

    engine.scheduler.schedule = schedule  # type: ignore[method-assign]
    results = engine.generate([p for _, p in requests], SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True), [a for a, _ in requests])

    jobs: dict[str, list[list[int]]] = {}
    for adapter, prompt in requests:
        if prompt not in jobs.setdefault(adapter, []):
            jobs[adapter].append(prompt)
    expected = PeftPerAdapter(tiny_llama).greedy_all(jobs, many_adapters)
    for (adapter, prompt), result in zip(requests, results):
        assert result.token_ids == expected[(adapter, tuple(prompt))], adapter

    counters = engine.store.counters
    assert counters[("device", "evictions")] > 0 and counters[("host", "evictions")] > 0
    snapshot = engine.store.snapshot()
    assert snapshot.host_bytes <= 10 * one and checked > 0
    busiest = max(engine.store.infos(), key=lambda i: i.stats.requests)
    assert busiest.stats.requests == max(sum(1 for a, _ in requests if a == n) for n in names)
    engine.close()


def test_base_request_is_not_delayed_by_adapter_loads(tiny_llama: TinyModel) -> None:
    engine = make_engine(tiny_llama, register=False)
    gate = threading.Event()
    original = engine.store.load_fn

    def slow_load(spec: Any) -> Any:
        gate.wait(timeout=30)
        return original(spec)

    engine.store.load_fn = slow_load
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    slow = [engine.add_request(prompt_token_ids=[5, 6, 7], params=params, adapter_id=name) for name in tiny_llama.adapters]
    base = engine.add_request(prompt_token_ids=[5, 6, 7], params=params)
    finished: list[str] = []
    deadline = time.monotonic() + 60
    while len(finished) < len(slow) + 1 and time.monotonic() < deadline:
        for out in engine.step():
            if out.finished:
                finished.append(out.request_id)
                if out.request_id == base:
                    gate.set()  # adapters may load only once the base request is done
        engine.wait_for_work(0.01)
    assert finished[0] == base and set(finished) == {base, *slow}
    engine.close()


@pytest.mark.parametrize("old_state", ["running", "queued"])
def test_reload_mid_traffic_old_requests_keep_old_version(
    old_state: str, tiny_llama: TinyModel, llama_peft: Any, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    _variant(tiny_llama.adapters["all-r8-rslora"], root / "v1", seed=1)
    _variant(tiny_llama.adapters["all-r8-rslora"], root / "v2", seed=2)
    engine = make_engine(tiny_llama, register=False, roots=(str(root),))
    engine.register_adapter("acme/live", "v1")
    prompt = [9, 8, 7, 6, 5]
    long = SamplingParams(max_new_tokens=12, ignore_eos=True)
    old = engine.add_request(prompt_token_ids=prompt, params=long, adapter_id="acme/live")
    outputs: list[Any] = []
    # running: v1 is on the device and old has tokens; queued: v1 may not even be loaded yet
    while old_state == "running" and not any(o.request_id == old and o.new_token_ids for o in outputs):
        outputs += engine.step()
        engine.wait_for_work(0.001)
    info = engine.register_adapter("acme/live", "v2")
    assert info.version == 2
    new = engine.add_request(prompt_token_ids=prompt, params=long, adapter_id="acme/live")
    while engine.has_unfinished():
        outputs += engine.step()
        engine.wait_for_work(0.001)
    tokens = {rid: [t for o in outputs if o.request_id == rid for t in o.new_token_ids] for rid in (old, new)}
    reference = PeftPerAdapter.__new__(PeftPerAdapter)
    reference.base_ref = llama_peft
    global MAX_NEW
    saved, MAX_NEW = MAX_NEW, 12
    try:
        expected = reference.greedy_all({"v1": [prompt], "v2": [prompt]}, root)
    finally:
        MAX_NEW = saved
    assert tokens[old] == expected[("v1", tuple(prompt))]
    assert tokens[new] == expected[("v2", tuple(prompt))]
    assert tokens[old] != tokens[new]
    # the retired version left every tier once its request ended
    assert all(v is None or v.version == 2 for v in engine.store.device_versions())
    engine.close()


def test_paths_must_stay_inside_the_root(tiny_llama: TinyModel, tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(tiny_llama.adapters["qv-r4"], outside / "evil")
    shutil.copytree(tiny_llama.adapters["qv-r4"], root / "good")
    os.symlink(outside / "evil", root / "link")
    engine = make_engine(tiny_llama, register=False, roots=(str(root),))
    store = engine.store
    with pytest.raises(AdapterError, match="outside the adapter roots"):
        store.register("x", "../outside/evil", relative_only=True)
    with pytest.raises(AdapterError, match="must be relative"):
        store.register("x", str(outside / "evil"), relative_only=True)
    with pytest.raises(AdapterError, match="outside the adapter roots"):
        store.register("x", "link", relative_only=True)
    with pytest.raises(AdapterNotFoundError, match="'missing' does not exist under the adapter roots"):
        store.register("x", "missing", relative_only=True)
    (root / "a-file").write_text("")
    with pytest.raises(AdapterError, match="not a directory"):
        store.register("x", "a-file", relative_only=True)
    with pytest.raises(InvalidFieldError, match="invalid"):
        store.register("../x", "good", relative_only=True)
    with pytest.raises(AdapterError, match="outside the adapter roots"):
        store.resolve("link")  # auto-register follows the same rule
    with pytest.raises(AdapterNotFoundError):
        store.resolve("nothing-here")
    assert store.register("ok", "good", relative_only=True).version >= 1
    assert store.get("ok").path == "good"  # relative to its root: callers never see the server's paths
    shutil.copytree(root / "good", root / "team" / "broken")
    (root / "team" / "broken" / "adapter_config.json").write_text("[1]")
    with pytest.raises(AdapterError) as err:
        store.register("broken", "team/broken", relative_only=True)
    assert str(err.value) == "team/broken: adapter_config.json must hold a JSON object"
    assert store.resolve("good").adapter_id == "good"  # auto-registered by directory name
    engine.close()


def test_versions_count_per_adapter_id_from_one(tiny_llama: TinyModel, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for i in (1, 2, 3):
        _variant(tiny_llama.adapters["qv-r4"], root / f"w{i}", seed=i)
    engine = make_engine(tiny_llama, register=False, roots=(str(root),))
    store = engine.store
    assert store.register("acme/a", "w1").version == 1
    assert store.register("acme/b", "w1").version == 1  # a new id starts at 1, whatever others did
    assert store.register("acme/a", "w2").version == 2
    assert store.register("acme/a", "w2").version == 2  # same content: the same version
    assert store.register("acme/b", "w3").version == 2
    store.unregister("acme/a")
    # A number is never reused for an id: a retired v2 may still be finishing requests.
    assert store.register("acme/a", "w3").version == 3
    assert [(i.adapter_id, i.version) for i in store.infos()] == [("acme/a", 3), ("acme/b", 2)]
    engine.close()


def test_pins_stay_resident_and_unregister_in_use(tiny_llama: TinyModel) -> None:
    engine = make_engine(tiny_llama, register=False, max_loras=2, auto_register=False)
    engine.register_adapter("qv-r4", "qv-r4", pin=True)
    with pytest.raises(AdapterError, match="cannot pin more than 1"):
        engine.register_adapter("attn-r8-layer0", "attn-r8-layer0", pin=True)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    names = ["qv-r4", "all-r8-rslora", "all-r16-patterns", "attn-r8-layer0"]
    for name in names[1:]:
        engine.register_adapter(name, name)
    engine.generate([[5, 6, 7]] * 8, params, names * 2)
    pinned = engine.store.resolve("qv-r4")
    assert pinned.slot is not None and pinned.weights is not None
    assert engine.store.counters[("device", "evictions")] > 0
    rid = engine.add_request(prompt_token_ids=[5, 6], params=SamplingParams(max_new_tokens=50, ignore_eos=True), adapter_id="qv-r4")
    engine.step()
    version = engine.resolve_adapter("qv-r4")
    assert engine.unregister_adapter("qv-r4", force=True) == 1  # the one live request holding it
    with pytest.raises(AdapterNotFoundError):
        engine.add_request("x", adapter_id="qv-r4")
    outs = engine.step()
    ended = [o for o in outs if o.request_id == rid]
    assert ended and ended[0].finish_reason == "aborted" and "unloaded" in (ended[0].error or "")
    assert version.holders == 0 and version.slot is None and version.weights is None
    engine.close()


def test_adapter_that_fails_to_load_ends_its_requests_with_the_reason(tiny_llama: TinyModel, tmp_path: Path) -> None:
    root = tmp_path / "root"
    bad = _variant(tiny_llama.adapters["qv-r4"], root / "bad", seed=5)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    save_file(tensors, bad / "adapter_model.safetensors")
    engine = make_engine(tiny_llama, register=False, roots=(str(root),))
    engine.register_adapter("bad", "bad")  # the header is fine: the values are only read by the loader
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    failing = engine.add_request(prompt_token_ids=[5, 6, 7], params=params, adapter_id="bad")
    healthy = engine.add_request(prompt_token_ids=[5, 6, 7], params=params)
    outputs: list[Any] = []
    while engine.has_unfinished():
        outputs += engine.step()
        engine.wait_for_work(0.005)
    ends = {o.request_id: o for o in outputs if o.finished}
    assert ends[failing].finish_reason == "error" and ends[failing].error_kind == "adapter"
    assert "NaN or Inf" in (ends[failing].error or "")
    assert (ends[failing].error or "").startswith("bad: ")  # named relative to the root, as callers see it
    assert str(root) not in (ends[failing].error or "")
    assert ends[healthy].finish_reason == "length"
    assert engine.store.get("bad").error is not None
    engine.close()
