"""Baseline against candidate, measured side by side in one run: the harness's unit of speed.

``measure`` runs the two sides once untimed (the warm-up, whose results ``check`` compares),
then in paired, alternating rounds until the ratio's interval decides against every floor
that names the comparison (or, with no floor, until it reaches 95%), or until its time budget
is spent. Each comparison is recorded, whatever happens: a failed check, a side that raised,
rounds skipped by ``--benchmark-skip``. The candidate's rounds are pytest-benchmark's own
measurement (all comparisons in one group, ``kerasmp``), with the baseline's rounds, the ratio
and its interval in ``extra_info``. Under pytest-xdist each worker sends its comparisons to
the controller on the test's report.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from pytest_kerasmp.measure.comparison import KINDS, Comparison, seconds_text, summary_lines  # noqa: F401  (re-exported)
from pytest_kerasmp.measure.gate import Floor, floors_for
from pytest_kerasmp.measure.stats import decide, next_look

COMPARISONS_KEY = pytest.StashKey[list[Comparison]]()
BENCHMARK_GROUP = "kerasmp"


@dataclasses.dataclass(frozen=True)
class SpeedSettings:
    """How comparisons measure: floors (for adaptive rounds), budget, verbosity."""

    floors: tuple[Floor, ...] = ()
    #: Seconds of timed rounds for a comparison that a floor names.
    budget_s: float = 60.0
    #: ... and for one that no floor names (it stops at 95% anyway): the smaller of the two.
    ungated_budget_s: float = 15.0
    max_rounds: int = 200
    verbose: bool = False


SPEED_KEY = pytest.StashKey[SpeedSettings]()


def scenario_name(item: pytest.Item) -> str:
    """``test_augmentation.py`` -> ``augmentation``; the first part of a comparison's name."""
    return item.path.stem.removeprefix("test_")


