"""Latency under an offered load, as MLPerf's server scenario measures it. No pytest, no processes.

A *load point* is one run of requests arriving at an offered rate (Poisson arrivals); its
latency percentiles come with confidence bounds from order statistics, so that a short run
says how sure it is, as LoadGen's early stopping does: the number of latencies below the true
q-quantile is Binomial(n, q), which bounds the quantile between two order statistics without
any assumption on the latencies' distribution. With too few requests a bound does not exist
(None: the point cannot claim the percentile holds; run more requests).

A *rate search* is the bounded search for the highest offered rate whose p99 (its upper
bound) stays under a latency bound; its bracket is the highest rate that held and the lowest
that did not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Percentiles every load point reports.
QUANTILES: tuple[float, ...] = (50.0, 90.0, 99.0)
#: A point whose senders issued more than this fraction of its requests late (their lateness
#: is in their latency) had the generator, or a server that stopped reading, as its limit.
LATE_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class Quantile:
    """A latency percentile (seconds) and its two-sided confidence interval; an end is None
    when the run had too few latencies to bound it."""

    q: float
    estimate: float
    low: float | None
    high: float | None

    def text(self) -> str:
        def ms(s: float | None) -> str:
            return "?" if s is None else f"{s * 1e3:.3g}"

        return f"p{self.q:g} {ms(self.estimate)} ms [{ms(self.low)}, {ms(self.high)}]"


def quantile_bounds(values: Sequence[float] | np.ndarray, q: float, confidence: float = 0.95) -> Quantile:
    """The ``q``-th percentile of ``values`` with a ``confidence`` interval from order statistics.

    The interval is [x_(l), x_(u)] with P(Binomial(n, q/100) < l) and P(Binomial >= u) each at
    most (1 - confidence) / 2; an end outside 1..n is None (p99 needs 368 or more latencies
    for an upper bound of a 95% interval: 0.99^368 < 0.025).
    """
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n == 0:
        raise ValueError("no latencies to take a percentile of")
    if not 0 < q < 100:
        raise ValueError(f"q={q} must be a percentile strictly between 0 and 100")
    p, alpha = q / 100, (1 - confidence) / 2
    k = np.arange(n + 1)
    log_pmf = (
        np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k])
        + k * math.log(p) + (n - k) * math.log1p(-p)
    )
    cdf = np.cumsum(np.exp(log_pmf - log_pmf.max()))
    cdf /= cdf[-1]  # cdf[j] = P(B <= j)
    # low: the largest l (1-based) with P(B <= l - 1) <= alpha; high: the smallest u with
    # P(B >= u) = 1 - P(B <= u - 1) <= alpha.
    below = np.nonzero(cdf <= alpha)[0]
    low = float(x[below[-1]]) if len(below) else None  # l - 1 = j, so x_(l) = x[j]
    above = np.nonzero(1 - cdf <= alpha)[0]
    u = int(above[0]) + 1 if len(above) else n + 1
    high = float(x[u - 1]) if u <= n else None
    return Quantile(q, float(np.percentile(x, q)), low, high)


@dataclasses.dataclass
class LoadPoint:
    """One load point: requests offered at ``offered_rate`` (per second) to ``server``."""

    server: str
    offered_rate: float
    #: Requests scheduled, answered, failed (an error, or no answer within the bound), and
    #: issued later than the generator's ``late_s`` after their scheduled time.
    requests: int
    answered: int
    failed: int
    late: int
    #: From the first scheduled request to the last answer.
    duration_s: float
    quantiles: dict[float, Quantile]
    mean_s: float
    #: The server's batches during the point (None where it gives none, as Ray Serve):
    #: batches, rows, batch_sizes (count by rows), queue_wait_s, compute_s, requests.
    telemetry: dict[str, Any] | None = None
    max_batch_size: int | None = None
    errors: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def from_latencies(cls, server: str, offered_rate: float, latency_s: Sequence[float] | np.ndarray, *,
                       requests: int, failed: int, late: int, duration_s: float, **more: Any) -> LoadPoint:
        lat = np.asarray(latency_s, dtype=float)
        quantiles = {q: quantile_bounds(lat, q) for q in QUANTILES} if len(lat) else {}
        return cls(server, offered_rate, requests, len(lat), failed, late, duration_s, quantiles,
                   float(lat.mean()) if len(lat) else math.nan, **more)

    @property
    def achieved_rate(self) -> float:
        return self.answered / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def generator_limited(self) -> bool:
        return self.late > LATE_FRACTION * self.requests

    def quantile(self, q: float) -> Quantile:
        return self.quantiles[q]

    def holds(self, bound_s: float, q: float = 99) -> bool:
        """Every request answered and the percentile's upper bound under ``bound_s`` (an
        unknown bound does not hold). Latency counts from when a request was due, so a late
        sender's delay is in it."""
        if self.failed or q not in self.quantiles:
            return False
        high = self.quantiles[q].high
        return high is not None and high <= bound_s

    @property
    def mean_batch(self) -> float | None:
        t = self.telemetry
        return t["rows"] / t["batches"] if t and t.get("batches") else None

    @property
    def batch_fill(self) -> float | None:
        """Mean rows per batch over ``max_batch_size``."""
        mean = self.mean_batch
        return mean / self.max_batch_size if mean is not None and self.max_batch_size else None

    @property
    def queue_share(self) -> float | None:
        """Of a request's time in the server, the share spent waiting for its batch (against
        the compute of the batch it ran in)."""
        t = self.telemetry
        if not t or not t.get("requests") or not t.get("batches"):
            return None
        wait, compute = t["queue_wait_s"] / t["requests"], t["compute_s"] / t["batches"]
        return wait / (wait + compute) if wait + compute > 0 else None

    def line(self) -> str:
        parts = [f"{self.server}: offered {self.offered_rate:.0f}/s, achieved {self.achieved_rate:.0f}/s"]
        if self.quantiles:
            parts.append(", ".join(self.quantiles[q].text() for q in QUANTILES))
        if self.mean_batch is not None:
            fill = f" = {self.batch_fill:.0%} of {self.max_batch_size}" if self.batch_fill is not None else ""
            t = self.telemetry or {}
            share = (f", queue wait {t['queue_wait_s'] / t['requests'] * 1e3:.3g} ms vs compute {t['compute_s'] / t['batches'] * 1e3:.3g} ms"
                     f" per batch ({self.queue_share:.0%} waiting)" if self.queue_share is not None else "")
            parts.append(f"mean batch {self.mean_batch:.1f} rows{fill}{share}")
        parts.append(f"{self.failed} failed, {self.late} late of {self.requests}")
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["quantiles"] = {f"{q:g}": dataclasses.asdict(v) for q, v in self.quantiles.items()}
        data["achieved_rate"] = self.achieved_rate
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoadPoint:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["quantiles"] = {float(q): Quantile(**v) for q, v in data.get("quantiles", {}).items()}
        return cls(**values)


