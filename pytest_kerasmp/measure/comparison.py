"""One comparison measured in one run, and how each kind of comparison is worded. No pytest.

Every comparison times a *baseline* and a *candidate* in paired, alternating rounds; its ratio
is baseline over candidate (above 1: the candidate is faster). Its kind says what that ratio
means and how the table, the JSON, the Markdown and the plot word it:

- ``speedup``: serial (baseline) vs parallel (candidate); the ratio is the speedup, with its
  efficiency (speedup per worker).
- ``fraction``: a limit (baseline, e.g. the model alone in full batches) vs what reaches it
  (candidate); the ratio is the fraction of the limit reached (45%, not "0.45x slower").
- ``overhead``: a reference (baseline, e.g. one ``import tensorflow``) vs a cost (candidate);
  reported as the cost over the reference (3.2x the reference), the inverse of the ratio.

Floors always apply to the ratio, so "higher is better" for every kind.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from pytest_kerasmp.measure.stats import Interval, ratio_interval


@dataclasses.dataclass(frozen=True)
class KindWords:
    """All that differs between the kinds of comparison, decided here once: what the two sides
    and the ratio are called, and how the ratio is shown (the terminal table, the report, the
    gate's words and the plot all ask this object)."""

    baseline: str
    candidate: str
    ratio: str
    #: The plot's axis label.
    axis: str
    #: Shown as candidate/baseline (a cost: 1.3x the reference), not baseline/candidate.
    inverted: bool = False
    #: Shown as a percentage (a fraction of a limit).
    percent: bool = False
    #: Speedup per worker applies (the speedup kind).
    efficiency: bool = False
    #: Words before the interval in a headline ("95% of the limit [...]").
    after_figure: str = ""

    def shown(self, estimate: float, low: float, high: float) -> tuple[float, float, float]:
        """The estimate and interval as shown (an inverted kind swaps and inverts the ends)."""
        return (1 / estimate, 1 / high, 1 / low) if self.inverted else (estimate, low, high)

    def text(self, value: float, unit: str = "x") -> str:
        return percent_text(value) if self.percent else ratio_text(value, unit)

    def figure(self, estimate: float, low: float, high: float) -> str:
        """1.73x [1.51, 1.90]; 45% [40%, 51%]; 1.30x [1.21, 1.42] (inverted)."""
        est, lo, hi = self.shown(estimate, low, high)
        return f"{self.text(est)} [{self.text(lo, '')}, {self.text(hi, '')}]"

    def floor(self, minimum: float) -> str:
        """A floor (always on the baseline/candidate ratio) in this kind's words."""
        if self.percent:
            return f"floor {minimum:.0%} of the limit"
        if self.inverted:
            return f"at most {1 / minimum:.2f}x the reference (floor {minimum:g})"
        return f"floor {minimum:g}x"

    def tick(self, value: float) -> str:
        """A plot tick label."""
        if self.percent:
            return f"{value:.0%}" if value >= 0.01 else f"{value:.1%}"
        return f"{value:g}x"


#: Each kind's words, in the order the tables and the plot show them.
KIND: dict[str, KindWords] = {
    "speedup": KindWords("serial", "parallel", "speedup", efficiency=True,
                         axis="speedup = serial / parallel (log scale; right of 1x: parallel is faster)"),
    "fraction": KindWords("limit", "measured", "fraction of limit", percent=True, after_figure=" of the limit",
                          axis="fraction of the limit reached = limit time / measured time (log scale; 100% = the limit)"),
    "overhead": KindWords("reference", "measured", "overhead vs reference", inverted=True, after_figure=" the reference",
                          axis="cost over the reference = measured time / reference time (log scale; 1x = as cheap as the reference)"),
}
KINDS: tuple[str, ...] = tuple(KIND)


@dataclasses.dataclass
class Comparison:
    """One baseline/candidate pair measured in one run. Times in seconds, one per round.

    ``serial_s``/``parallel_s`` keep their historic names: baseline and candidate times.
    """

    scenario: str
    variant: str
    workers: int
    serial_s: list[float]
    parallel_s: list[float]
    correct: bool | None = None  # None: no check was given (or it did not run)
    nodeid: str = ""
    #: Further figures a test measured alongside (latency, memory, ...); go into the report.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    kind: str = "speedup"
    #: The test's parameters (``item.callspec.id``), part of the name.
    params: str = ""
    #: Why no round was timed or the rounds stopped early: the check's or a side's error.
    error: str | None = None
    #: Set when the rounds were skipped on purpose, e.g. "--benchmark-skip".
    skipped: str | None = None
    #: Why the rounds stopped: "decided", "budget", "max rounds", "no floor", "fixed".
    stopped: str = ""
    #: Disambiguates two comparisons that would otherwise share a name (``#2``).
    suffix: str = ""
    #: The rounds the test asked for; more follow while the interval is undecided.
    requested: int = 0
    #: Who competed for its slots while it was measured ("" if no one); set by the plugin
    #: under xdist (main's issue 10). The table marks such a figure with ``*``.
    competed: str = ""

    # ------------------------------------------------------------------ figures

    @property
    def timed(self) -> bool:
        return bool(self.serial_s) and len(self.serial_s) == len(self.parallel_s)

    @property
    def serial_median_s(self) -> float:
        return statistics.median(self.serial_s)

    @property
    def parallel_median_s(self) -> float:
        return statistics.median(self.parallel_s)

    @property
    def interval(self) -> Interval:
        """The ratio's interval from the paired rounds (ValueError when none was timed)."""
        return ratio_interval(self.serial_s, self.parallel_s)

    @property
    def speedup(self) -> float:
        """The ratio's point estimate: the median of per-round baseline/candidate ratios."""
        return self.interval.estimate

    @property
    def efficiency(self) -> float:
        """Speedup per worker (1.0: perfect scaling); meaningful for the speedup kind."""
        return self.speedup / self.workers

    @property
    def name(self) -> str:
        """``scenario[params]:variant``, unique within a run."""
        base = self.scenario + (f"[{self.params}]" if self.params else "")
        return (f"{base}:{self.variant}" if self.variant else base) + self.suffix

    key = name  # the historic name of ``name``

    @property
    def status(self) -> str:
        """What became of the comparison: measured, DIFFERENT, raised, skipped."""
        if self.correct is False:
            return "DIFFERENT"
        if self.error is not None and not self.timed:
            return "raised"
        if self.skipped:
            return "skipped"
        return "measured" if self.timed else "not measured"

    # ------------------------------------------------------------------ wording

    def headline(self) -> str:
        """The ratio in the kind's own terms, with its interval and rounds."""
        if not self.timed:
            return {"DIFFERENT": "check failed", "raised": "a side raised", "skipped": f"skipped ({self.skipped})"}.get(
                self.status, "not measured")
        iv, words = self.interval, self.words
        n = f"{iv.rounds} rounds" + ("" if iv.complete else f", {iv.level:.0%} interval")
        if words.efficiency:
            return f"{words.ratio} {self.figure_text()}, efficiency {self.efficiency:.0%} ({n})"
        return f"{self.figure_text().replace(' [', words.after_figure + ' [', 1)} ({n})"

    def figure_text(self) -> str:
        """The headline figure and its interval alone, for the table: 1.73x [1.51, 1.90]."""
        if not self.timed:
            return "-"
        iv = self.interval
        return self.words.figure(iv.estimate, iv.low, iv.high)

    @property
    def words(self) -> KindWords:
        """This comparison's kind, in words (``KIND``; an unknown kind reads as a speedup)."""
        return KIND.get(self.kind, KIND["speedup"])

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        """Every figure, in plain JSON types (numpy scalars in ``extra`` become numbers); the
        medians, ratio and interval are None when no round was timed."""
        iv = self.interval if self.timed else None
        words = self.words
        data = {
            "name": self.name,
            "scenario": self.scenario,
            "variant": self.variant,
            "params": self.params,
            "suffix": self.suffix,
            "kind": self.kind,
            "words": {"baseline": words.baseline, "candidate": words.candidate, "ratio": words.ratio},
            "nodeid": self.nodeid,
            "workers": self.workers,
            "rounds": len(self.parallel_s),
            "serial_s": self.serial_s,
            "parallel_s": self.parallel_s,
            "serial_median_s": self.serial_median_s if iv else None,
            "parallel_median_s": self.parallel_median_s if iv else None,
            "ratio": iv.estimate if iv else None,
            "interval": {"low": iv.low, "high": iv.high, "level": iv.level} if iv else None,
            "speedup": iv.estimate if iv else None,
            "efficiency": self.efficiency if iv and words.efficiency else None,
            "overhead": 1 / iv.estimate if iv and words.inverted else None,
            "headline": self.headline(),
            "status": self.status,
            "correct": self.correct,
            "error": self.error,
            "skipped": self.skipped,
            "stopped": self.stopped,
            "requested": self.requested,  # the rounds the test asked for
            "competed": self.competed,
            "extra": self.extra,
        }
        plain: dict[str, Any] = json.loads(json.dumps(data, default=_plain))
        return plain

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Comparison:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars and 0-d arrays
    return item() if callable(item) else str(value)


def ratio_text(x: float, unit: str = "x") -> str:
    """106x, 31.4x, 1.73x, 0.36x, 0.0054x: about three significant figures."""
    if x >= 100:
        return f"{x:.0f}{unit}"
    return (f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.095 else f"{x:.2g}") + unit


def percent_text(x: float) -> str:
    """45%, 0.54%: whole percent, or two significant figures below 10%."""
    return f"{x:.0%}" if x >= 0.095 else f"{x * 100:.2g}%"


def seconds_text(s: float) -> str:
    """3 significant figures in a unit that fits: 0.412 ms, 12.3 ms, 2.35 s, 45 µs."""
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        ms = s * 1e3
        return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"
    return f"{s * 1e6:.3g} µs"


def check_text(c: Comparison) -> str:
    return {None: "not checked", True: "equal", False: "DIFFERENT"}[c.correct] if c.status != "raised" else "raised"


def rounds_text(c: Comparison) -> str:
    """6, or 3 (75%) when the rounds fall short of a 95% interval."""
    if not c.timed:
        return "-"
    iv = c.interval
    return str(iv.rounds) + ("" if iv.complete else f" ({iv.level:.0%})")


def summary_lines(comparisons: Sequence[Comparison], outcomes: Mapping[str, str] | None = None) -> list[str]:
    """The terminal summary: one row per comparison, grouped by kind, worded by kind."""
    outcomes = outcomes or {}
    lines: list[str] = []
    for kind in KINDS:
        group = [c for c in comparisons if c.kind == kind]
        if not group:
            continue
        words = KIND[kind]
        header: tuple[str, ...] = ("name", "workers", words.baseline, words.candidate, f"{words.ratio} [95% interval]", "rounds", "check", "gate")
        if words.efficiency:
            header = header[:5] + ("efficiency",) + header[5:]
        rows: list[tuple[str, ...]] = [header]
        for c in group:
            times = (seconds_text(c.serial_median_s), seconds_text(c.parallel_median_s)) if c.timed else ("-", "-")
            row = [c.name, str(c.workers), *times, c.figure_text() + ("*" if c.competed else "")]
            if words.efficiency:
                row.append(f"{c.efficiency:.0%}" if c.timed else "-")
            row += [rounds_text(c), check_text(c), outcomes.get(c.name, "-")]
            rows.append(tuple(row))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        for c in group:
            if c.error:
                lines.append(f"  {c.name}: {c.error}")
        lines.append("")
    return lines[:-1] if lines else lines
