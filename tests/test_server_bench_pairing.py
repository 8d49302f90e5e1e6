"""server_bench's ratios: each mode over the mean of its own server's two base runs around it."""

from __future__ import annotations

import pytest

from benchmarks.server_bench import Measured, bracketed


def test_bracketed_puts_base_first_last_and_after_every_two_modes() -> None:
    assert bracketed(["identical", "uniform", "distinct", "heterogeneous"]) == [
        "base", "identical", "uniform", "base", "distinct", "heterogeneous", "base"]
    assert bracketed(["identical", "uniform", "distinct"]) == ["base", "identical", "uniform", "base", "distinct", "base"]
    assert bracketed([]) == ["base"]


def test_each_mode_is_taken_over_the_base_runs_that_bracket_it() -> None:
    m = Measured()
    # a machine that slows down across the round: base 100 -> 80 -> 60 tok/s
    seq = [("base", 100.0, 0.010), ("identical", 90.0, 0.011), ("uniform", 81.0, 0.012),
           ("base", 80.0, 0.012), ("distinct", 63.0, 0.016), ("base", 60.0, 0.014)]
    own = [("base", 50.0, 0.02), ("identical", 45.0, 0.025), ("base", 40.0, 0.02)]
    m.add_round({"r64": seq, "own": own}, engine=[(125.0, 0.008), (75.0, 0.010)], step=0.3, bandwidth=1e10)
    assert m.vs_base[("r64", "identical")] == [pytest.approx(90 / 90)]  # (100 + 80) / 2
    assert m.vs_base[("r64", "uniform")] == [pytest.approx(81 / 90)]
    assert m.vs_base[("r64", "distinct")] == [pytest.approx(63 / 70)]  # (80 + 60) / 2
    assert m.cost_vs_base[("r64", "distinct")] == [pytest.approx(0.013 / 0.016)]
    assert m.vs_base[("own", "identical")] == [pytest.approx(45 / 45)]  # its own server's base, not r64's
    # each engine run against the server's base run next to it: the first (100) and the last (60)
    assert m.vs_base[("r64", "engine")] == [pytest.approx((100 / 125 + 60 / 75) / 2)]
    assert m.cost_vs_base[("r64", "engine")] == [pytest.approx((0.008 / 0.010 + 0.010 / 0.014) / 2)]
    assert m.tps[("engine", "base")] == [pytest.approx(100.0)]
    assert m.tps[("r64", "base")] == [pytest.approx(80.0)]
    assert m.tps[("r64", "distinct")] == [63.0]
