"""map(into=...): results written into the caller's arrays, by the workers when shared."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest

import pool_tasks
from pytest_kerasmp.errors import RemoteTraceback
from pytest_kerasmp import TaskTimeoutError, WorkerCrashedError, WorkerPool, shared_empty
from pytest_kerasmp.runtime.wire import shared
from cpu_slots import CPU0



@pytest.fixture(scope="module")
def pool():
    with WorkerPool([CPU0, CPU0], warm_import=False, name="into") as two:
        yield two


def settle(condition, message: str = "", within_s: float = 5.0) -> None:
    """Wait for ``condition`` (the dispatcher lets go of a finished task's arrays in a moment)."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, message or "not within 5 s"
        gc.collect()
        time.sleep(0.01)


def parts(n: int, k: int) -> list[tuple[int, int]]:
    cuts = np.linspace(0, n, k + 1).astype(int)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


@pytest.mark.parametrize("where", ["shared", "plain"])
def test_map_into_fills_each_destination_in_order(pool, where):
    data = np.random.default_rng(0).random((1000, 64), dtype=np.float32)
    out = shared_empty(data.shape, np.float32) if where == "shared" else np.empty_like(data)
    into = [out[a:b] for a, b in parts(len(data), 7)]
    got = pool.map(pool_tasks.scale, [data[a:b] for a, b in parts(len(data), 7)], [2.0] * 7, into=into)
    assert all(g is d for g, d in zip(got, into, strict=True))  # map returns the destinations
    np.testing.assert_array_equal(out, data * 2.0)
    column = out[:, 3]  # a strided destination, and a dtype that casts (float64 -> float32)
    pool.map(pool_tasks.filled, [column.shape], [5.0], ["float64"], into=[column])
    assert (out[:, 3] == 5.0).all() and (out[:, 2] == data[:, 2] * 2.0).all()


def test_a_shared_destination_is_written_by_the_worker_and_a_mismatch_fails_there(pool):
    out = shared_empty((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"returned an array of shape \(2,\).*has shape \(3,\)") as info:
        pool.map(pool_tasks.filled, [(3,), (2,), (3,), (3,)], [1, 2, 3, 4], into=list(out))
    assert isinstance(info.value.__cause__, RemoteTraceback)  # raised in the worker, not here
    plain = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"task \d+ \(filled\) returned an array of shape \(2,\)") as info:
        pool.map(pool_tasks.filled, [(3,), (2,), (3,), (3,)], [1, 2, 3, 4], into=list(plain))
    assert info.value.__cause__ is None  # checked here: nothing went through the worker's region
    assert pool.map(pool_tasks.add, [1], [2]) == [3]  # the pool still serves


@pytest.mark.parametrize(("into", "error", "message"), [
    (np.zeros((3, 2)), TypeError, r"one writable numpy array per task \(3 tasks\), got a ndarray of shape \(3, 2\)"),
    ([np.zeros(2)] * 2, ValueError, r"\(3 tasks\), got 2 items"),
    ([np.zeros(2), [0, 0], np.zeros(2)], ValueError, r"got a list at index 1"),
    ([np.zeros(2), np.zeros(2), np.broadcast_to(np.zeros(2), (2,))], ValueError, r"got a read-only array at index 2"),
])
def test_bad_destinations_are_refused_before_any_task_runs(pool, into, error, message):
    done = pool.stats.tasks_done
    with pytest.raises(error, match=message):
        pool.map(pool_tasks.filled, [(2,)] * 3, [1, 2, 3], into=into)
    assert pool.stats.tasks_done == done


def test_freed_arrays_are_reused_then_unmapped_by_the_workers(pool):
    first = shared_empty((256, 1024), np.float32)
    region = shared.region_of(first).id
    pool.map(pool_tasks.filled, [(256, 1024)], [1.0], into=[first])
    del first
    settle(lambda: shared._spare is not None and shared._spare.id == region)  # the pool lets go of it
    again = shared_empty((256, 1024), np.float32)  # the spare: the same memory, pages there
    assert shared.region_of(again).id == region
    for n in range(1, 6):  # other sizes: new regions, each freed when dropped (but the spare)
        a = shared_empty((n, 4096), np.float64)
        pool.map(pool_tasks.filled, [(n, 4096)] * 2, [n, n], into=[a, a])
        del a
    settle(lambda: len(shared._live) <= 2, "a dropped shared array's memory was not freed")
    # every task tells its worker what was freed: the task that counts has already unmapped them
    assert max(pool.broadcast(pool_tasks.shared_mappings)) <= 2
    del again


def test_a_map_timeout_ends_running_tasks_so_nothing_lands_late(no_leftovers, kerasmp_pool_factory):
    pool = kerasmp_pool_factory([CPU0, CPU0], warm_import=False, name="into-timeout")
    out = shared_empty((2, 4), np.float32)
    out[:] = 0
    with pytest.raises(TaskTimeoutError):
        pool.map(pool_tasks.slow_filled, [(4,), (4,)], [1, 2], [1.5, 1.5], into=list(out), timeout=0.3)
    time.sleep(2.0)  # past the tasks' own end: had they run on, they would have written by now
    assert (out == 0).all(), "a task of a timed-out map(into=...) wrote its result after map raised"
    assert pool.map(pool_tasks.filled, [(4,)], [3], into=[out[0]])[0].tolist() == [3.0] * 4


def test_a_replaced_worker_is_sent_the_region_again(no_leftovers, kerasmp_pool_factory):
    crashy = kerasmp_pool_factory([CPU0], warm_import=False, name="into-crash")
    out = shared_empty((2, 16), np.float32)
    crashy.map(pool_tasks.filled, [(16,)], [1.0], into=[out[0]])
    with pytest.raises(WorkerCrashedError):
        crashy.submit(pool_tasks.kill_self).result(timeout=30)
    t0 = time.monotonic()
    crashy.map(pool_tasks.filled, [(16,), (16,)], [2.0, 3.0], into=[out[0], out[1]], timeout=60)
    assert time.monotonic() - t0 < 30
    assert (out[0] == 2.0).all() and (out[1] == 3.0).all()
