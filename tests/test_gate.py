"""Unit tests of the pure pieces: intervals, verdicts, floors, wording, result comparison."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pytest_kerasmp.measure.comparison import Comparison, seconds_text, summary_lines
from pytest_kerasmp.measure.gate import INCONCLUSIVE_ADVICE, Floor, gate, outcomes_by_name, parse_floors, verdict_line
from pytest_kerasmp.measure.results import assert_same, first_difference
from pytest_kerasmp.measure.stats import decide, median_interval, next_look, ratio_interval


def test_median_interval_reaches_95_percent_from_six_values_and_reports_less_below():
    low, high, coverage = median_interval([5, 1, 4, 2, 3])
    assert (low, high) == (1, 5) and coverage == pytest.approx(1 - 2 / 32)
    low, high, coverage = median_interval(list(range(20)))
    assert coverage >= 0.95 and 0 < low < 9.5 < high < 19  # narrower than min..max with more values
    assert median_interval([1, 2, 3, 4, 5, 6])[2] == pytest.approx(1 - 2 / 64)


def test_median_interval_covers_the_true_median_of_heavy_tailed_ratios():
    """Coverage holds whatever the distribution: 400 simulated comparisons of 12 rounds."""
    rng = random.Random(1)
    covered = 0
    for _ in range(400):
        ratios = [2.0 * rng.lognormvariate(0, 0.4) * (1 + rng.paretovariate(1.2) if rng.random() < 0.15 else 1) for _ in range(12)]
        low, high, _ = median_interval(ratios)
        true_median = 2.0 * 1.0  # median of the noise factor is about 1 (lognormal) before spikes
        covered += low <= true_median * 1.08 and high >= true_median * 0.92
    assert covered / 400 >= 0.9


def test_ratio_interval_pairs_rounds_and_decides_three_ways():
    iv = ratio_interval([2.0, 2.1, 1.9, 2.0, 2.2, 2.0], [1.0] * 6)
    assert iv.rounds == 6 and iv.complete and iv.low == 1.9 and iv.high == 2.2
    assert decide(iv, 1.5) == "met" and decide(iv, 2.5) == "missed" and decide(iv, 2.0) == "inconclusive"
    short = ratio_interval([2.0, 2.0, 2.0], [1.0] * 3)
    assert not short.complete and decide(short, 1.0) == "inconclusive"  # 75% is not enough
    assert "75% only" in short.text()
    with pytest.raises(ValueError, match="paired"):
        ratio_interval([1.0], [])


def test_next_look_grows_geometrically():
    looks = [3]
    while looks[-1] < 100:
        looks.append(next_look(looks[-1]))
    assert looks[:4] == [3, 6, 9, 13] and len(looks) < 12


def comparison(name="s", variant="v", ratios=(2.0,) * 6, **kw) -> Comparison:
    return Comparison(scenario=name, variant=variant, workers=2, serial_s=list(ratios), parallel_s=[1.0] * len(ratios), **kw)


def test_floors_match_name_name_without_params_scenario_and_glob():
    c = comparison(params="cnn-2")
    assert c.name == "s[cnn-2]:v"
    for pattern in ("s[cnn-2]:v", "s:v", "s", "s*:v", "s[[]cnn*"):
        assert Floor(pattern, 1).matches(c), pattern
    for pattern in ("s:w", "t", "s[cnn-3]:v", "s[cnn]*"):
        assert not Floor(pattern, 1).matches(c), pattern
    assert parse_floors(["s[cnn-2]:v:1.5, s:2"]) == [Floor("s[cnn-2]:v", 1.5), Floor("s", 2.0)]


def test_gate_verdicts_and_the_last_line():
    met, missed = comparison(variant="a"), comparison(variant="b", ratios=(1.0,) * 6)
    wobbly = comparison(variant="c", ratios=(0.8, 1.3, 0.9, 1.2, 1.0, 1.1))
    broken = comparison(variant="d", ratios=(), correct=False, error="check failed: AssertionError: x")
    verdicts = gate([met, missed, wobbly, broken], parse_floors(["s:a:1.5,s:b:1.5,s:c:1.05,s:d:1,s:typo:1"]))
    assert [(v.name, v.outcome) for v in verdicts] == [
        ("s:a", "met"), ("s:b", "missed"), ("s:c", "inconclusive"), ("s:d", "unmeasured"), ("", "unmeasured")]
    assert "check failed: AssertionError: x" in verdicts[3].message
    assert verdicts[2].message.endswith("1.05x [0.80, 1.30], efficiency 52% (6 rounds); floor 1.05x: " + INCONCLUSIVE_ADVICE)
    assert outcomes_by_name(verdicts) == {"s:a": "met", "s:b": "missed", "s:c": "inconclusive", "s:d": "unmeasured"}
    assert verdict_line(verdicts) == "kerasmp gate: FAILED (1 met, 1 missed, 1 inconclusive, 2 unmeasured)"
    assert verdict_line(verdicts[:1]) == "kerasmp gate: passed (1 met)"
    assert verdict_line(verdicts[2:3], inconclusive_fails=False) == "kerasmp gate: passed (1 inconclusive)"


def test_each_kind_is_worded_in_its_own_terms():
    assert comparison(ratios=(2.0,) * 6).headline().startswith("speedup 2.00x [2.00, 2.00], efficiency 100%")
    assert comparison(ratios=(0.45,) * 6, kind="fraction").headline().startswith("45% of the limit [45%, 45%]")
    assert comparison(ratios=(0.25,) * 6, kind="overhead").headline().startswith("4.00x the reference [4.00, 4.00]")
    lines = summary_lines([comparison(kind="fraction"), comparison(kind="overhead", variant="o")])
    assert lines[0].split()[2:4] == ["limit", "measured"] and any(line.split()[2:4] == ["reference", "measured"] for line in lines)


@pytest.mark.parametrize(("s", "text"), [(0.0004123, "412 µs"), (0.0123, "12.3 ms"), (0.00099, "990 µs"), (0.25, "250 ms"), (2.345, "2.35 s")])
def test_sub_millisecond_times_print_properly(s, text):
    assert seconds_text(s) == text


def test_first_difference_names_the_array_and_element():
    a = {"weights": [np.zeros((2, 3)), np.ones(4)], "loss": 0.5}
    b = {"weights": [np.zeros((2, 3)), np.array([1.0, 1.0, 1.5, 1.0])], "loss": 0.5}
    assert first_difference(a, a) is None
    assert first_difference(a, b) == "result['weights'][1] differs at index (2,): 1.0 vs 1.5 (|diff| 0.5); 1 of 4 elements differ"
    assert first_difference(a, b, atol=0.6) is None
    assert "shape (2, 3) vs (3, 2)" in first_difference(np.zeros((2, 3)), np.zeros((3, 2)))
    assert first_difference([1, 2], [1, 2, 3]).startswith("result: shape (2,) vs (3,)")
    with pytest.raises(AssertionError, match=r"\['weights'\]\[1\] differs at index \(2,\)"):
        assert_same(a, b)


def test_a_gated_comparison_gets_the_budget_an_ungated_one_stops_sooner():
    from pytest_kerasmp.plugin.speedup import SpeedSettings, _should_stop

    c = comparison(ratios=(2.0, 1.9, 2.1))  # 3 rounds: only a 75% interval
    gated = SpeedSettings(floors=(Floor("s", 1.5),), budget_s=60)
    assert _should_stop(c, gated, elapsed=10) == ""  # 6 rounds would take about 20 s: within 60
    assert _should_stop(c, SpeedSettings(budget_s=60), elapsed=10) == "budget"  # ungated: 15 s
    assert _should_stop(c, SpeedSettings(floors=(Floor("s", 1.5),), budget_s=15), elapsed=10) == "budget"
    six = comparison(ratios=(2.0, 1.9, 2.1, 2.0, 2.2, 1.95))
    assert _should_stop(six, gated, elapsed=1) == "decided" and _should_stop(six, SpeedSettings(), elapsed=1) == "no floor"


def test_a_competed_comparison_is_starred_and_kept_in_json():
    c = comparison(competed="gw1 on slot0")
    assert "2.00x [2.00, 2.00]*" in summary_lines([c])[1]
    assert Comparison.from_json(c.to_json()).competed == "gw1 on slot0"
