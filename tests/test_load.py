"""Offered load (``pytest_kerasmp.load``) and its figures (``measure.latency``): percentile
bounds from order statistics, the rate search, and a real generator against a real server."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import server_models

from pytest_kerasmp import InferenceServer, LoadGenerator, LoadPoint, ModelRef, quantile_bounds, search_rate
from pytest_kerasmp.measure.latency import point_telemetry

from cpu_slots import CPU0, CPU1

LINEAR = ModelRef.from_builder("server_models:linear")


def test_percentile_bounds_cover_the_true_percentile_as_often_as_they_say():
    rng = np.random.default_rng(0)
    for q, true in ((50, math.log(2)), (99, -math.log(0.01))):  # exponential(1)'s percentiles
        covered = 0
        for _ in range(400):
            b = quantile_bounds(rng.exponential(1.0, 500), q)
            assert b.low is not None and b.high is not None and b.low <= b.estimate <= b.high
            covered += b.low <= true <= b.high
        assert covered >= 0.92 * 400, f"p{q}: the 95% interval covered the true value in {covered} of 400 runs"


def test_a_short_run_cannot_bound_its_p99():
    # The upper end of a 95% interval of p99 needs P(all below it) = 0.99^n <= 0.025: n >= 368.
    assert quantile_bounds(np.arange(367.0), 99).high is None
    assert quantile_bounds(np.arange(368.0), 99).high == 367.0
    with pytest.raises(ValueError, match="no latencies"):
        quantile_bounds([], 50)


def _point(rate: float, knee: float, n: int = 600, failed: int = 0, late: int = 0) -> LoadPoint:
    """A synthetic point: latency 1 ms below ``knee`` requests/s, growing past it."""
    lat = np.random.default_rng(int(rate)).exponential(1e-3 * max(1.0, rate / knee) ** 4, n)
    return LoadPoint.from_latencies("fake", rate, lat, requests=n + failed, failed=failed, late=late, duration_s=n / rate)


def test_the_rate_search_brackets_the_knee_within_its_points_and_resolution():
    tried: list[float] = []

    def offer(rate: float) -> LoadPoint:
        tried.append(rate)
        return _point(rate, knee=1000)

    found = search_rate(offer, bound_s=0.01, start_rate=100, max_points=12, resolution=1.1)
    assert len(tried) <= 12 and found.points and found.limited_by == "latency"
    assert found.failed_at is not None and found.rate < found.failed_at <= found.rate * 1.1
    assert 800 < found.rate < 1600, found.text()
    # A point with a failed request never holds; late requests carry their lateness in their
    # latency, and a point that fails with many of them names the generator as its limit.
    assert not _point(100, 1000, failed=1).holds(0.01)
    assert _point(100, 1000, late=60).holds(0.01) and _point(100, 1000, late=60).generator_limited
    found = search_rate(lambda r: _point(r, 1000, late=60), bound_s=0.01, start_rate=100, max_points=12, resolution=1.1)
    assert found.limited_by == "generator" and 800 < found.rate < 1600
    found = search_rate(lambda r: _point(r, 1000, failed=1), 0.01, 100, max_points=3)
    assert found.rate == 0 and found.limited_by == "failures" and len(found.points) == 3


def test_load_point_telemetry_is_what_the_server_counted_during_the_point():
    before = {"requests": 10, "batches": 4, "rows": 10, "queue_wait_s": 1.0, "compute_s": 0.5, "batch_sizes": [0, 2, 2, 0]}
    after = {"requests": 16, "batches": 6, "rows": 16, "queue_wait_s": 1.5, "compute_s": 0.7, "batch_sizes": [0, 2, 2, 2]}
    t = point_telemetry(before, after)
    assert t == {"requests": 6, "batches": 2, "rows": 6, "queue_wait_s": 0.5, "compute_s": pytest.approx(0.2), "batch_sizes": [0, 0, 0, 2]}
    point = LoadPoint.from_latencies("s", 10, [0.001] * 6, requests=6, failed=0, late=0, duration_s=1, telemetry=t, max_batch_size=3)
    assert point.mean_batch == 3 and point.batch_fill == 1.0
    assert LoadPoint.from_json(point.to_json()) == point


@pytest.fixture(scope="module")
def generator():
    with LoadGenerator([CPU1], senders=2, timeout_s=5, name="senders") as g:
        yield g


def test_a_generator_offers_a_rate_and_every_answer_is_checked_and_counted(generator):
    with InferenceServer(LINEAR, CPU0, max_batch_size=8, name="loaded") as server:
        xs = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
        checked = []

        def check(indices: np.ndarray, outputs: np.ndarray) -> None:
            np.testing.assert_allclose(outputs, server_models.expected(xs[indices]), rtol=1e-5, atol=1e-6)
            checked.append(len(indices))

        t0 = time.monotonic()
        point = generator.offer(server.client(), xs, 400.0, requests=400, telemetry=server.stats, max_batch_size=8, check=check)
        took = time.monotonic() - t0
    assert point.answered == 400 and point.failed == 0 and checked == [400], point.line()
    assert 0.5 < point.duration_s < took, "400 requests at 400/s took about a second"
    assert point.telemetry is not None and point.telemetry["requests"] == 400 and point.telemetry["rows"] == 400
    assert sum(n * c for n, c in enumerate(point.telemetry["batch_sizes"])) == 400
    assert point.quantile(50).high is not None and point.quantile(50).estimate < 0.5


def test_requests_a_dead_server_never_answers_are_counted_as_failed_within_the_bound(generator):
    server = InferenceServer(LINEAR, CPU0, name="doomed")
    client = server.client()
    server.terminate()
    t0 = time.monotonic()
    point = generator.offer(client, np.ones((4, 4), np.float32), 200.0, requests=60)
    assert time.monotonic() - t0 < 20, "a point against a dead server outlived its bound"
    assert point.answered == 0 and point.failed == 60 and point.errors, point.line()
    assert not point.holds(1.0)


def test_the_session_generator_sends_from_the_slots_other_than_the_first(pytester, run_pytest):
    pytester.makepyfile("""
        import numpy as np

        class Echo:  # any client with submit -> Future
            def submit(self, x):
                from concurrent.futures import Future
                f = Future()
                f.set_result(x * 2)
                return f

        def test_offer(kerasmp_load_generator, kerasmp_worker_slots):
            assert {s.name for s in kerasmp_load_generator.pool.slots} == {"slot1"}
            point = kerasmp_load_generator.offer(Echo(), np.arange(8.0), 400, requests=400)
            assert point.answered == 400 and point.failed == 0 and point.quantile(99).high is not None
    """)
    run_pytest("--kerasmp-gpus=2").assert_outcomes(passed=1)
