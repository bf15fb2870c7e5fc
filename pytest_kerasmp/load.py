"""Offered load: requests sent at a rate, as MLPerf's server scenario sends them.

:class:`LoadGenerator` owns k sender processes (a :class:`WorkerPool` without a framework,
pinned to slots other than the server's). For one load point each sender issues its share of
requests at the times of a Poisson process (open loop: a request goes at its time whether or
not the earlier ones were answered) and records, for every request, when it went and when its
answer came. The client is anything with ``submit(x) -> concurrent.futures.Future``: an
:class:`InferenceClient` (local or Ray-backend server), a
:class:`~pytest_kerasmp.ray.RayServeClient`, or your own. :func:`offer_in_process` is the
reference: the same arrivals served by direct calls of a forward function in this process,
one at a time.

Every wait is bounded: a point ends at its last scheduled time plus ``timeout_s``; requests
not answered by then count as failed, and failures and late requests are counted, never
dropped. Figures are in :mod:`pytest_kerasmp.measure.latency`.
"""

from __future__ import annotations

import math
import pickle
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Self

import numpy as np

from pytest_kerasmp.measure.latency import QUANTILES, LoadPoint, RateSearch, point_telemetry, why_not
from pytest_kerasmp.runtime.pool.workerpool import WorkerPool
from pytest_kerasmp.slots.devices import DeviceSlot

#: Seconds between handing the senders their schedule and its first request: every sender
#: is ready (and none starts ahead of the others) when the point starts.
LEAD_S = 0.3
#: Error texts kept per point (the count is always complete).
KEEP_ERRORS = 3


def _schedule(rate: float, n: int, seed: int) -> np.ndarray:
    """Offsets (seconds from the point's start) of ``n`` Poisson arrivals at ``rate`` per second."""
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))


#: In a sender process: the clients it was handed, by their pickled form, so that every point
#: uses one client (one connection, one reader thread) and only the first is warmed.
_clients: dict[bytes, Any] = {}


def _client_here(client: Any) -> Any:
    return _clients.setdefault(pickle.dumps(client), client)


def warm_up(client: Any, sample: Any, timeout_s: float) -> str | None:
    """In a sender process: one request, untimed, through this process's client (its
    connection made, its reader thread started); the error's text if it failed."""
    try:
        _client_here(client).submit(sample).result(timeout=timeout_s)
    except Exception as exc:  # the point's requests will say it again, each counted
        return f"warm-up request: {type(exc).__name__}: {exc}"
    return None


def send_at_rate(client: Any, samples: np.ndarray, offsets: np.ndarray, first: int, step: int, start_at: float,
                 timeout_s: float, late_s: float) -> dict[str, Any]:
    """In a sender process: submit ``samples[(first + step * i) % len(samples)]`` at ``start_at
    + offsets[i]`` (``time.monotonic``, the same clock in every process), record when its answer
    came (and whether it went more than ``late_s`` late), and wait for the answers until the
    last time plus ``timeout_s``."""
    client = _client_here(client)
    n = len(offsets)
    errors: list[str] = []
    issued = np.full(n, math.nan)
    done = np.full(n, math.nan)
    outputs: list[Any] = [None] * n
    settled = threading.Condition()  # its count: requests whose answer (or error) is recorded
    count = 0

    def finished(i: int, future: Any) -> None:
        nonlocal count
        now = time.monotonic()
        exc = RuntimeError("the request was cancelled") if future.cancelled() else future.exception()
        with settled:
            if exc is None:
                done[i], outputs[i] = now, future.result()
            elif len(errors) < KEEP_ERRORS:
                errors.append(f"{type(exc).__name__}: {exc}")
            count += 1
            settled.notify_all()

    futures = []
    for i in range(n):
        delay = start_at + offsets[i] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        issued[i] = time.monotonic()
        try:
            future = client.submit(samples[(first + step * i) % len(samples)])
        except Exception as exc:  # refused at once (closed, bad input): counted like any failure
            with settled:
                if len(errors) < KEEP_ERRORS:
                    errors.append(f"{type(exc).__name__}: {exc}")
            continue
        future.add_done_callback(lambda f, i=i: finished(i, f))
        futures.append(future)
    # Waited for the callbacks, not the futures: a future wakes its waiters before it runs
    # its callbacks, so an answer seen by wait() could still be unrecorded.
    deadline = start_at + offsets[-1] + timeout_s
    with settled:
        settled.wait_for(lambda: count >= len(futures), timeout=max(0.0, deadline - time.monotonic()))
        answered = ~np.isnan(done)  # answers that come after this are not counted: past the bound
        missing = len(futures) - count
        if missing:
            errors.append(f"{missing} requests not answered within {timeout_s:g} s of the last one's time")
        return {
            "due": start_at + offsets, "done": done.copy(), "answered": answered,
            "outputs": [o for o, ok in zip(outputs, answered, strict=True) if ok],
            "failed": n - int(answered.sum()),
            "late": int(np.count_nonzero(issued - (start_at + offsets) > late_s)),
            "errors": errors[: KEEP_ERRORS + 1],
        }


