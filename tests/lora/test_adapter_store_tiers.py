"""The adapter store's bookkeeping with fake slots and a fake reader: no torch, no model.

Tiers, LRU eviction, reference counts, versions, pins, failures and the counters, each with
exact values. Adapter directories are written by hand (a config and a safetensors file for
one 8x8 layer), so these tests run in well under a second and guard adapter_store.py
in `make mutants`. The real tensors and the engine around the store: test_adapter_store.py.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplex.lora.adapter_spec import AdapterError, AdapterReadError, AdapterSpec, BaseLayerInfo
from loraplex.lora.adapter_store import AdapterStore
from loraplex.lora.adapter_version import AdapterNotFoundError, AdapterVersion, Tier
from loraplex.lora.slots import SlotState

LAYER = "model.layers.0.self_attn.q_proj"
LAYERS = {LAYER: BaseLayerInfo(LAYER, 8, 8)}
ITEMSIZE = 4
RANK = 2
BYTES = RANK * (8 + 8) * ITEMSIZE  # host bytes of one adapter at RANK


def write_adapter(path: Path, seed: float = 0.0, rank: int = RANK) -> Path:
    """A PEFT LoRA directory for LAYERS: A [rank, 8], B [8, rank] in F32, values from `seed`."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    n = rank * 8
    body = struct.pack(f"<{2 * n}f", *(seed + i for i in range(2 * n)))
    prefix = f"base_model.model.{LAYER}"
    header = {
        f"{prefix}.lora_A.weight": {"dtype": "F32", "shape": [rank, 8], "data_offsets": [0, 4 * n]},
        f"{prefix}.lora_B.weight": {"dtype": "F32", "shape": [8, rank], "data_offsets": [4 * n, 8 * n]},
    }
    raw = json.dumps(header).encode()
    (path / "adapter_model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + body)
    return path


class FakeSlots:
    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.writes: list[tuple[int, object]] = []
        self.swaps: list[tuple[int, int]] = []
        self.contents: list[object] = [None] * max_loras

    def write_slot(self, slot: int, weights: object) -> None:
        self.writes.append((slot, weights))
        self.contents[slot] = weights

    def swap_slots(self, a: int, b: int) -> None:
        self.swaps.append((a, b))
        self.contents[a], self.contents[b] = self.contents[b], self.contents[a]


class FakeReader:
    """load_fn: the spec's path back as the 'weights'; an exception set per directory name."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.fail: dict[str, Exception] = {}

    def __call__(self, spec: AdapterSpec) -> object:
        name = Path(spec.path).name
        self.reads.append(name)
        if name in self.fail:
            raise self.fail[name]
        return ("weights", name)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for i, name in enumerate("abcd"):
        write_adapter(tmp_path / name, seed=10.0 * i)
    return tmp_path


@pytest.fixture
def reader() -> FakeReader:
    return FakeReader()


def make_store(root: Path, reader: FakeReader, *, slots: int = 2, host_adapters: int = 4, **kwargs: object) -> AdapterStore:
    return AdapterStore(
        LAYERS, FakeSlots(slots), reader, max_rank=8, host_budget=host_adapters * BYTES, itemsize=ITEMSIZE,  # type: ignore[arg-type]
        adapter_roots=(str(root),), **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(root: Path, reader: FakeReader) -> Iterator[AdapterStore]:
    s = make_store(root, reader)
    yield s
    s.close()


def loaded(store: AdapterStore, *versions: AdapterVersion) -> None:
    """Hold each version (a request arrives), let the loader read them, then drop the holds."""
    for v in versions:
        store.hold(v)
    assert store.wait_idle(10)
    for v in versions:
        store.unhold(v)


def counters(store: AdapterStore) -> dict[tuple[str, str], int]:
    return dict(store.counters)


def test_hold_loads_to_host_then_a_slot_is_acquired_and_released(store: AdapterStore, reader: FakeReader) -> None:
    a = store.resolve("a")  # auto-registered from the root
    assert (a.adapter_id, a.version, a.host_bytes, a.tier) == ("a", 1, BYTES, Tier.REGISTERED)
    assert store.try_acquire(a) is SlotState.NOT_READY  # not read yet: queued, not loaded here
    store.hold(a)
    assert store.wait_idle(10)
    assert (a.tier, a.weights, a.holders, reader.reads) == (Tier.HOST, ("weights", "a"), 1, ["a"])
    assert store.loaded(a) and not store.on_device(a)
    assert store.try_acquire(a) is SlotState.ACQUIRED
    slot = a.slot
    assert slot is not None and store.on_device(a) and a.slot_refs == 1 and a.tier is Tier.DEVICE
    assert store.slots.writes == [(slot, ("weights", "a"))]  # type: ignore[attr-defined]
    assert store.try_acquire(a) is SlotState.ACQUIRED  # a second running request: no second copy
    assert a.slot_refs == 2 and len(store.slots.writes) == 1  # type: ignore[attr-defined]
    store.release(a)
    store.release(a)
    store.unhold(a)
    assert (a.slot_refs, a.holders, a.slot) == (0, 0, slot)  # stays resident until its slot is needed
    assert a.stats.requests == 1 and (a.stats.host_misses, a.stats.host_hits) == (1, 0)
    assert (a.stats.device_misses, a.stats.device_hits, a.stats.loads) == (1, 1, 1)
    assert counters(store) == {
        ("registered", "registrations"): 1, ("host", "misses"): 1, ("host", "loads"): 1,
        ("device", "misses"): 1, ("device", "loads"): 1, ("device", "hits"): 1,
    }
    snap = store.snapshot()
    assert (snap.host_bytes, snap.host_budget, snap.host_resident, snap.device_resident) == (BYTES, 4 * BYTES, 1, 1)
    assert (snap.device_slots, snap.registered, snap.slot_refs, snap.holders) == (2, 1, 0, 0)
    store.hold(a)  # on the host and the device: a hit, nothing read
    assert a.stats.host_hits == 1 and counters(store)[("host", "hits")] == 1 and reader.reads == ["a"]
    store.unhold(a)


def test_device_slots_evict_the_least_recently_used_unreferenced_adapter(store: AdapterStore) -> None:
    a, b, c = (store.resolve(n) for n in "abc")
    loaded(store, a, b, c)
    assert store.try_acquire(a) is SlotState.ACQUIRED
    assert store.try_acquire(b) is SlotState.ACQUIRED
    assert store.try_acquire(c) is SlotState.NOT_READY  # both slots referenced
    store.release(b)
    store.release(a)
    assert store.try_acquire(b) is SlotState.ACQUIRED  # b used last: a is the LRU
    store.release(b)
    b_slot, a_slot = b.slot, a.slot
    assert store.try_acquire(c) is SlotState.ACQUIRED
    assert (a.slot, c.slot, b.slot) == (None, a_slot, b_slot)
    assert a.stats.evictions == 1 and counters(store)[("device", "evictions")] == 1
    store.release(c)


def test_a_pinned_adapter_keeps_its_slot_and_pins_leave_one_slot_free(root: Path, reader: FakeReader) -> None:
    store = make_store(root, reader, slots=3)
    try:
        p = store.register("p", "a", pin=True)  # read at once, without a request
        assert store.wait_idle(10) and p.weights is not None and p.pinned
        store.register("q", "b", pin=True)
        with pytest.raises(AdapterError, match=r"^cannot pin more than 2 adapters with 3 device slots$"):
            store.register("r", "c", pin=True)
        assert store.lookup("r") is None
        assert store.register("p", "a", pin=True) is p  # unchanged: the same version, still one pin
        b, c = store.resolve("b"), store.resolve("c")
        loaded(store, b, c)
        for v in (p, b, c):
            assert store.try_acquire(v) is SlotState.ACQUIRED
            store.release(v)
        d = store.resolve("d")
        loaded(store, d)
        assert store.try_acquire(d) is SlotState.ACQUIRED  # evicts b (LRU, not pinned), not p
        assert p.slot is not None and b.slot is None and c.slot is not None
        store.release(d)
    finally:
        store.close()


def test_the_host_tier_evicts_lru_within_budget_but_keeps_what_a_waiting_request_needs(root: Path, reader: FakeReader) -> None:
    store = make_store(root, reader, host_adapters=2)
    try:
        a, b, c, d = (store.resolve(n) for n in "abcd")
        loaded(store, a, b)
        store.hold(a)  # a is used again: b is the LRU
        store.unhold(a)
        loaded(store, c)
        assert (a.weights is not None, b.weights, c.weights is not None) == (True, None, True)
        assert store.snapshot().host_bytes == 2 * BYTES and counters(store)[("host", "evictions")] == 1
        store.hold(a)
        store.hold(c)  # both wanted by waiting requests, neither on the device: d must wait
        store.hold(d)
        assert not store.wait_idle(0.3)
        assert d.weights is None and d.queued and store.snapshot().host_bytes == 2 * BYTES
        assert store.try_acquire(a) is SlotState.ACQUIRED  # a on the device: its host copy may go
        assert store.wait_idle(10)
        assert (a.weights, d.weights) == (None, ("weights", "d")) and store.snapshot().host_bytes == 2 * BYTES
        assert store.loaded(a) and store.on_device(a)  # no host copy, but ready on the device
        assert not store.loaded(b) and not store.on_device(b)
        store.release(a)
        for v in (a, c, d):
            store.unhold(v)
    finally:
        store.close()


def test_versions_reregistration_and_retirement(store: AdapterStore, root: Path) -> None:
    v1 = store.register("x", "a")
    assert store.register("x", "a") is v1  # same content: the same version
    write_adapter(root / "a", seed=99.0)
    store.hold(v1)  # a request is running on v1
    v2 = store.register("x", "a")
    assert (v2.version, v2.retired, v1.retired, store.resolve("x")) == (2, False, True, v2)
    assert v2.stats is v1.stats  # the id's statistics carry over
    assert {i.version for i in store.infos()} == {2}
    assert store.wait_idle(10) and v1.weights is not None
    assert store.try_acquire(v1) is SlotState.ACQUIRED
    store.release(v1)  # the request finishes: its slot reference goes first, then its hold
    assert v1.slot is not None and v1.weights is not None  # still held: kept
    store.unhold(v1)
    assert (v1.slot, v1.weights, store.snapshot().host_bytes, store.snapshot().device_resident) == (None, None, 0, 0)
    gone = store.unregister("x")
    assert gone is v2 and v2.retired and store.lookup("x") is None
    with pytest.raises(AdapterNotFoundError, match="^adapter 'x' is not registered$"):
        store.get("x")
    v3 = store.register("x", "a")
    assert v3.version == 3  # a number is never reused
    assert counters(store)[("registered", "registrations")] == 3


def test_an_adapter_over_the_host_budget_is_refused(root: Path, reader: FakeReader) -> None:
    write_adapter(root / "big", rank=4)
    store = make_store(root, reader, host_adapters=1)
    try:
        with pytest.raises(AdapterError, match=rf"^adapter 'big' takes {2 * BYTES} bytes, more than the host budget of {BYTES}$"):
            store.register("big", "big")
        assert store.register("fits", "a").host_bytes == BYTES  # exactly the budget
    finally:
        store.close()


def test_unknown_ids_and_no_auto_register(root: Path, reader: FakeReader) -> None:
    store = make_store(root, reader, auto_register=False)
    try:
        with pytest.raises(AdapterNotFoundError):
            store.resolve("a")
    finally:
        store.close()
    store = make_store(root, reader)
    try:
        with pytest.raises(AdapterNotFoundError, match="^adapter 'nope' is not registered$"):
            store.resolve("nope")
        assert store.resolve("a") is store.resolve("a")
    finally:
        store.close()


def test_a_failed_read_fails_its_requests_and_a_read_error_is_retried(store: AdapterStore, reader: FakeReader) -> None:
    a, b = store.resolve("a"), store.resolve("b")
    reader.fail["a"] = AdapterError("bad tensors")
    reader.fail["b"] = AdapterReadError("disk error")
    store.hold(a)
    store.hold(b)
    assert store.wait_idle(10)
    assert (store.try_acquire(a), store.failure(a)) == (SlotState.FAILED, "bad tensors")
    assert (store.try_acquire(b), store.failure(b)) == (SlotState.FAILED, "disk error")
    assert store.snapshot().host_bytes == 0  # the reservations were returned
    store.unhold(a)
    store.unhold(b)
    assert a.error == "bad tensors" and b.error is None  # a read error goes with its requests
    del reader.fail["b"]
    store.hold(b)
    assert store.wait_idle(10) and b.weights == ("weights", "b") and reader.reads.count("b") == 2
    store.unhold(b)


def test_a_retired_version_still_loads_for_the_request_holding_it(store: AdapterStore, root: Path) -> None:
    v1 = store.register("x", "a")
    store.hold(v1)
    store.unregister("x")
    assert store.wait_idle(10) and v1.weights is not None
    assert store.try_acquire(v1) is SlotState.ACQUIRED
    store.release(v1)
    assert v1.slot is not None  # held still
    store.unhold(v1)
    assert (v1.slot, v1.weights, store.snapshot().host_resident) == (None, None, 0)


# What mutation testing (make mutants) found untested: counters over repeated use, a retired
# version dropped by whichever reference goes last, and host room that needs two evictions.


def test_the_counters_add_up_over_repeated_use(root: Path, reader: FakeReader) -> None:
    store = make_store(root, reader, slots=1)
    try:
        a, b = store.resolve("a"), store.resolve("b")
        store.hold(a)
        store.hold(a)  # two requests on a
        assert a.holders == 2 and a.stats.requests == 2
        assert store.wait_idle(10)
        store.unhold(a)
        store.unhold(a)
        loaded(store, a, b)  # both on the host now: hits
        # the second hold came before the read finished: a miss too, and one read
        assert (a.stats.requests, a.stats.host_misses, a.stats.host_hits) == (3, 2, 1) and reader.reads.count("a") == 1
        for _ in range(2):
            for v in (a, b, a):  # one slot: a and b take it in turn
                assert store.try_acquire(v) is SlotState.ACQUIRED
                store.release(v)
        assert (a.stats.device_misses, a.stats.device_hits, a.stats.evictions) == (3, 1, 2)
        assert counters(store)[("device", "evictions")] == 4 and counters(store)[("device", "hits")] == 1
    finally:
        store.close()


def test_a_retired_version_goes_with_its_last_slot_reference(store: AdapterStore) -> None:
    v = store.register("x", "a", pin=True)
    assert store.wait_idle(10)
    store.hold(v)
    assert store.try_acquire(v) is SlotState.ACQUIRED
    store.unregister("x")
    assert v.retired and v.pinned is False
    store.unhold(v)  # the hold goes first: the running request still has the slot
    assert v.slot is not None and v.weights is not None
    store.release(v)
    assert (v.slot, v.weights, store.snapshot().host_bytes, store.snapshot().device_resident) == (None, None, 0, 0)


def test_an_idle_version_is_dropped_when_it_is_retired(store: AdapterStore) -> None:
    v = store.register("x", "a")
    loaded(store, v)
    assert store.try_acquire(v) is SlotState.ACQUIRED
    store.release(v)
    assert v.slot is not None  # resident, unreferenced
    store.unregister("x")
    assert (v.slot, v.weights, store.snapshot().host_bytes) == (None, None, 0)


def test_host_room_for_a_larger_adapter_evicts_as_many_as_it_needs(root: Path, reader: FakeReader) -> None:
    write_adapter(root / "big", rank=4)  # 2 * BYTES
    store = make_store(root, reader, host_adapters=3)
    try:
        a, b, c = (store.resolve(n) for n in "abc")
        loaded(store, a, b, c)
        assert store.snapshot().host_bytes == 3 * BYTES
        big = store.resolve("big")
        loaded(store, big)
        assert big.weights is not None and store.snapshot().host_bytes == 3 * BYTES
        assert (a.weights, b.weights, c.weights is not None) == (None, None, True)  # the two LRU went
    finally:
        store.close()


def test_compaction_sorts_slots_by_rank_and_each_adapter_keeps_its_weights_and_recency(tmp_path: Path, reader: FakeReader) -> None:
    ranks = {"a": 8, "b": 2, "c": 4, "d": 2, "e": 1}
    for i, (name, rank) in enumerate(ranks.items()):
        write_adapter(tmp_path / name, seed=float(i), rank=rank)
    store = make_store(tmp_path, reader, slots=4, host_adapters=16)
    try:
        versions = {name: store.resolve(name) for name in "abcde"}
        loaded(store, *versions.values())
        for name in "abcd":  # placed one by one: not in rank order
            assert store.try_acquire(versions[name]) is SlotState.ACQUIRED
        for name in "cbda":  # recency, least recent first: c (which the exchanges move) b d a
            store.release(versions[name])
            assert store.try_acquire(versions[name]) is SlotState.ACQUIRED
            store.release(versions[name])
        placed = [None if v is None else v.spec.rank for v in store.device_versions()]
        assert placed != sorted(placed)  # the case needs exchanges
        moves = 0
        while store.compact_slots():
            moves += 1
        assert not store.compact_slots()  # sorted: nothing more to do, no exchange of equal ranks
        assert [v.spec.rank for v in store.device_versions() if v is not None] == [2, 2, 4, 8]
        assert moves == len(store.slots.swaps) == counters(store)[("device", "moves")] >= 1  # type: ignore[attr-defined]
        for name in "abcd":  # each adapter's slot holds its own weights
            assert store.slots.contents[versions[name].slot] == ("weights", name)  # type: ignore[attr-defined]
            assert store.device_versions()[versions[name].slot] is versions[name]
        assert store.try_acquire(versions["e"]) is SlotState.ACQUIRED  # evicts the least recently used adapter
        assert versions["c"].slot is None and all(versions[n].slot is not None for n in "abde")
        store.release(versions["e"])
        while store.compact_slots():  # rank 1 where c's rank 4 was
            pass
        assert [v.spec.rank for v in store.device_versions() if v is not None] == [1, 2, 2, 8]
    finally:
        store.close()
