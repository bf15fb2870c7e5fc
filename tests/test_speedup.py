"""The kerasmp_speedup fixture and the speed gate, as an outside suite uses them (pytester)."""

from __future__ import annotations

import json

import pytest

from known_ratio import SUITE as KNOWN_RATIO
from pytest_kerasmp.measure.gate import TOO_FEW_ROUNDS

SUITE = """
import time

def serial():
    time.sleep(0.05)
    return 1

def parallel():
    time.sleep(0.005)
    return 1

def test_fast(kerasmp_speedup):
    c = kerasmp_speedup(serial, parallel, workers=2, rounds=3, variant="sleep",
                        check=lambda a, b: None)
    assert len(c.serial_s) == len(c.parallel_s) >= 6  # adaptive: at least a 95% interval
    assert c.interval.low > 1.5  # 10x asleep: far above 1.5 even when a busy machine oversleeps

def test_wrong(kerasmp_speedup):
    def check(a, b):
        assert a != b, "serial and parallel disagree"
    kerasmp_speedup(serial, parallel, workers=2, rounds=1, variant="broken", check=check)
"""


@pytest.mark.parametrize("extra", [[], ["--benchmark-disable"]], ids=["benchmark", "disabled"])
def test_speedup_is_measured_and_summarised(pytester, run_pytest, extra):
    pytester.makepyfile(test_sleepy=SUITE)
    result = run_pytest(*extra)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*kerasmp: comparisons measured side by side*",
            "name*workers*serial*parallel*speedup ?95% interval?*efficiency*rounds*check*gate",
            "sleepy:sleep*2*ms*ms*x ?*, *?*%*equal*",
            "sleepy:broken*2*-*-*-*-*-*DIFFERENT*",
            "*sleepy:broken: check failed: AssertionError: serial and parallel disagree*",
        ]
    )
    assert "Benchmark fixture was not used" not in result.stdout.str()
    if not extra:  # one pytest-benchmark table for all comparisons, with every round
        result.stdout.fnmatch_lines(["*benchmark 'kerasmp': 1 tests*", "test_fast *"])
        assert result.stdout.str().count("benchmark '") == 1


def test_speedup_rejects_bad_arguments(pytester, run_pytest):
    pytester.makepyfile(
        """
        def test_bad(kerasmp_speedup):
            kerasmp_speedup(lambda: 1, lambda: 1, workers=0)

        def test_kind(kerasmp_speedup):
            kerasmp_speedup(lambda: 1, lambda: 1, workers=1, kind="ratio")
        """
    )
    result = run_pytest()
    result.stdout.fnmatch_lines(["*ValueError: rounds=5 and workers=0 must be positive*"])
    result.stdout.fnmatch_lines(["*ValueError: kind='ratio' is not one of speedup, fraction, overhead*"])


GATED = """
import time
import pytest

def fast():
    time.sleep(0.001)

def slow():
    time.sleep(0.01)

def test_quick(kerasmp_speedup):
    kerasmp_speedup(slow, fast, workers=2, rounds=3, variant="good")

def test_slower(kerasmp_speedup):
    kerasmp_speedup(fast, slow, workers=2, rounds=3, variant="bad")
"""


@pytest.mark.parametrize(
    ("floors", "ret", "lines"),
    [
        (["gated:good:2"], 0, ["kerasmp gate: passed (1 met)"]),
        (["gated:bad:0.05,gated:good:1.5"], 0, ["kerasmp gate: passed (2 met)"]),
        (["gated:bad:1.0"], 1, ["missed: --kerasmp-min-speedup gated:bad:1: gated:bad measured speedup 0.* ?0.*, 0.*? *floor 1x: missed*"]),
        (["gated:1.0"], 1, ["missed:*gated:bad measured*"]),
        (["gated:b*:1.0"], 1, ["missed:*gated:bad measured*"]),
        (["gated:typo:1.0"], 1, ["*no comparison named 'gated:typo' was measured*(measured: gated:bad, gated:good)*"]),
    ],
    ids=["pass", "pass-two", "below", "whole-scenario", "glob", "unknown-name"],
)
def test_min_speedup_gate_fails_the_session_not_a_test(pytester, run_pytest, floors, ret, lines):
    pytester.makepyfile(test_gated=GATED)
    result = run_pytest("--benchmark-disable", *[f"--kerasmp-min-speedup={f}" for f in floors])
    result.assert_outcomes(passed=2)
    assert result.ret == ret
    result.stdout.fnmatch_lines(lines)
    last = result.outlines[-1]
    assert last.startswith("kerasmp gate: FAILED" if ret else "kerasmp gate: passed"), last