class LoadGenerator:
    """k sender processes that offer requests at a rate to any client (see the module doc).

    Args:
        slots: Where the senders run (round-robin): slots other than the server's, so that
            the server has its slot to itself.
        senders: Sender processes; each issues ``rate / senders`` requests per second.
        late_s: A request issued later than this after its scheduled time counts as late (its
            latency counts from its scheduled time either way); a point that does not hold
            with more than 5% late names the generator as its limit.
        timeout_s: How long after the last scheduled request the answers are waited for.
    """

    def __init__(self, slots: Sequence[DeviceSlot], senders: int = 4, *, late_s: float = 0.002,
                 timeout_s: float = 30.0, name: str = "load") -> None:
        if senders < 1 or not slots:
            raise ValueError(f"a load generator needs at least one sender and one slot (senders={senders}, {len(slots)} slots)")
        self.senders, self.late_s, self.timeout_s = senders, late_s, timeout_s
        self.pool = WorkerPool([slots[i % len(slots)] for i in range(senders)], warm_import=False, name=name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.pool.close()

    def offer(self, client: Any, samples: np.ndarray, rate: float, *, requests: int, server: str = "server",
              seed: int = 0, telemetry: Callable[[], dict[str, Any]] | None = None,
              max_batch_size: int | None = None, check: Callable[[np.ndarray, np.ndarray], Any] | None = None) -> LoadPoint:
        """One load point: ``requests`` requests at ``rate`` per second, Poisson arrivals.

        ``telemetry``: the server's ``stats`` (its batches during the point are recorded).
        ``check(sample_indices, outputs)``: called with every answered request's sample index
        (into ``samples``) and answer, stacked, to check the answers.
        """
        if rate <= 0 or requests < 1:
            raise ValueError(f"rate={rate} and requests={requests} must be positive")
        k = min(self.senders, requests)
        # Every sender's client warmed before the point (a point measures clients in use, not
        # their first call), and before the server's counters are read.
        warm_errors = [e for e in self.pool.broadcast(warm_up, client, samples[0], self.timeout_s, timeout=self.timeout_s + 30) if e]
        # One Poisson process for the point, dealt round-robin: sender j sends requests j,
        # j + k, ... at their times, so the k senders together offer exactly that process.
        offsets = _schedule(rate, requests, seed)
        before = telemetry() if telemetry else None
        start_at = time.monotonic() + LEAD_S
        bound = LEAD_S + float(offsets[-1]) + self.timeout_s + 30
        reports = self.pool.map(
            send_at_rate, [client] * k, [samples] * k, [offsets[j::k] for j in range(k)], list(range(k)), [k] * k,
            [start_at] * k, [self.timeout_s] * k, [self.late_s] * k, timeout=bound,
        )
        after = telemetry() if telemetry else None
        # From when each request was due to its answer, as LoadGen measures: a sender that fell
        # behind adds its lateness to the latency instead of hiding it (coordinated omission).
        latency = np.concatenate([r["done"][r["answered"]] - r["due"][r["answered"]] for r in reports])
        last = max((float(np.nanmax(r["done"])) for r in reports if r["answered"].any()), default=start_at)
        if check is not None and len(latency):
            indices = np.concatenate([(j + k * np.nonzero(r["answered"])[0]) % len(samples) for j, r in enumerate(reports)])
            check(indices, np.stack([o for r in reports for o in r["outputs"]]))
        return LoadPoint.from_latencies(
            server, rate, latency, requests=requests, failed=sum(r["failed"] for r in reports),
            late=sum(r["late"] for r in reports), duration_s=last - start_at,
            telemetry=point_telemetry(before, after) if before is not None and after is not None else None,
            max_batch_size=max_batch_size, errors=(warm_errors + [e for r in reports for e in r["errors"]])[:KEEP_ERRORS],
        )


def offer_in_process(forward: Callable[[np.ndarray], Any], samples: np.ndarray, rate: float, *, requests: int,
                     seed: int = 0, server: str = "in-process") -> LoadPoint:
    """The reference: the same Poisson arrivals served here by ``forward(sample[None])``, one
    at a time in arrival order (a request that arrives while one runs waits). Latency is from
    its arrival to its answer."""
    offsets = _schedule(rate, requests, seed)
    start = time.monotonic() + 0.01
    latency = np.empty(requests)
    for i, offset in enumerate(offsets):
        arrival = start + offset
        delay = arrival - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        forward(samples[i % len(samples)][None])
        latency[i] = time.monotonic() - arrival
    return LoadPoint.from_latencies(server, rate, latency, requests=requests, failed=0, late=0,
                                    duration_s=time.monotonic() - start)


def search_rate(offer: Callable[[float], LoadPoint], bound_s: float, start_rate: float, *, quantile: float = 99,
                max_points: int = 8, resolution: float = 1.15, server: str = "server") -> RateSearch:
    """The highest rate whose p``quantile`` holds under ``bound_s``: ``offer(rate)`` runs one
    load point. Rates double from ``start_rate`` until one fails (or halve until one holds),
    then the bracket is halved geometrically until its ends are within ``resolution`` of each
    other; at most ``max_points`` points in all."""
    if bound_s <= 0 or start_rate <= 0 or max_points < 1 or resolution <= 1:
        raise ValueError("bound_s and start_rate must be positive, max_points >= 1 and resolution > 1")
    if quantile not in QUANTILES:
        raise ValueError(f"quantile={quantile}: a load point bounds the percentiles {', '.join(f'{q:g}' for q in QUANTILES)}")
    points: list[LoadPoint] = []
    held, failed, limited = 0.0, None, "points"
    rate = start_rate
    while len(points) < max_points:
        point = offer(rate)
        points.append(point)
        if point.holds(bound_s, quantile):
            held = rate
        else:
            failed, limited = rate, why_not(point, bound_s, quantile)
        if failed is None:
            rate *= 2
        elif not held:
            rate /= 2
        elif failed / held > resolution:
            rate = math.sqrt(held * failed)
        else:
            break
    return RateSearch(server, bound_s, quantile, points, held, failed, limited if failed is not None else "points")
