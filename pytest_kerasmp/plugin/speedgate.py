"""The plugin's speed side: options, the gate at session end, the report, the summary, seeds.

``plugin.py`` calls into here from its hooks; this module holds no hooks of its own. The
statistics are in ``stats.py``, the verdicts in ``gate.py``, the files in ``report.py``.
"""

from __future__ import annotations

import json
import os
import secrets
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from pytest_kerasmp.errors import KerasMPWarning
from pytest_kerasmp.measure.comparison import summary_lines
from pytest_kerasmp.measure.gate import (
    compare_reports,
    comparison_lines,
    failing,
    gate,
    outcomes_by_name,
    parse_floors,
    verdict_line,
)
from pytest_kerasmp.measure.report import (
    NOISE_WARNING,
    REPORT_JSON,
    REPORT_MD,
    REPORT_PNG,
    disturbed,
    machine_noise,
    run_record,
    write_report,
)
from pytest_kerasmp.plugin.config import BAD_VALUE
from pytest_kerasmp.plugin.speedup import COMPARISONS_KEY, SPEED_KEY, SpeedSettings
from pytest_kerasmp.slots import seeding
from pytest_kerasmp.slots.devices import DeviceSlot

RESULT_KEY = pytest.StashKey[dict[str, Any]]()
NOISE_KEY = pytest.StashKey[dict[str, Any]]()
OLD_REPORT_KEY = pytest.StashKey[dict[str, Any]]()
#: The seed variables this process put into its environment (removed again at unconfigure).
_EXPORTED: list[str] = []
_picked = False  # this process picked the run's seed (--kerasmp-deterministic without one)

BUDGET_DEFAULT = 60.0
INCONCLUSIVE_WARNING = "kerasmp: inconclusive (--kerasmp-inconclusive=warn): {message}"
REPORT_OPTION, SEED_OPTION = "--kerasmp-report", "--kerasmp-seed"
REPORT_UNWRITABLE = "cannot make that directory or write into it ({error}); pass a directory you can write to"
SEED_HEADER = "kerasmp: {option}={seed}{det} (pass it again to repeat this run's seeds)"
SEED_PICKED_HEADER = (
    "kerasmp: {option}={seed}{det} (seed picked for this run, since --kerasmp-deterministic was "
    "given without one; pass both again to repeat this run's seeds)"
)
COMPARE_MISSING = "--kerasmp-compare={path!r}: cannot read the saved report ({error}); pass a kerasmp-report.json that an earlier run wrote"


def addoptions(group: Any) -> None:
    group.addoption(
        REPORT_OPTION, dest="kerasmp_report", metavar="DIR", default=None,
        help=f"Write the run record ({REPORT_JSON}: every comparison, including failed checks, "
        f"versions, slots, machine noise, seeds, the command), its Markdown summary ({REPORT_MD}, "
        f"also appended to $GITHUB_STEP_SUMMARY when set) and, with matplotlib, a plot ({REPORT_PNG}) into DIR",
    )
    group.addoption(
        "--kerasmp-min-speedup", dest="kerasmp_min_speedup", metavar="NAME:FLOOR", action="append", default=[],
        help="Fail the session (not a test) unless the 95%% interval of each comparison that NAME names "
        "(its name scenario[params]:variant, that name without [params], its scenario, or a glob) "
        "lies at or above FLOOR; a comparison never measured fails too. Repeat or comma-separate, "
        "e.g. augmentation:pool-2w:1.5",
    )
    group.addoption(
        "--kerasmp-budget", dest="kerasmp_budget", metavar="SECONDS", default=None,
        help="Most seconds of timed rounds for a comparison that a floor names: rounds continue past "
        "the test's own until its interval decides every floor or this is spent (one no floor names "
        f"stops at a 95%% interval or 15 s, or this if less). Default: {BUDGET_DEFAULT:g}",
    )
    group.addoption(
        "--kerasmp-inconclusive", dest="kerasmp_inconclusive", choices=("fail", "warn"), default="fail",
        help="What an interval that still straddles its floor does to the session. Default: fail",
    )
    group.addoption(
        "--kerasmp-compare", dest="kerasmp_compare", metavar="OLD.json", default=None,
        help="Show each comparison's change against a saved kerasmp-report.json, with both intervals",
    )
    group.addoption(
        "--kerasmp-compare-fail", dest="kerasmp_compare_fail", action="store_true", default=False,
        help="With --kerasmp-compare: fail the session on a significant regression (the new "
        "interval wholly below the old one). Default: off",
    )
    group.addoption(
        SEED_OPTION, dest="kerasmp_seed", metavar="N", default=None, type=_seed,
        help="Seed every process the plugin pins or starts (random, numpy, TensorFlow, Keras) with a "
        "seed derived from (N, slot, role); printed in the header and recorded in the report. Default: not seeded",
    )
    group.addoption(
        "--kerasmp-deterministic", dest="kerasmp_deterministic", action="store_true", default=False,
        help="Also turn on TensorFlow op determinism in those processes; without --kerasmp-seed, a seed "
        "is picked and printed in the header. Default: off",
    )