@pytest.mark.parametrize(("value", "problem"), [
    ("gated", ""), ("gated:x", "the floor 'x' is not a number; "), ("gated:-1", "the floor '-1' must be above 0; "), (":2", ""),
])
def test_bad_floor_is_a_usage_error(pytester, run_pytest, value, problem):
    pytester.makepyfile(test_gated=GATED)
    result = run_pytest(f"--kerasmp-min-speedup={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--kerasmp-min-speedup={value!r} is invalid: {problem}use NAME:FLOOR*e.g.*"])


def test_known_ratios_are_decided_right_through_heavy_tailed_noise(pytester, run_pytest, tmp_path, monkeypatch):
    """Eight true 2x gated at 1.3 all met, eight true 1x gated at 1.25 all missed (a one-median
    gate passes about a third of the 1x ones: see the README)."""
    pytester.makepyfile(test_known=KNOWN_RATIO)
    monkeypatch.setenv("KNOWN_RATIO_COPIES", "8")
    monkeypatch.setenv("KNOWN_RATIO_BASE_MS", "2")
    # A fixed noise draw: a wrong verdict needs an extreme one (about 1 in 1,300 per comparison
    # in a simulation of this noise), and this test must not fail by chance.
    monkeypatch.setenv("KNOWN_RATIO_SEED", "12")
    out = tmp_path / "report"
    result = run_pytest("--benchmark-disable", "--kerasmp-min-speedup=known:two:1.3,known:one:1.25",
                        f"--kerasmp-report={out}", "--kerasmp-budget=5")
    record = json.loads((out / "kerasmp-report.json").read_text())
    outcomes = {v["name"]: v["outcome"] for v in record["gate"]["verdicts"]}
    assert outcomes == {**{f"known[{i}]:two": "met" for i in range(8)}, **{f"known[{i}]:one": "missed" for i in range(8)}}
    for c in record["comparisons"]:
        low, high = c["interval"]["low"], c["interval"]["high"]
        assert c["interval"]["level"] >= 0.95 and low <= high
        assert (low >= 1.3) if c["variant"] == "two" else (high < 1.25), c
    assert result.ret == 1 and result.outlines[-1] == "kerasmp gate: FAILED (8 met, 8 missed)"


INCONCLUSIVE = """
import time

def test_close(kerasmp_speedup):
    kerasmp_speedup(lambda: time.sleep(0.002), lambda: time.sleep(0.002), workers=1, rounds=3, variant="even")
"""


@pytest.mark.parametrize("mode", ["fail", "warn"])
def test_inconclusive_fails_by_default_and_says_what_to_do(pytester, run_pytest, mode):
    pytester.makepyfile(test_close=INCONCLUSIVE)
    result = run_pytest("--benchmark-disable", "--kerasmp-min-speedup=close:1.0", "--kerasmp-budget=0",
                        f"--kerasmp-inconclusive={mode}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*inconclusive: --kerasmp-min-speedup close:1: close:even measured speedup *x ?*, *? "
                                 f"*(3 rounds, 75% interval); floor 1x: {TOO_FEW_ROUNDS}"])
    if mode == "fail":
        assert result.ret == 1
        assert result.outlines[-1] == "kerasmp gate: FAILED (1 inconclusive)"
    else:
        assert result.ret == 0
        assert result.outlines[-1] == "kerasmp gate: passed (1 inconclusive)"
        result.stdout.fnmatch_lines(["*KerasMPWarning: kerasmp: inconclusive (--kerasmp-inconclusive=warn)*"])


def test_benchmark_skip_still_checks_once_untimed(pytester, run_pytest):
    pytester.makepyfile(test_sleepy=SUITE.replace(">= 6", "== 0").replace("assert c.interval.low > 1.5", "assert c.skipped"))
    result = run_pytest("--benchmark-skip", "--kerasmp-min-speedup=sleepy:sleep:1.5")
    result.assert_outcomes(passed=1, failed=1)  # the broken check still fails its test
    result.stdout.fnmatch_lines(["*skipped: --kerasmp-min-speedup sleepy:sleep:1.5: sleepy:sleep was skipped by "
                                 "--benchmark-skip (its check ran once, untimed: equal); nothing to gate*"])
    assert result.outlines[-1] == "kerasmp gate: passed (1 skipped)"


def test_verbose_prints_a_progress_line_per_look(pytester, run_pytest):
    pytester.makepyfile(test_gated=GATED)
    result = run_pytest("--benchmark-disable", "-v", "--kerasmp-min-speedup=gated:good:1.5", "-k", "quick")
    result.stdout.fnmatch_lines(["*kerasmp: gated:good: 3 rounds, *x ?*, *?*", "*kerasmp: gated:good: * rounds, *x ?*, *? (decided)*"])


