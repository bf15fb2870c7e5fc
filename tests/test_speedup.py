"""The kerasmp_speedup fixture, as an outside suite uses it (pytester)."""

from __future__ import annotations

import pytest

SUITE = """
import time

def serial():
    time.sleep(0.02)
    return 1

def parallel():
    time.sleep(0.005)
    return 1

def test_fast(kerasmp_speedup):
    c = kerasmp_speedup(serial, parallel, workers=2, rounds=3, variant="sleep",
                        check=lambda a, b: None)
    assert len(c.serial_s) == len(c.parallel_s) == 3
    assert c.speedup > 1

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
            "*kerasmp: serial vs parallel*",
            "scenario*variant*workers*serial*parallel*speedup*efficiency*correct",
            "sleepy*sleep*2*ms*ms*x*%*equal",
            "sleepy*broken*2*-*-*-*-*DIFFERENT",
        ]
    )
    if not extra:
        result.stdout.fnmatch_lines(["*benchmark 'sleepy:sleep (test_fast)'*"])


def test_speedup_rejects_bad_rounds(pytester, run_pytest):
    pytester.makepyfile(
        """
        def test_bad(kerasmp_speedup):
            kerasmp_speedup(lambda: 1, lambda: 1, workers=0)
        """
    )
    result = run_pytest()
    result.stdout.fnmatch_lines(["*ValueError: rounds=5 and workers=0 must be positive*"])


GATED = """
import time

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
        (["gated:good:2"], 0, []),
        (["gated:bad:0.05,gated:good:1.5"], 0, []),
        (["gated:bad:1.0"], 1, ["*gated:bad:1: gated:bad measured 0.*x*below its floor*"]),
        (["gated:1.0"], 1, ["*gated:bad measured*below its floor*"]),
        (["gated:typo:1.0"], 1, ["*no comparison named 'gated:typo' was measured*(measured: gated:bad, gated:good)*"]),
    ],
    ids=["pass", "pass-two", "below", "whole-scenario", "unknown-name"],
)
def test_min_speedup_gate_fails_the_session_not_a_test(pytester, run_pytest, floors, ret, lines):
    pytester.makepyfile(test_gated=GATED)
    result = run_pytest("--benchmark-disable", *[f"--kerasmp-min-speedup={f}" for f in floors])
    result.assert_outcomes(passed=2)
    assert result.ret == ret
    if lines:
        result.stdout.fnmatch_lines(["*kerasmp: speedup below its floor: session failed*", *lines])


@pytest.mark.parametrize("value", ["gated", "gated:x", "gated:-1", ":2"])
def test_bad_floor_is_a_usage_error(pytester, run_pytest, value):
    pytester.makepyfile(test_gated=GATED)
    result = run_pytest(f"--kerasmp-min-speedup={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--kerasmp-min-speedup={value!r} is invalid: use SCENARIO*:FLOOR, e.g.*"])


def test_report_writes_the_run_record_and_plot(pytester, run_pytest, tmp_path):
    import json

    pytester.makepyfile(test_gated=GATED)
    out = tmp_path / "report"
    result = run_pytest("--benchmark-disable", "--kerasmp-gpus=1", f"--kerasmp-report={out}", "--kerasmp-min-speedup=gated:bad:1")
    assert result.ret == 1
    record = json.loads((out / "kerasmp-report.json").read_text())
    assert [c["variant"] for c in record["comparisons"]] == ["good", "bad"]
    good = record["comparisons"][0]
    assert good["speedup"] > 1 and len(good["serial_s"]) == 3 and good["workers"] == 2
    assert record["environment"]["tensorflow"] and record["environment"]["keras"]
    assert record["slots"][0]["describe"].startswith("slot0")
    assert "--kerasmp-gpus=1" in record["command"] and record["exit_status"] == 1
    assert record["gate_failures"] and "gated:bad" in record["gate_failures"][0]
    pytest.importorskip("matplotlib")
    assert record["plot"] == "kerasmp-speedup.png"
    assert (out / "kerasmp-speedup.png").read_bytes()[:4] == b"\x89PNG"
    result.stdout.fnmatch_lines([f"kerasmp: wrote {out}/kerasmp-report.json"])


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
    import json

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
    result.stdout.fnmatch_lines(["*kerasmp: speedup below its floor: session failed*", "*gated:bad measured 0.*x*"])
    result.stdout.fnmatch_lines(["*kerasmp: serial vs parallel*"])
    rows = {line.split()[1] for line in result.outlines if line.startswith("gated ")}
    assert rows == {"good", "bad", "extra", "broken"}
    result.stdout.fnmatch_lines(["gated*broken*1*-*-*-*-*DIFFERENT"])
    record = json.loads((out / "kerasmp-report.json").read_text())
    by_variant = {c["variant"]: c for c in record["comparisons"]}
    assert sorted(by_variant) == ["bad", "extra", "good"]
    assert by_variant["extra"]["extra"] == {"p50_ms": 1.5}
    assert len(by_variant["good"]["serial_s"]) == 3 and by_variant["good"]["speedup"] > 1