def _params(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    return callspec.id if callspec is not None else ""


def _error_text(side: str, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{side} raised {type(exc).__name__}: {first}"[:300]


def _progress(config: pytest.Config, line: str) -> None:
    """A line on the terminal now, even while the test's output is captured."""
    reporter = config.pluginmanager.getplugin("terminalreporter")
    capman = config.pluginmanager.getplugin("capturemanager")
    if reporter is None:
        return
    if capman is not None:
        with capman.global_and_fixture_disabled():
            reporter.write_line(line)
    else:
        reporter.write_line(line)


def _should_stop(c: Comparison, settings: SpeedSettings, elapsed: float) -> str:
    """Why to stop now ("" to go on to the next look)."""
    iv = c.interval
    floors = floors_for(c, settings.floors)
    if iv.complete and all(decide(iv, f) != "inconclusive" for f in floors):
        return "decided" if floors else "no floor"
    n = iv.rounds
    if n >= settings.max_rounds:
        return "max rounds"
    per_round = elapsed / n
    budget = settings.budget_s if floors else min(settings.budget_s, settings.ungated_budget_s)
    if elapsed + (next_look(n) - n) * per_round > budget:
        return "budget"
    return ""


def measure(
    item: pytest.Item,
    benchmark: Any,
    serial: Callable[[], Any],
    parallel: Callable[[], Any],
    *,
    workers: int,
    rounds: int = 5,
    variant: str = "",
    check: Callable[[Any, Any], Any] | None = None,
    kind: str = "speedup",
    budget_s: float | None = None,
    warmup: bool = True,
) -> Comparison:
    """Time ``serial`` (the baseline) and ``parallel`` (the candidate) in alternating rounds.

    ``rounds`` rounds are always run; more follow until the interval decides (see module
    docstring) or ``budget_s`` is spent (default: ``--kerasmp-budget`` when a floor names the
    comparison, else at most 15 s). ``check(serial_result,
    parallel_result)`` runs on the warm-up results and should raise when they disagree.
    ``kind`` is "speedup", "fraction" (of a limit) or "overhead" (against a reference).
    ``benchmark`` is pytest-benchmark's fixture or a function that returns it; None means
    ``--benchmark-skip``: the check runs once, untimed, and the comparison is marked skipped.
    ``warmup=False`` skips the untimed runs, for sides that each start something anew (a
    pool, a process) and so have nothing to warm; it needs ``check=None``.
    """
    if rounds < 1 or workers < 1:
        raise ValueError(f"rounds={rounds} and workers={workers} must be positive")
    if not warmup and check is not None:
        raise ValueError("warmup=False runs no untimed round for check to compare: pass check=None, or keep the warm-up")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    settings = item.config.stash.get(SPEED_KEY, SpeedSettings())
    if budget_s is not None:
        settings = dataclasses.replace(settings, budget_s=budget_s, ungated_budget_s=budget_s)
    comparison = _register(item, Comparison(
        scenario=scenario_name(item), variant=variant, workers=workers, serial_s=[], parallel_s=[],
        nodeid=item.nodeid, kind=kind, params=_params(item), requested=rounds,
    ))
    sides = _Sides(comparison, serial, parallel)
    sides.warm_up_and_check(check, warmup)
    if benchmark is None:
        comparison.skipped = "--benchmark-skip"
        return comparison
    if not hasattr(benchmark, "pedantic"):  # a getter: the fixture is made only now
        benchmark = benchmark()
    started = time.perf_counter()
    recorded = _first_rounds(item, benchmark, sides, rounds)
    while True:
        comparison.stopped = _should_stop(comparison, settings, time.perf_counter() - started)
        if settings.verbose:
            _progress(item.config, f"kerasmp: {comparison.name}: {len(comparison.parallel_s)} rounds, "
                                   f"{comparison.figure_text()}" + (f" ({comparison.stopped})" if comparison.stopped else ""))
        if comparison.stopped:
            break
        for _ in range(next_look(len(comparison.parallel_s)) - len(comparison.parallel_s)):
            sides.round()
            if recorded is not None:
                recorded.update(comparison.parallel_s[-1])
    if recorded is not None:
        benchmark.extra_info.update(
            {k: v for k, v in comparison.to_json().items() if k not in ("parallel_s", "nodeid", "extra")}
        )
    return comparison


def record(
    item: pytest.Item,
    baseline_s: Sequence[float],
    candidate_s: Sequence[float],
    *,
    workers: int,
    variant: str = "",
    kind: str = "speedup",
    correct: bool | None = None,
    extra: dict[str, Any] | None = None,
) -> Comparison:
    """A comparison whose paired rounds the test measured itself, as seconds per unit of work
    on each side (e.g. one over the highest rate each server held under a latency bound): it
    joins the report, the table and the floors like a timed one. Its rounds are fixed."""
    baseline, candidate = [float(x) for x in baseline_s], [float(x) for x in candidate_s]
    if len(baseline) != len(candidate) or not baseline or not all(math.isfinite(x) and x > 0 for x in baseline + candidate):
        raise ValueError(f"record needs paired positive rounds, got {len(baseline)} and {len(candidate)}: {baseline}, {candidate}")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    return _register(item, Comparison(
        scenario=scenario_name(item), variant=variant, workers=workers, serial_s=baseline,
        parallel_s=candidate, correct=correct, nodeid=item.nodeid, extra=dict(extra or {}),
        kind=kind, params=_params(item), stopped="fixed", requested=len(baseline_s),
    ))


class Speedup:
    """What the ``kerasmp_speedup`` fixture gives a test: call it to time two sides
    (:func:`measure`), or ``.record(...)`` rounds it measured itself (:func:`record`)."""

    def __init__(self, item: pytest.Item, benchmark: Any) -> None:
        self.item, self.benchmark = item, benchmark

    def __call__(self, serial: Callable[[], Any], parallel: Callable[[], Any], **options: Any) -> Comparison:
        return measure(self.item, self.benchmark, serial, parallel, **options)

    def record(self, baseline_s: Sequence[float], candidate_s: Sequence[float], **options: Any) -> Comparison:
        return record(self.item, baseline_s, candidate_s, **options)


def _register(item: pytest.Item, comparison: Comparison) -> Comparison:
    """Record ``comparison`` for the session, its name made unique (``#2`` for a second one)."""
    made = item.config.stash.setdefault(COMPARISONS_KEY, [])
    taken = {c.name for c in made}
    n = 1
    while comparison.name in taken:
        n += 1
        comparison.suffix = f"#{n}"
    made.append(comparison)
    return comparison


class _Sides:
    """The two sides of one comparison: run untimed, or timed into its rounds; a side that
    raises leaves its error on the comparison."""

    def __init__(self, comparison: Comparison, serial: Callable[[], Any], parallel: Callable[[], Any]) -> None:
        self.comparison, self.serial, self.parallel = comparison, serial, parallel

    def run(self, side: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except BaseException as exc:
            self.comparison.error = _error_text(side, exc)
            raise

    def warm_up_and_check(self, check: Callable[[Any, Any], Any] | None, warmup: bool) -> None:
        """One untimed run of each side (the warm-up), whose results ``check`` compares."""
        serial_result = self.run("serial", self.serial) if warmup else None
        parallel_result = self.run("parallel", self.parallel) if warmup else None
        if check is None:
            return
        try:
            check(serial_result, parallel_result)
        except BaseException as exc:
            self.comparison.correct = False
            self.comparison.error = _error_text("check", exc).replace("check raised", "check failed:", 1)
            raise
        self.comparison.correct = True

    def timed_serial(self) -> None:
        t0 = time.perf_counter()
        self.run("serial", self.serial)
        self.comparison.serial_s.append(time.perf_counter() - t0)

    def timed_parallel(self) -> None:
        t0 = time.perf_counter()
        self.run("parallel", self.parallel)
        self.comparison.parallel_s.append(time.perf_counter() - t0)

    def round(self) -> None:
        self.timed_serial()
        self.timed_parallel()


#: The pytest-benchmark fixtures that measured already in a test (by id): one measures once.
_USED_KEY = pytest.StashKey[set[int]]()


def _first_rounds(item: pytest.Item, benchmark: Any, sides: _Sides, rounds: int) -> Any:
    """The first ``rounds`` rounds, through pytest-benchmark when its fixture can still
    measure in this test (the candidate's rounds are then its measurement, in one group);
    returns its round statistics, to which later rounds are added, or None when our own
    timing alone counts (disabled, e.g. under xdist, or a second comparison in one test). A
    test that calls pytest-benchmark's fixture itself measures with it instead: it measures
    once per test, and refuses a second use."""
    used = item.stash.setdefault(_USED_KEY, set())
    fresh = id(benchmark) not in used
    used.add(id(benchmark))
    if fresh and not getattr(benchmark, "disabled", True):
        benchmark.group = BENCHMARK_GROUP
        benchmark.pedantic(sides.timed_parallel, setup=sides.timed_serial, rounds=rounds, iterations=1)
        # pytest-benchmark has no public way to add rounds after pedantic() returns, and the
        # rounds' count is not known up front (they stop when the interval decides): the
        # later rounds go into its statistics through the method its own runner calls.
        return benchmark.stats.stats
    for _ in range(rounds - 1 if fresh else rounds):
        sides.round()
    if fresh:
        benchmark.pedantic(sides.timed_parallel, setup=sides.timed_serial)  # disabled: one more round
    return None