def test_parametrized_comparisons_get_distinct_names(pytester, run_pytest, tmp_path):
    pytester.makepyfile(
        test_twice="""
        import time, pytest

        @pytest.mark.parametrize("ms", [1, 2])
        def test_p(kerasmp_speedup, ms):
            kerasmp_speedup(lambda: time.sleep(ms / 500), lambda: time.sleep(ms / 1000), workers=2, rounds=3, variant="v")

        def test_twice(kerasmp_speedup):
            for _ in range(2):
                kerasmp_speedup(lambda: time.sleep(0.002), lambda: time.sleep(0.001), workers=2, rounds=3, variant="same")
        """
    )
    out = tmp_path / "r"
    # exact (brackets taken literally) and glob (brackets escaped) each name one comparison
    result = run_pytest("--benchmark-disable", f"--kerasmp-report={out}", "--kerasmp-min-speedup=twice[2]:v:1.2,twice[[]1]:*:1.2")
    record = json.loads((out / "kerasmp-report.json").read_text())
    assert [c["name"] for c in record["comparisons"]] == ["twice[1]:v", "twice[2]:v", "twice:same", "twice:same#2"]
    assert [(v["floor"], v["name"]) for v in record["gate"]["verdicts"]] == [("twice[2]:v:1.2", "twice[2]:v"), ("twice[[]1]:*:1.2", "twice[1]:v")]
    assert result.ret == 0 and result.outlines[-1] == "kerasmp gate: passed (2 met)"


def test_scale_option_reaches_the_fixture_and_is_checked(pytester, run_pytest):
    pytester.makepyfile(
        """
        def test_scale(kerasmp_scale):
            assert kerasmp_scale == 0.25
        """
    )
    run_pytest("--kerasmp-scale=0.25").assert_outcomes(passed=1)
    result = run_pytest("--kerasmp-scale=0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--kerasmp-scale='0' is invalid: use a positive number*"])


