"""The run record, its Markdown summary, the plot, and the comparison with a saved report."""

from __future__ import annotations

import json

import pytest

REPORTED = """
import time, pytest

def fast():
    time.sleep(0.001)

def slow():
    time.sleep(0.004)

@pytest.mark.parametrize("n", [1, 2])
def test_pool(kerasmp_speedup, n):
    kerasmp_speedup(slow, fast, workers=2, rounds=3, variant="pool")

def test_limit(kerasmp_speedup):
    kerasmp_speedup(fast, slow, workers=1, rounds=3, variant="limit", kind="fraction")

def test_start(kerasmp_speedup):
    kerasmp_speedup(fast, slow, workers=1, rounds=3, variant="start", kind="overhead")

def test_different(kerasmp_speedup):
    def check(a, b):
        assert False, "row 3 differs"
    kerasmp_speedup(slow, fast, workers=2, check=check, variant="wrong")

def test_raises(kerasmp_speedup):
    def broken():
        raise RuntimeError("worker died")
    kerasmp_speedup(slow, broken, workers=2, variant="crash")
"""


@pytest.fixture
def report(pytester, run_pytest, tmp_path, monkeypatch):
    """Runs REPORTED with a report and floors; returns (result, record, directory)."""
    pytester.makepyfile(test_rep=REPORTED)
    summary = tmp_path / "step-summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = tmp_path / "report"
    result = run_pytest("--benchmark-disable", f"--kerasmp-report={out}", "--kerasmp-min-speedup=rep:pool:1.5,rep:limit:0.9")
    return result, json.loads((out / "kerasmp-report.json").read_text()), out


def test_report_keeps_every_comparison_with_kind_interval_and_error(report):
    result, record, out = report
    result.assert_outcomes(passed=4, failed=2)
    by = {c["name"]: c for c in record["comparisons"]}
    assert list(by) == ["rep[1]:pool", "rep[2]:pool", "rep:limit", "rep:start", "rep:wrong", "rep:crash"]
    assert by["rep:wrong"]["status"] == "DIFFERENT" and by["rep:wrong"]["error"] == "check failed: AssertionError: row 3 differs"
    assert by["rep:crash"]["status"] == "raised" and by["rep:crash"]["error"] == "parallel raised RuntimeError: worker died"
    pool = by["rep[1]:pool"]
    assert pool["kind"] == "speedup" and pool["interval"]["low"] <= pool["ratio"] <= pool["interval"]["high"]
    assert pool["rounds"] == len(pool["serial_s"]) >= 6 and pool["interval"]["level"] >= 0.95
    assert by["rep:limit"]["words"] == {"baseline": "limit", "candidate": "measured", "ratio": "fraction of limit"}
    assert "% of the limit" in by["rep:limit"]["headline"]
    assert by["rep:start"]["overhead"] == pytest.approx(1 / by["rep:start"]["ratio"])
    assert "x the reference" in by["rep:start"]["headline"]
    outcomes = {v["name"]: v["outcome"] for v in record["gate"]["verdicts"]}
    assert outcomes == {"rep[1]:pool": "met", "rep[2]:pool": "met", "rep:limit": "missed"}
    assert record["gate"]["verdict"] == "kerasmp gate: FAILED (2 met, 1 missed)"
    noise = record["noise"]
    assert len(noise["before"]["loadavg"]) == 3 and "busy_processes" in noise["after"]
    assert isinstance(noise["disturbed"], list)


def test_summary_table_words_each_kind(report):
    result, _, _ = report
    result.stdout.fnmatch_lines([
        "name*workers*serial*parallel*speedup ?95% interval?*efficiency*rounds*check*gate",
        "rep?1?:pool*met",
        "name*workers*limit*measured*fraction of limit ?95% interval?*rounds*check*gate",
        "rep:limit*%*?*%, *%?*missed",
        "name*workers*reference*measured*overhead vs reference ?95% interval?*",
        "rep:start*x ?*, *?*",
    ])
    result.stdout.fnmatch_lines(["*rep:crash: parallel raised RuntimeError: worker died*"])