def _seed(text: str) -> int:
    import argparse

    try:
        return seeding.parse_seed(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            BAD_VALUE.format(name=SEED_OPTION, value=text, source="the command line", valid=seeding.SEED_VALID)
        ) from None


def export_seed(config: pytest.Config) -> None:
    """Put the seed options into this process's environment, which xdist workers and every
    child inherit; before any pinning, so pinned processes are seeded. A bad seed in the
    environment stops the session here; ``--kerasmp-deterministic`` without a seed picks one
    (the header prints it, so the run can be repeated)."""
    global _picked
    ns = config.known_args_namespace
    seed, det = getattr(ns, "kerasmp_seed", None), getattr(ns, "kerasmp_deterministic", False)
    if seed is None:  # the environment's, unless the command line gives one
        try:
            seed = seeding.base_seed()
        except ValueError:
            raise pytest.UsageError(BAD_VALUE.format(
                name=SEED_OPTION, value=os.environ[seeding.SEED_ENV], source=f"env {seeding.SEED_ENV}", valid=seeding.SEED_VALID,
            )) from None
        if seed is None and det:  # determinism without a seed would repeat nothing
            seed, _picked = secrets.randbelow(2**31), True
    for name, value in ((seeding.SEED_ENV, None if seed is None else str(seed)), (seeding.DETERMINISTIC_ENV, "1" if det else None)):
        if value is not None and name not in os.environ:
            os.environ[name] = value
            _EXPORTED.append(name)
        elif value is not None:
            os.environ[name] = value


def unexport_seed() -> None:
    global _picked
    _picked = False
    while _EXPORTED:
        os.environ.pop(_EXPORTED.pop(), None)


