"""Scenario: what the Ray backend costs next to the local one, for the same pool operations.

Pattern: the same ``WorkerPool`` calls on local processes (``backend="local"``, arrays in
shared-memory arenas) and on Ray actors of a 2-node loopback Ray cluster (``backend="ray"``,
arrays in Ray's object store), each pinned to one slot, in the same run.
Measured (local is the reference, Ray the other side; kind ``overhead``):
- a pool of 2 warm workers (TensorFlow imported) ready;
- an empty task's round trip;
- a 19 MiB float64 array to a worker and back.
Asserted: every round trip returns what was sent, bit for bit.
Known hazard: a Ray actor reserves its slot's CPUs: a second pool on the same Ray slot waits
for them (bounded by ``start_timeout_s``), where local pools share the cores.
"""

from __future__ import annotations

import numpy as np
import pytest

from pytest_kerasmp import WorkerPool

pytest.importorskip("ray")

ARRAY = np.random.default_rng(0).random(19 * 2**20 // 8)  # 19 MiB


def echo(value):
    return value


def noop() -> None:
    return None


def test_pool_start_local_vs_ray(kerasmp_speedup, kerasmp_slots, ray_slots):
    local_slots = [kerasmp_slots[i % len(kerasmp_slots)] for i in range(2)]

    def start(slots, backend):
        def run() -> None:
            with WorkerPool(slots, backend=backend, name=f"start-{backend}"):
                pass
        return run

    kerasmp_speedup(start(local_slots, "local"), start(ray_slots[:2], "ray"), workers=2, rounds=3, variant="start", kind="overhead", warmup=False)


@pytest.mark.parametrize("what", ["empty-task", "array-19MiB"])
def test_round_trip_local_vs_ray(kerasmp_speedup, kerasmp_pool_factory, kerasmp_slots, ray_slots, what):
    local = kerasmp_pool_factory(kerasmp_slots[:1], warm_import=False, name="rt-local")
    ray = kerasmp_pool_factory(ray_slots[:1], warm_import=False, name="rt-ray", backend="ray")

    def round_trip(pool):
        if what == "empty-task":
            return lambda: [pool.submit(noop).result(timeout=30) for _ in range(50)]
        return lambda: pool.submit(echo, ARRAY).result(timeout=60)

    def check(on_local, on_ray) -> None:
        if what == "array-19MiB":
            np.testing.assert_array_equal(on_local, ARRAY)
            np.testing.assert_array_equal(on_ray, ARRAY)

    for pool in (local, ray):  # warm: first calls set up arenas and Ray's object transfer
        round_trip(pool)()
    comparison = kerasmp_speedup(
        round_trip(local), round_trip(ray), workers=1, rounds=7, variant=what, kind="overhead", check=check,
    )
    per = 50 if what == "empty-task" else 1
    print(f"\n{what}: local {comparison.serial_median_s / per * 1e3:.3f} ms, Ray {comparison.parallel_median_s / per * 1e3:.3f} ms per round trip")