def test_xdist_workers_send_their_comparisons_to_the_controller(pytester, run_pytest, tmp_path):
    """Each worker measures; the controller's summary, report and gate see every comparison."""
    pytester.makepyfile(
        test_gated=GATED
        + """
import numpy as np

def test_extra(kerasmp_speedup):
    c = kerasmp_speedup(slow, fast, workers=1, rounds=2, variant="extra")
    c.extra["p50_ms"] = np.float64(1.5)  # numpy figures must travel as numbers

def test_disagree(kerasmp_speedup):  # fails its check before any round is timed
    def check(a, b):
        assert False, "serial and parallel disagree"
    kerasmp_speedup(slow, fast, workers=1, rounds=2, variant="broken", check=check)
"""
    )
    out = tmp_path / "report"
    result = run_pytest("-n", "2", "--kerasmp-gpus=2", f"--kerasmp-report={out}", "--kerasmp-min-speedup=gated:bad:1")
    result.assert_outcomes(passed=3, failed=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*kerasmp: speed gate failed: session failed*", "missed:*gated:bad measured speedup 0.*x*"])
    rows = {line.split()[0] for line in result.outlines if line.startswith("gated:")}
    assert rows == {"gated:good", "gated:bad", "gated:extra", "gated:broken"}
    result.stdout.fnmatch_lines(["gated:broken*1*-*-*-*-*-*DIFFERENT*"])
    record = json.loads((out / "kerasmp-report.json").read_text())
    by_variant = {c["variant"]: c for c in record["comparisons"]}
    assert sorted(by_variant) == ["bad", "broken", "extra", "good"]
    assert by_variant["broken"]["status"] == "DIFFERENT" and "disagree" in by_variant["broken"]["error"]
    assert by_variant["extra"]["extra"] == {"p50_ms": 1.5}
    assert len(by_variant["good"]["serial_s"]) >= 3 and by_variant["good"]["interval"]["low"] > 1


def test_help_lists_the_speed_options_and_bad_budget_is_a_usage_error(pytester, run_pytest):
    result = run_pytest("--help")
    result.stdout.fnmatch_lines(["*--kerasmp-report=DIR*", "*--kerasmp-min-speedup=NAME:FLOOR*", "*--kerasmp-budget=SECONDS*",
                                 "*--kerasmp-inconclusive={fail,warn}*", "*--kerasmp-compare=OLD.json*",
                                 "*--kerasmp-compare-fail*", "*--kerasmp-seed=N*", "*--kerasmp-deterministic*"])
    pytester.makepyfile(test_x="def test_x(): pass")
    bad = run_pytest("--kerasmp-budget=soon")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--kerasmp-budget='soon' is invalid: use a number of seconds >= 0, e.g. 30*"])
    alone = run_pytest("--kerasmp-compare-fail")
    assert alone.ret == pytest.ExitCode.USAGE_ERROR
    alone.stderr.fnmatch_lines(["*--kerasmp-compare-fail needs --kerasmp-compare=OLD.json*"])


def test_benchmark_only_still_runs_comparisons(pytester, run_pytest):
    pytester.makepyfile(test_gated=GATED + "\ndef test_plain():\n    pass\n")
    result = run_pytest("--benchmark-only", "--kerasmp-min-speedup=gated:good:1.5")
    result.assert_outcomes(passed=2, skipped=1)  # the two comparisons run, the plain test is skipped
    assert result.ret == 0 and result.outlines[-1] == "kerasmp gate: passed (1 met)"


def test_warmup_false_times_every_call_and_refuses_a_check(pytester, run_pytest):
    pytester.makepyfile(
        """
        import pytest

        calls = {"serial": 0, "parallel": 0}

        def count(side):
            calls[side] += 1

        def test_no_warmup(kerasmp_speedup):
            c = kerasmp_speedup(lambda: count("serial"), lambda: count("parallel"), workers=1, rounds=3,
                                kind="overhead", warmup=False, budget_s=0.0)
            assert calls["serial"] == len(c.serial_s) and calls["parallel"] == len(c.parallel_s) == 3

        def test_warmup(kerasmp_speedup):
            calls.update(serial=0, parallel=0)
            c = kerasmp_speedup(lambda: count("serial"), lambda: count("parallel"), workers=1, rounds=3,
                                kind="overhead", budget_s=0.0)
            assert calls["parallel"] == len(c.parallel_s) + 1  # the untimed warm-up

        def test_refused(kerasmp_speedup):
            with pytest.raises(ValueError, match="warmup=False runs no untimed round for check"):
                kerasmp_speedup(lambda: 1, lambda: 1, workers=1, warmup=False, check=lambda a, b: None)
        """
    )
    run_pytest("-p", "no:xdist").assert_outcomes(passed=3)


RECORDED = """
from pytest_kerasmp import LoadPoint

def curve(server, rates, knee):
    return [LoadPoint.from_latencies(server, r, [0.001 * max(1, r / knee)] * 400, requests=400, failed=0, late=0,
                                     duration_s=400 / r).to_json() for r in rates]

def test_rates(kerasmp_speedup):
    extra = {"bound_ms": 5.0, "single_sample_ms": 0.5, "full_batch_rows_per_s": 9000.0,
             "rates": {"local": [4000.0, 4200.0], "other": [1000.0, 1100.0]},
             "brackets": {"local": [[4000.0, 4400.0], [4200.0, None]], "other": [[1000.0, 1200.0], [1100.0, 1250.0]]},
             "limited_by": {"local": ["latency", "points"], "other": ["latency", "latency"]},
             "load_curves": {"local": curve("local", [1000, 4000, 8000], 4000), "other": curve("other", [500, 1000, 2000], 1000)}}
    c = kerasmp_speedup.record([1 / 1000, 1 / 1100], [1 / 4000, 1 / 4200], workers=1, variant="m-local-vs-other", correct=True, extra=extra)
    assert 3.7 < c.speedup < 4.0 and c.stopped == "fixed"

def test_bad(kerasmp_speedup):
    kerasmp_speedup.record([1.0], [], workers=1)
"""


def test_recorded_rounds_join_the_table_the_floors_and_the_report_with_the_load_plot(pytester, run_pytest, tmp_path):
    pytest.importorskip("matplotlib")
    pytester.makepyfile(test_rec=RECORDED)
    report = tmp_path / "rep"
    result = run_pytest("--kerasmp-min-speedup=rec:m-local-vs-other:3", f"--kerasmp-report={report}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*ValueError: record needs paired positive rounds, got 1 and 0: [[]1.0[]], [[][]]*", "rec:m-local-vs-other*1*x ?*"])
    # Two recorded rounds reach a 50% interval: a floor on them says so rather than pass.
    result.stdout.fnmatch_lines(["inconclusive: *rec:m-local-vs-other measured speedup 3.91x [[]3.82, 4.00[]]*(2 rounds, 50% interval)*"])
    assert result.ret == 1
    text = (report / "kerasmp-report.md").read_text()
    assert "### served load: m" in text and "| local | 4100/s | [4000, 4400], [4200, -] | latency, points |" in text
    assert "![served load](kerasmp-load.png)" in text and (report / "kerasmp-load.png").stat().st_size > 10_000
