"""Serial against parallel, measured side by side in one run: the harness's unit of speed.

``measure`` runs a serial and a parallel callable in alternating rounds (serial, then
parallel, round after round, so that a noisy machine slows both alike), checks once that
they agree, and records a :class:`Comparison`. The parallel rounds are pytest-benchmark's
own measurement (so ``--benchmark-save`` and ``--benchmark-compare`` work on them); the
serial medians and the speedup ride along in ``extra_info``. The session collects every
comparison for the terminal summary, the report and the ``--kerasmp-min-speedup`` gate;
under pytest-xdist each worker sends its comparisons to the controller on the test's report.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest

COMPARISONS_KEY = pytest.StashKey[list["Comparison"]]()


@dataclasses.dataclass
class Comparison:
    """One serial/parallel pair measured in one run. Times in seconds, one per round."""

    scenario: str
    variant: str
    workers: int
    serial_s: list[float]
    parallel_s: list[float]
    correct: bool | None = None  # None: no check was given
    nodeid: str = ""
    #: Further figures a test measured alongside (latency, memory, ...); go into the report.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Who competed for its slots while it was measured ("" if no one); set by the plugin (issue 10).
    competed: str = ""

    @property
    def serial_median_s(self) -> float:
        return statistics.median(self.serial_s)

    @property
    def parallel_median_s(self) -> float:
        return statistics.median(self.parallel_s)

    @property
    def speedup(self) -> float:
        """Serial median over parallel median (> 1: the parallel pattern is faster)."""
        return self.serial_median_s / self.parallel_median_s

    @property
    def efficiency(self) -> float:
        """Speedup per worker (1.0: perfect scaling)."""
        return self.speedup / self.workers

    @property
    def key(self) -> str:
        return f"{self.scenario}:{self.variant}" if self.variant else self.scenario

    def to_json(self) -> dict[str, Any]:
        """Every figure, in plain JSON types (numpy scalars in ``extra`` become numbers); the
        medians and ratios are None when no round was timed (the check failed first)."""
        timed = bool(self.serial_s and self.parallel_s)
        data = {
            "scenario": self.scenario,
            "variant": self.variant,
            "nodeid": self.nodeid,
            "workers": self.workers,
            "rounds": len(self.parallel_s),
            "serial_s": self.serial_s,
            "parallel_s": self.parallel_s,
            "serial_median_s": self.serial_median_s if timed else None,
            "parallel_median_s": self.parallel_median_s if timed else None,
            "speedup": self.speedup if timed else None,
            "efficiency": self.efficiency if timed else None,
            "correct": self.correct,
            "extra": self.extra,
            "competed": self.competed,
        }
        return json.loads(json.dumps(data, default=_plain))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Comparison:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars and 0-d arrays
    return item() if callable(item) else str(value)


def scenario_name(item: pytest.Item) -> str:
    """``test_augmentation.py`` -> ``augmentation``; what the summary and gate call it."""
    return item.path.stem.removeprefix("test_")


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
) -> Comparison:
    """Time ``serial`` and ``parallel`` in alternating rounds after one untimed warm-up each.

    ``check(serial_result, parallel_result)`` runs on the warm-up results and should raise
    (e.g. an ``assert``) when they disagree; the comparison is recorded either way.
    """
    if rounds < 1 or workers < 1:
        raise ValueError(f"rounds={rounds} and workers={workers} must be positive")
    comparison = Comparison(
        scenario=scenario_name(item), variant=variant, workers=workers,
        serial_s=[], parallel_s=[], nodeid=item.nodeid,
    )
    item.config.stash.setdefault(COMPARISONS_KEY, []).append(comparison)
    serial_result, parallel_result = serial(), parallel()
    if check is not None:
        comparison.correct = False
        check(serial_result, parallel_result)
        comparison.correct = True
    del serial_result, parallel_result

    def timed_serial() -> None:
        t0 = time.perf_counter()
        serial()
        comparison.serial_s.append(time.perf_counter() - t0)

    def timed_parallel() -> None:
        t0 = time.perf_counter()
        parallel()
        comparison.parallel_s.append(time.perf_counter() - t0)

    if getattr(benchmark, "disabled", True):  # e.g. under xdist: our own timing still counts
        for _ in range(rounds - 1):
            timed_serial()
            timed_parallel()
        benchmark.pedantic(timed_parallel, setup=timed_serial)  # disabled: one more round
    else:
        benchmark.group = f"{comparison.key} ({item.name})"
        benchmark.pedantic(timed_parallel, setup=timed_serial, rounds=rounds, iterations=1)
        benchmark.extra_info.update(
            {k: v for k, v in comparison.to_json().items() if k not in ("parallel_s", "nodeid")}
        )
    return comparison


def summary_lines(comparisons: list[Comparison]) -> list[str]:
    """The terminal summary: one row per scenario and variant."""
    header = ("scenario", "variant", "workers", "serial", "parallel", "speedup", "efficiency", "correct")
    rows = [header]
    for c in comparisons:
        if not c.serial_s or not c.parallel_s:
            rows.append((c.scenario, c.variant or "-", str(c.workers), "-", "-", "-", "-", _verdict(c)))
            continue
        rows.append(
            (
                c.scenario, c.variant or "-", str(c.workers),
                seconds_text(c.serial_median_s), seconds_text(c.parallel_median_s),
                f"{c.speedup:.2f}x" + ("*" if c.competed else ""), f"{c.efficiency:.0%}", _verdict(c),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _verdict(c: Comparison) -> str:
    return {None: "not checked", True: "equal", False: "DIFFERENT"}[c.correct]


def seconds_text(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"
