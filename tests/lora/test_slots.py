"""Slot placement and exchanges: adapters of one rank end up in adjacent slots (one batched matmul at decode)."""

from __future__ import annotations

import itertools
import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from loraplex.lora.adapter_weights import AdapterWeights, LoraModuleWeights
from loraplex.lora.lora_backend import targets_mask
from loraplex.lora.lora_layer import LoraModel
from loraplex.lora.lora_ops import TorchLora
from loraplex.lora.slots import next_swap, placement


def _fill(ranks: list[int], num_slots: int) -> list[int | None]:
    device: list[int | None] = [None] * num_slots
    for rank in ranks:
        empty = [s for s, r in enumerate(device) if r is None]
        device[placement(empty, device, rank)] = rank
    return device


def _runs(device: list[int | None]) -> int:
    return 1 + sum(1 for a, b in itertools.pairwise(device) if a != b)


def test_an_adapter_goes_beside_one_of_its_rank() -> None:
    assert placement([0, 2, 5], [None, 8, None, 16, 16, None], 16) == 2
    assert placement([0, 2, 5], [None, 8, None, 16, 16, None], 8) == 0


def test_without_a_neighbour_of_its_rank_it_takes_the_middle_of_the_longest_free_run() -> None:
    assert placement(list(range(16)), [None] * 16, 4) == 8
    assert placement([0, 1, 5, 6, 7, 8], [None, None, 4, 4, 4, None, None, None, None], 32) == 7


def test_mixed_ranks_arriving_in_turn_land_in_few_runs() -> None:
    cyclic = [(4, 8, 16, 32, 64)[i % 5] for i in range(16)]
    shuffled = cyclic[:]
    random.Random(1).shuffle(shuffled)
    for ranks in (cyclic, shuffled):
        device = _fill(ranks, 16)
        assert sorted(r for r in device if r is not None) == sorted(ranks)
        assert _runs(device) <= 9  # the first free slot each time: 16 runs (cyclic)
    assert _fill([16] * 5, 8) == [16, 16, 16, 16, 16, None, None, None]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.sampled_from([4, 8, 16, 32, 64])), max_size=20))
def test_exchanges_sort_the_occupied_slots_by_rank_and_then_stop(ranks: list[int | None]) -> None:
    device = list(ranks)
    occupied = [s for s, r in enumerate(device) if r is not None]
    swaps = 0
    while (swap := next_swap(device)) is not None:
        a, b = swap
        assert a != b and device[a] is not None and device[b] is not None and device[a] != device[b]
        device[a], device[b] = device[b], device[a]
        swaps += 1
        assert swaps < len(occupied)  # each exchange puts at least one slot right
    assert [s for s, r in enumerate(device) if r is not None] == occupied  # empty slots stay empty
    assert [device[s] for s in occupied] == sorted(r for r in ranks if r is not None)


def test_an_exchange_that_puts_two_slots_right_is_taken_first() -> None:
    assert next_swap([16, 8, 4, 8]) == (0, 2)  # 16 and 4 trade places: [4, 8, 16, 8]
    assert next_swap([4, None, 16, 8]) == (2, 3)
    assert next_swap([4, 8, None, 8, 16]) is None


class SwapModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(12, 10, bias=False)
        self.v_proj = nn.Linear(12, 6, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_proj(x), self.v_proj(x)


def _weights(ranks: dict[str, int], seed: int) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (12, 10), "v_proj": (12, 6)}
    modules = {
        name: LoraModuleWeights(torch.randn(r, shapes[name][0], generator=g), torch.randn(r, shapes[name][1], generator=g))
        for name, r in ranks.items()
    }
    return AdapterWeights(modules, max(ranks.values()), 0)


def test_swapped_slots_compute_what_the_adapters_computed_before() -> None:
    """Slot 0: rank 8 on q and v; slot 2: rank 2 on q only (v: none); slot 3 held a rank-16
    adapter that was evicted (stale rows). After exchanging 0 <-> 2 and 2 <-> 3 each adapter's
    output, through the torch backend, equals the per-token reference on its own weights."""
    torch.manual_seed(0)
    model = SwapModel()
    lora = LoraModel(model, max_loras=4, max_rank=16, dtype=torch.float32, device=torch.device("cpu"), backend=TorchLora(torch.float32, torch.device("cpu")))
    big, small, stale = _weights({"q_proj": 8, "v_proj": 8}, 1), _weights({"q_proj": 2}, 2), _weights({"q_proj": 16, "v_proj": 16}, 3)
    lora.write_slot(0, big)
    lora.write_slot(2, small)
    lora.write_slot(3, stale)
    for layer in lora:
        layer.views[3] = None  # evicted: the store forgets the slot, its rows stay
        layer.targets = targets_mask(layer.views)
    x = torch.randn(4, 12)

    def outputs(slot_of: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        runs = [(slot_of["big"], 2), (slot_of["small"], 2)]
        order = sorted(range(2), key=lambda i: runs[i][0])
        runs = [runs[i] for i in order]
        xs = torch.cat([x[2 * i : 2 * i + 2] for i in order])
        lora.begin_step(lora.backend.prepare(runs, lora.slot_ranks, 16, 4))
        q, v = model(xs)
        lora.end_step()
        out = {}
        for k, i in enumerate(order):
            out[("big", "small")[i]] = (q[2 * k : 2 * k + 2], v[2 * k : 2 * k + 2])
        return out

    def expected(w: AdapterWeights, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def one(name: str, base: nn.Linear) -> torch.Tensor:
            m = w.modules.get(name)
            y = base(rows).double()
            return y if m is None else y + (rows.double() @ m.a.double().t()) @ m.b.double()
        return one("q_proj", model.q_proj.base), one("v_proj", model.v_proj.base)

    for slot_of in ({"big": 0, "small": 2}, {"big": 2, "small": 0}, {"big": 3, "small": 0}):
        if slot_of == {"big": 2, "small": 0}:
            lora.swap_slots(0, 2)
        elif slot_of == {"big": 3, "small": 0}:
            lora.swap_slots(2, 3)
        got = outputs(slot_of)
        for name, w, rows in (("big", big, x[:2]), ("small", small, x[2:])):
            for g, e in zip(got[name], expected(w, rows)):
                torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)
    assert lora.slot_ranks[0] == 2 and lora.slot_ranks[3] == 8
    assert lora.layers["v_proj"].targets == 1 << 3 and lora.layers["q_proj"].targets == (1 << 0) | (1 << 3)
