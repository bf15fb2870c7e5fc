"""The gate: floors on comparisons' ratios, decided on intervals; and the change against a saved
report. Pure functions, no pytest.

``--kerasmp-min-speedup=NAME:FLOOR`` puts a floor under the ratio of every comparison that
NAME names. A verdict is *met* when the whole interval is at or above the floor, *missed* when
it is wholly below, *inconclusive* when it straddles the floor after the comparison's time
budget; a comparison that was never measured (check failed, a side raised, typo) fails.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pytest_kerasmp.measure.comparison import Comparison
from pytest_kerasmp.measure.stats import Interval, decide, significantly_lower

FLOOR_FORMAT = "use NAME:FLOOR, where NAME is a comparison's name, its scenario or a glob, e.g. augmentation:pool-2w:1.5"
INCONCLUSIVE_ADVICE = (
    "the interval straddles the floor: raise --kerasmp-budget (more rounds narrow it), "
    "quieten the machine, or lower the floor; --kerasmp-inconclusive=warn makes this a warning"
)
TOO_FEW_ROUNDS = (
    "too few rounds fit the time budget for a 95% interval (6 at least): raise --kerasmp-budget "
    "or the test's rounds; --kerasmp-inconclusive=warn makes this a warning"
)
#: Outcomes that fail the session (inconclusive only under --kerasmp-inconclusive=fail).
FAILING = ("missed", "unmeasured")


@dataclasses.dataclass(frozen=True)
class Floor:
    """A minimum ratio for the comparisons that ``pattern`` names."""

    pattern: str
    minimum: float

    @property
    def text(self) -> str:
        return f"{self.pattern}:{self.minimum:g}"

    def matches(self, c: Comparison) -> bool:
        """Exact name, the name without ``[params]``, the scenario, or a glob on the name. The
        exact forms come first, so a name with brackets matches itself literally."""
        plain = f"{c.scenario}:{c.variant}" if c.variant else c.scenario
        if self.pattern in (c.name, c.name.removesuffix(c.suffix), plain, c.scenario):
            return True
        return any(ch in self.pattern for ch in "*?[") and fnmatch.fnmatchcase(c.name, self.pattern)


def parse_floors(values: Iterable[str]) -> list[Floor]:
    """``["augmentation:pool:1.5,served_prediction:1.2"]`` -> floors; ValueError names the bad one."""
    floors = []
    for value in values:
        for item in filter(None, (v.strip() for v in value.split(","))):
            key, sep, number = item.rpartition(":")
            try:
                minimum = float(number)
            except ValueError:
                minimum = float("nan")
            problem = ""
            if sep and key and minimum != minimum:  # NaN: not a number
                problem = f"the floor {number!r} is not a number; "
            elif sep and key and not minimum > 0:
                problem = f"the floor {number!r} must be above 0; "
            if not sep or not key or not minimum > 0:
                raise ValueError(f"--kerasmp-min-speedup={item!r} is invalid: {problem}{FLOOR_FORMAT}")
            floors.append(Floor(key, minimum))
    return floors


def floors_for(c: Comparison, floors: Sequence[Floor]) -> list[float]:
    return [f.minimum for f in floors if f.matches(c)]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One floor against one comparison (or against none, when nothing matched)."""

    floor: str
    name: str
    outcome: str  # met | missed | inconclusive | unmeasured | skipped
    message: str

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def _floor_words(c: Comparison, minimum: float) -> str:
    return c.words.floor(minimum)