def point_telemetry(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """What a server's ``stats()`` counted between two calls (a load point's telemetry)."""
    out = {k: after[k] - before[k] for k in ("requests", "batches", "rows", "queue_wait_s", "compute_s")}
    out["batch_sizes"] = [a - b for a, b in zip(after["batch_sizes"], before["batch_sizes"], strict=True)]
    return out


@dataclasses.dataclass
class RateSearch:
    """The highest offered rate whose p``quantile`` held under ``bound_s``, with its bracket."""

    server: str
    bound_s: float
    quantile: float
    points: list[LoadPoint]
    #: The highest offered rate that held (0: none did), and the lowest that did not (None:
    #: every rate tried held; the search ran out of points first).
    rate: float
    failed_at: float | None
    #: What ended the search above ``rate``: "latency", "failures", "generator" (it could not
    #: offer the rate), or "points" (none failed within the points allowed).
    limited_by: str

    def text(self) -> str:
        above = f", {self.failed_at:.0f}/s did not ({self.limited_by})" if self.failed_at is not None else " (no rate tried failed)"
        return (f"{self.server}: {self.rate:.0f}/s held p{self.quantile:g} under {self.bound_s * 1e3:.3g} ms"
                f"{above}; {len(self.points)} points")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["points"] = [p.to_json() for p in self.points]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RateSearch:
        values = dict(data)
        values["points"] = [LoadPoint.from_json(p) for p in data["points"]]
        return cls(**values)


def why_not(point: LoadPoint, bound_s: float, q: float) -> str:
    """Why ``point`` did not hold (for a search's ``limited_by``): a request failed; the senders
    were late for more than :data:`LATE_FRACTION` of it (the generator could not keep the
    schedule, or the server stopped reading and its socket filled); else the percentile was
    over the bound, or too few requests to bound it."""
    if point.failed:
        return "failures"
    if point.generator_limited:
        return "generator"
    return "latency"
