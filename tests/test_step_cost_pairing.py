"""step_cost's pairing: each step with LoRA against the two steps without it around it."""

from __future__ import annotations

import pytest

from benchmarks.step_cost import Switch, paired_costs
from loraplex.lora.lora_backend import LoraBatch


def test_each_lora_step_is_taken_over_the_steps_without_lora_on_either_side() -> None:
    # a machine that slows across the run: the steps without LoRA go 1.0 -> 1.2 -> 1.4 s
    steps = [(False, 1.0), (True, 1.3), (False, 1.2), (True, 1.5), (False, 1.4)]
    costs, bases = paired_costs(steps)
    assert costs == [pytest.approx(0.2), pytest.approx(0.2)]  # 1.3 - (1.0 + 1.2) / 2, 1.5 - (1.2 + 1.4) / 2
    assert bases == [pytest.approx(1.1), pytest.approx(1.3)]


def test_a_lora_step_without_a_step_without_lora_on_both_sides_is_left_out() -> None:
    steps = [(True, 5.0), (False, 1.0), (True, 1.3), (True, 9.0), (False, 1.2)]
    assert paired_costs(steps) == ([], [])


class _Backend:
    name = "stand-in"

    def prepare(self, token_runs: list[tuple[int, int]], slot_ranks: list[int], max_rank: int, num_tokens: int) -> LoraBatch:
        return LoraBatch(num_tokens=num_tokens, slots=1)

    def shrink(self, *args: object) -> None: ...

    def shrink_multi(self, *args: object) -> list[None]:
        return []

    def expand(self, *args: object) -> None: ...


def test_switched_off_the_step_gets_an_empty_batch() -> None:
    backend = _Backend()
    switch = Switch(backend)
    assert switch.prepare([(0, 3)], [16], 64, 3).slots == 1
    switch.on = False
    off = switch.prepare([(0, 3)], [16], 64, 3)
    assert (off.num_tokens, off.segments, off.slots) == (3, [], 0)
    assert switch.expand == backend.expand  # the backend's own method, bound once