def test_markdown_summary_is_written_and_appended_to_the_step_summary(report, tmp_path):
    _, record, out = report
    md = (out / "kerasmp-report.md").read_text()
    assert md.startswith("## pytest-kerasmp: ") and "**kerasmp gate: FAILED (2 met, 1 missed)**" in md
    for needle in ("### speedup", "### fraction of limit", "### overhead vs reference", "| `rep[2]:pool` |",
                   "check failed: AssertionError: row 3 differs", "parallel raised RuntimeError: worker died",
                   "- missed: --kerasmp-min-speedup rep:limit:0.9", "### machine"):
        assert needle in md, needle
    assert (tmp_path / "step-summary.md").read_text() == "earlier step\n" + md


def test_plot_is_written(report):
    pytest.importorskip("matplotlib")
    _, record, out = report
    assert record["plot"] == "kerasmp-speedup.png"
    assert (out / "kerasmp-speedup.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_with_a_saved_report_shows_change_and_can_fail_on_regression(pytester, run_pytest, tmp_path, monkeypatch):
    """The saved run had a 4x speedup; this one has 1.25x: a significant regression."""
    pytester.makepyfile(test_cmp="""
import os, time
def test_c(kerasmp_speedup):
    ratio = float(os.environ["RATIO"])
    kerasmp_speedup(lambda: time.sleep(0.002 * ratio), lambda: time.sleep(0.002), workers=2, rounds=6, variant="v")
""")
    old, new = tmp_path / "old", tmp_path / "new"
    monkeypatch.setenv("RATIO", "4")
    assert run_pytest("--benchmark-disable", f"--kerasmp-report={old}").ret == 0
    monkeypatch.setenv("RATIO", "1.25")
    saved = str(old / "kerasmp-report.json")
    shown = run_pytest("--benchmark-disable", f"--kerasmp-compare={saved}")
    failed = run_pytest("--benchmark-disable", f"--kerasmp-compare={saved}", "--kerasmp-compare-fail", f"--kerasmp-report={new}")
    assert shown.ret == 0
    shown.stdout.fnmatch_lines([f"*kerasmp: against {saved}*", "cmp:v: [34].*x ?*? -> 1.2*x ?*? (-*%) SIGNIFICANT REGRESSION"])
    assert failed.ret == 1 and failed.outlines[-1] == "kerasmp gate: FAILED (1 significant regression(s))"
    rows = json.loads((new / "kerasmp-report.json").read_text())["against"]["rows"]
    assert [(r["name"], r["regression"]) for r in rows] == [("cmp:v", True)]


def test_compare_with_a_missing_report_is_a_usage_error(pytester, run_pytest, tmp_path):
    pytester.makepyfile(test_x="def test_x(): pass")
    result = run_pytest(f"--kerasmp-compare={tmp_path / 'nope.json'}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--kerasmp-compare=*nope.json*: cannot read the saved report*"])


def test_an_unwritable_report_directory_stops_the_session_before_any_test(pytester, run_pytest, tmp_path):
    from pytest_kerasmp.plugin.config import BAD_VALUE
    from pytest_kerasmp.plugin.speedgate import REPORT_UNWRITABLE

    ran = tmp_path / "ran"
    pytester.makepyfile(test_x=f"def test_x(): open({str(ran)!r}, 'w').close()")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    directory = str(blocker / "report")  # under a file: cannot be made
    result = run_pytest(f"--kerasmp-report={directory}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and not ran.exists()
    valid = REPORT_UNWRITABLE.format(error="NotADirectoryError: Not a directory")
    assert result.errlines[0] == "ERROR: " + BAD_VALUE.format(name="--kerasmp-report", value=directory, source="the command line", valid=valid)
    assert "Traceback" not in result.stderr.str()


def test_disturbed_names_each_reason_and_quiet_runs_have_none(monkeypatch):
    from pytest_kerasmp.measure.report import NOISE_WARNING, disturbed

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    quiet = {"loadavg": [0.2, 0.3, 0.3], "busy_processes": [], "cpu_governor": ["performance"]}
    assert disturbed(quiet, quiet) == []
    busy = {"loadavg": [1.8, 1.0, 0.5], "busy_processes": [{"pid": 9, "name": "python", "cpu_percent": 98}], "cpu_governor": ["powersave"]}
    reasons = disturbed(busy, quiet)
    assert reasons == ["load average 1.8 on 2 CPUs before the run", "busy processes before it: python (98%)",
                       "CPU governor powersave, not performance"]
    assert NOISE_WARNING.format(reasons="; ".join(reasons)).startswith("kerasmp: the machine was busy during this run (load average 1.8")