def gate(comparisons: Sequence[Comparison], floors: Sequence[Floor]) -> list[Verdict]:
    """One verdict per floor and comparison it names; one ``unmeasured`` per floor naming none."""
    verdicts = []
    names = sorted({c.name for c in comparisons})
    for floor in floors:
        option = f"--kerasmp-min-speedup {floor.text}"
        hits = [c for c in comparisons if floor.matches(c)]
        if not hits:
            verdicts.append(Verdict(floor.text, "", "unmeasured", (
                f"{option}: no comparison named {floor.pattern!r} was measured in this run "
                f"(measured: {', '.join(names) or 'none'}); check the name or select that scenario")))
        for c in hits:
            if c.skipped and not c.timed:
                verdicts.append(Verdict(floor.text, c.name, "skipped", (
                    f"{option}: {c.name} was skipped by {c.skipped} (its check ran once, untimed: "
                    f"{'equal' if c.correct else 'not checked'}); nothing to gate")))
                continue
            if not c.timed:
                verdicts.append(Verdict(floor.text, c.name, "unmeasured", (
                    f"{option}: {c.name} was not measured: {c.status}"
                    + (f" ({c.error})" if c.error else ""))))
                continue
            outcome = decide(c.interval, floor.minimum)
            what = f"{c.name} measured {c.headline()}; {_floor_words(c, floor.minimum)}"
            tail = {"met": "met", "missed": "missed: the whole interval is below the floor",
                    "inconclusive": INCONCLUSIVE_ADVICE if c.interval.complete else TOO_FEW_ROUNDS}[outcome]
            verdicts.append(Verdict(floor.text, c.name, outcome, f"{option}: {what}: {tail}"))
    return verdicts


def outcomes_by_name(verdicts: Sequence[Verdict]) -> dict[str, str]:
    """The worst outcome per comparison name, for the table and the plot."""
    order = ["met", "skipped", "inconclusive", "missed", "unmeasured"]
    worst: dict[str, str] = {}
    for v in verdicts:
        if v.name and order.index(v.outcome) >= order.index(worst.get(v.name, "met")):
            worst[v.name] = v.outcome
    return worst


def failing(verdicts: Sequence[Verdict], *, inconclusive_fails: bool = True) -> list[Verdict]:
    bad = FAILING + (("inconclusive",) if inconclusive_fails else ())
    return [v for v in verdicts if v.outcome in bad]


def verdict_line(verdicts: Sequence[Verdict], *, inconclusive_fails: bool = True, regressions: int = 0) -> str:
    """The run's last line: the gate's verdict in one phrase."""
    counts = {o: sum(v.outcome == o for v in verdicts) for o in ("met", "missed", "inconclusive", "unmeasured", "skipped")}
    parts = [f"{n} {o}" for o, n in counts.items() if n]
    if regressions:
        parts.append(f"{regressions} significant regression(s)")
    failed = failing(verdicts, inconclusive_fails=inconclusive_fails) or regressions
    if not verdicts and not regressions:
        return "kerasmp gate: no floors set"
    return f"kerasmp gate: {'FAILED' if failed else 'passed'} ({', '.join(parts)})"


# ---------------------------------------------------------------------- against a saved report


def compare_reports(comparisons: Sequence[Comparison], old_record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each comparison measured both now and in ``old_record`` (a saved kerasmp-report.json):
    old and new interval, the change of the estimate, and whether it is a significant
    regression (the new interval wholly below the old)."""
    old: dict[str, Interval] = {}
    for data in old_record.get("comparisons", []):
        c = Comparison.from_json(data)
        if c.timed:
            old[c.name] = c.interval
    rows = []
    for c in comparisons:
        if not c.timed or c.name not in old:
            continue
        was, now = old[c.name], c.interval
        rows.append({
            "name": c.name,
            "kind": c.kind,
            "old": {"ratio": was.estimate, "low": was.low, "high": was.high, "rounds": was.rounds},
            "new": {"ratio": now.estimate, "low": now.low, "high": now.high, "rounds": now.rounds},
            "change": now.estimate / was.estimate - 1,
            "regression": significantly_lower(now, was),
            "improvement": significantly_lower(was, now),
        })
    return rows


def comparison_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        o, n = r["old"], r["new"]
        flag = " SIGNIFICANT REGRESSION" if r["regression"] else (" significant improvement" if r["improvement"] else "")
        out.append(
            f"{r['name']}: {o['ratio']:.2f}x [{o['low']:.2f}, {o['high']:.2f}] -> {n['ratio']:.2f}x "
            f"[{n['low']:.2f}, {n['high']:.2f}] ({r['change']:+.0%}){flag}"
        )
    return out
