"""Slot placement: adapters of one rank end up in adjacent slots (one batched matmul at decode)."""

from __future__ import annotations

import itertools
import random

from loraplex.lora.slots import placement


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