def mark_benchmark_users(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under --benchmark-only, a test that uses kerasmp_speedup is a benchmark too: it asks for
    pytest-benchmark's fixture only when its rounds start, so say so before pytest-benchmark
    skips every test without that fixture."""
    if not config.getoption("benchmark_only", False):
        return
    for item in items:
        names = getattr(item, "fixturenames", None)
        if names is not None and "kerasmp_speedup" in names and "benchmark" not in names:
            names.append("benchmark")


def header(config: pytest.Config) -> str | None:
    base = seeding.base_seed()
    if base is None:
        return None
    det = " --kerasmp-deterministic" if seeding.deterministic() else ""
    return (SEED_PICKED_HEADER if _picked else SEED_HEADER).format(option=SEED_OPTION, seed=base, det=det)


def configure(config: pytest.Config) -> None:
    try:
        floors = tuple(parse_floors(config.getoption("kerasmp_min_speedup") or []))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    raw = config.getoption("kerasmp_budget")
    try:
        budget = BUDGET_DEFAULT if raw is None else float(raw)
    except ValueError:
        budget = float("nan")
    if not budget >= 0:
        raise pytest.UsageError(f"--kerasmp-budget={raw!r} is invalid: use a number of seconds >= 0, e.g. 30")
    config.stash[SPEED_KEY] = SpeedSettings(floors=floors, budget_s=budget, verbose=config.option.verbose > 0)
    path = config.getoption("kerasmp_compare")
    if config.getoption("kerasmp_compare_fail") and not path:
        raise pytest.UsageError("--kerasmp-compare-fail needs --kerasmp-compare=OLD.json: the saved report to compare with")
    if path and not hasattr(config, "workerinput"):
        try:
            config.stash[OLD_REPORT_KEY] = json.loads(open(path, encoding="utf-8").read())
        except (OSError, ValueError) as exc:
            raise pytest.UsageError(COMPARE_MISSING.format(path=path, error=exc)) from None
    report = config.getoption("kerasmp_report")
    if not hasattr(config, "workerinput") and report:
        _check_writable(report)  # now, not after every test ran
        config.stash[NOISE_KEY] = {"before": machine_noise()}


def _check_writable(directory: str) -> None:
    """Make the report directory (as writing the report will) and write a file into it."""
    import tempfile
    from pathlib import Path

    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        valid = REPORT_UNWRITABLE.format(error=f"{type(exc).__name__}: {exc.strerror or exc}")
        raise pytest.UsageError(BAD_VALUE.format(name=REPORT_OPTION, value=directory, source="the command line", valid=valid)) from None


def _seeds(slots: int) -> dict[str, Any] | None:
    base = seeding.base_seed()
    if base is None:
        return None
    return {"base": base, "deterministic": seeding.deterministic(), "formula": seeding.SEED_FORMULA,
            "this_process": seeding.applied(), "derived": seeding.seed_table(base, slots)}


def finish(session: pytest.Session, slots: Sequence[DeviceSlot], workers: int, *, record_extra: Mapping[str, Any] | None = None) -> None:
    """Gate, compare and report at the end of the session (controller or single process);
    ``record_extra`` goes into the run record as it is (e.g. the placement table)."""
    config = session.config
    comparisons = config.stash.get(COMPARISONS_KEY, [])
    settings = config.stash.get(SPEED_KEY, SpeedSettings())
    verdicts = gate(comparisons, settings.floors)
    inconclusive_fails = config.getoption("kerasmp_inconclusive") != "warn"
    against: dict[str, Any] | None = None
    old = config.stash.get(OLD_REPORT_KEY, None)
    if old is not None:
        against = {"path": str(config.getoption("kerasmp_compare")), "rows": compare_reports(comparisons, old)}
    regressions = sum(r["regression"] for r in against["rows"]) if against and config.getoption("kerasmp_compare_fail") else 0
    failed = failing(verdicts, inconclusive_fails=inconclusive_fails)
    if (failed or regressions) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    line = verdict_line(verdicts, inconclusive_fails=inconclusive_fails, regressions=regressions)
    result: dict[str, Any] = {"verdicts": verdicts, "failed": failed, "line": line, "against": against, "files": [],
                              "show_line": bool(verdicts or against or comparisons)}
    if not inconclusive_fails:
        for v in verdicts:
            if v.outcome == "inconclusive":
                warnings.warn(KerasMPWarning(INCONCLUSIVE_WARNING.format(message=v.message)), stacklevel=2)
    noise = config.stash.get(NOISE_KEY, None)
    if noise is not None:
        noise["after"] = machine_noise()
        noise["disturbed"] = disturbed(noise["before"], noise["after"])
    directory = config.getoption("kerasmp_report")
    if directory:
        record = run_record(
            comparisons, slots, args=config.invocation_params.args, exit_status=int(session.exitstatus),
            verdicts=verdicts, verdict=line, noise=noise, seeds=_seeds(len(slots)), against=against, xdist_workers=workers,
        )
        record.update(record_extra or {})
        result["files"] = write_report(directory, record)
    config.stash[RESULT_KEY] = result


def terminal_summary(reporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    comparisons = config.stash.get(COMPARISONS_KEY, [])
    result = config.stash.get(RESULT_KEY, None)
    if result is None:
        return
    if comparisons:
        reporter.write_sep("-", "kerasmp: comparisons measured side by side (median of paired ratios, 95% interval)")
        for line in summary_lines(comparisons, outcomes_by_name(result["verdicts"])):
            reporter.write_line(line)
    if result["against"]:
        reporter.write_sep("-", f"kerasmp: against {result['against']['path']}")
        for line in comparison_lines(result["against"]["rows"]) or ["no comparison of that report was measured in this run"]:
            reporter.write_line(line, red="REGRESSION" in line)
    for path in result["files"]:
        reporter.write_line(f"kerasmp: wrote {path}")
    if config.getoption("kerasmp_report") and comparisons and not any(p.suffix == ".png" for p in result["files"]):
        reporter.write_line("kerasmp: no plot: install matplotlib (pip install 'pytest-kerasmp[plot]')")
    noise = config.stash.get(NOISE_KEY, None)
    if noise and noise.get("disturbed"):
        reporter.write_line(NOISE_WARNING.format(reasons="; ".join(noise["disturbed"])), yellow=True)
    verdicts = result["verdicts"]
    if result["failed"]:
        reporter.write_sep("=", "kerasmp: speed gate failed: session failed", red=True)
    elif verdicts:
        reporter.write_sep("-", "kerasmp: speed gate")
    for v in verdicts:
        reporter.write_line(f"{v.outcome}: {v.message}", red=v in result["failed"], yellow=v.outcome == "inconclusive")


def last_line(config: pytest.Config) -> None:
    """The gate's verdict, after pytest's own last line, so that it is the run's last word."""
    result = config.stash.get(RESULT_KEY, None)
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if result is None or reporter is None or not result["show_line"]:
        return
    failed = "FAILED" in result["line"]
    reporter.write_line(result["line"], red=failed, green=not failed and bool(result["verdicts"]), bold=True)
