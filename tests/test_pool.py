"""WorkerPool with real TensorFlow in spawned workers: results, errors, crashes, cleanup."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import pool_tasks
from conftest import running as _running
from pytest_kerasmp.errors import RemoteTraceback
from pytest_kerasmp import DeviceSlot, PoolClosedError, TaskTimeoutError, WorkerCrashedError, WorkerPool, WorkerStartupError
from pytest_kerasmp.errors import FORK_REFUSED



# ----------------------------------------------------------- the session pool (warm, shared)
from cpu_slots import CPU0


def test_each_worker_is_pinned_and_warm(kerasmp_pool, kerasmp_slots):
    infos = kerasmp_pool.broadcast(pool_tasks.whoami)
    assert len(infos) == len(kerasmp_slots)
    assert len({i["pid"] for i in infos}) == len(infos)
    for info, slot in zip(infos, kerasmp_slots, strict=True):
        assert info["cores"] == list(slot.cores)
        assert info["intra"] == len(slot.cores)
        assert info["tf_was_imported"]


def test_forkserver_workers_get_their_own_slot(no_leftovers, kerasmp_pool_factory):
    slots = [DeviceSlot(index=i, kind="CPU", cores=(c,)) for i, c in enumerate(sorted(os.sched_getaffinity(0))[:2])]
    pool = kerasmp_pool_factory(slots, start_method="forkserver")  # forked from a server that imported TF
    infos = pool.broadcast(pool_tasks.whoami)
    for info, slot in zip(infos, slots, strict=True):
        assert info["cores"] == list(slot.cores) and info["intra"] == 1
    envs = pool.broadcast(pool_tasks.slot_env)
    assert [e["index"] for e in envs] == [s.index for s in slots]


def test_map_keeps_input_order_and_submit_takes_kwargs(kerasmp_pool):
    assert kerasmp_pool.map(pool_tasks.add, range(20), range(20)) == [2 * i for i in range(20)]
    assert kerasmp_pool.submit(pool_tasks.add, 2, b=5).result(timeout=30) == 7


def test_task_exception_is_reraised_with_the_worker_traceback(kerasmp_pool):
    with pytest.raises(ValueError, match="from the worker") as info:
        kerasmp_pool.submit(pool_tasks.raise_value_error, "from the worker").result(timeout=30)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in raise_value_error" in info.value.__cause__.text


def test_functions_travel_by_reference_only(kerasmp_pool):
    with pytest.raises(TypeError, match="must be a module-level function"):
        kerasmp_pool.submit(lambda: 1)

    def local():
        return 1

    with pytest.raises(TypeError, match="not a lambda, a local function"):
        kerasmp_pool.submit(local)


def test_unpicklable_arguments_and_results_are_named(kerasmp_pool):
    with pytest.raises(TypeError, match=r"argument 1 of pool_tasks:add cannot be pickled"):
        kerasmp_pool.submit(pool_tasks.add, 1, threading.Lock())
    with pytest.raises(TypeError, match=r"argument 'b' of pool_tasks:add cannot be pickled"):
        kerasmp_pool.submit(pool_tasks.add, 1, b=threading.Lock())
    with pytest.raises(TypeError, match="the result of task .* cannot be pickled"):
        kerasmp_pool.submit(pool_tasks.a_lock).result(timeout=30)
    assert kerasmp_pool.submit(pool_tasks.add, 1, 1).result(timeout=30) == 2  # still serving


def test_live_models_are_refused_naming_modelref(kerasmp_pool, tmp_path):
    import keras
    import tensorflow as tf

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    for live in (model, model.layers[0], keras.optimizers.Adam(), tf.Variable(1.0)):
        with pytest.raises(TypeError, match="send a pytest_kerasmp.ModelRef instead"):
            kerasmp_pool.submit(pool_tasks.add, live)
    with pytest.raises(TypeError, match="ModelRef"):
        WorkerPool([CPU0], initializer=pool_tasks.add, initargs=(model,))


def test_large_arrays_travel_through_shared_memory_and_leave_nothing(no_leftovers, kerasmp_pool_factory):
    from conftest import arena_maps

    held = set(arena_maps())  # other pools' (each worker's arena holds a control word)
    pool = kerasmp_pool_factory([CPU0], warm_import=False)
    rng = np.random.default_rng(0)
    array = rng.random((32, 64, 64, 3), dtype=np.float32)
    sent = array.copy()
    future = pool.submit(pool_tasks.scale, array, 2.0)
    array[:] = 0  # copied at submit: changing it now does not change the call
    np.testing.assert_array_equal(future.result(timeout=30), sent * 2.0)
    assert set(arena_maps()) - held, "the array did not go through a shared-memory arena"
    sizes = [rng.random(n, dtype=np.float32) for n in (20_000, 200_000, 50_000, 400_000, 30_000)]
    results = pool.map(pool_tasks.scale, sizes, [1.0] * len(sizes))  # arenas grow and are reused
    assert all(np.array_equal(r, a) for r, a in zip(results, sizes, strict=True))
    parts = pool.submit(pool_tasks.scale, np.asfortranarray(sent[..., 0]), 1.0).result(timeout=30)
    np.testing.assert_array_equal(parts, sent[..., 0])
    results[0][:] = 5  # results are the caller's own, writable
    ones, twos = np.ones(100_000), np.full(100_000, 2.0)
    assert pool.submit(pool_tasks.keep, ones).result(timeout=30) == 1e5  # the task keeps its view
    assert pool.submit(pool_tasks.keep, twos).result(timeout=30) == 2e5
    assert pool.submit(pool_tasks.kept_sums).result(timeout=30) == [1e5, 2e5]  # not overwritten
    pool.close()
    del future, results, parts  # a large result is a view of its arena: the arena goes with it
    assert not set(arena_maps()) - held, "a shared-memory arena outlived its pool and its results"


def test_results_come_as_views_of_the_workers_arenas_never_overwritten(no_leftovers, kerasmp_pool_factory):
    pool = kerasmp_pool_factory([CPU0], warm_import=False)
    arenas = pool._dispatcher.workers[0].from_worker.arenas
    kept = [pool.submit(pool_tasks.scale, np.full(200_000, float(i)), 1.0).result(timeout=30) for i in range(10)]
    for i, result in enumerate(kept):  # more results alive than the worker has arenas
        assert (result == i).all(), f"result {i} was overwritten by a later task's"
    assert any(np.shares_memory(kept[-1], np.frombuffer(a.map, np.uint8)) for a in arenas if a.map is not None)
    kept[0][:] = -1  # the caller's own, writable
    del kept
    maps = [id(a.map) for a in arenas]  # (a reference would count as a view)
    for _ in range(5):  # results dropped at once: the same arena again, no new file
        assert (pool.submit(pool_tasks.scale, np.ones(200_000), 1.0).result(timeout=30) == 1).all()
    assert [id(a.map) for a in arenas] == maps
    last = pool.submit(pool_tasks.scale, np.full(200_000, 7.0), 1.0).result(timeout=30)
    pool.close()
    assert (last == 7).all(), "a result outlives its pool"


def test_modelref_loads_once_per_worker_and_reloads_a_changed_file(kerasmp_pool, tmp_path):
    import keras

    from pytest_kerasmp import ModelRef

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, kernel_initializer="ones")])
    ref = ModelRef.save(model, tmp_path, "dense")
    x = np.ones((3, 4), np.float32)
    first = kerasmp_pool.broadcast(pool_tasks.predict_sum, ref, x)
    second = kerasmp_pool.broadcast(pool_tasks.predict_sum, ref, x)
    for (s1, load1, id1, _), (s2, load2, id2, _) in zip(first, second, strict=True):
        assert s1 == s2 == 24.0
        assert id1 == id2 and load2 < load1
    model.layers[0].kernel.assign(np.full((4, 2), 2.0, np.float32))
    time.sleep(0.01)
    ModelRef.save(model, tmp_path, "dense")
    third = kerasmp_pool.submit(pool_tasks.predict_sum, ref, x).result(timeout=60)
    assert third[0] == 48.0


def test_modelref_from_builder_with_custom_layer(kerasmp_pool):
    from pytest_kerasmp import ModelRef

    ref = ModelRef.from_builder("pool_tasks:build_custom", units=3)
    total = kerasmp_pool.submit(pool_tasks.predict_sum, ref, np.ones((1, 4), np.float32)).result(timeout=60)
    assert total[0] == 24.0  # Doubler then Dense(ones): 3 units x 4 inputs x 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"path": "m.h5"}, "is not a .keras file"),
        ({"builder": "nocolon"}, "must be 'package.module:function'"),
    ],
)
def test_modelref_bad_input(kwargs, message):
    from pytest_kerasmp import ModelRef

    with pytest.raises(ValueError, match=message):
        ModelRef(**kwargs)


# ------------------------------------------------------------- pools of their own (crashes)


@pytest.fixture
def pool(no_leftovers, kerasmp_pool_factory):
    return kerasmp_pool_factory([CPU0, CPU0], name="crashy", start_method="forkserver")


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_dead_worker_fails_its_task_and_is_replaced(pool, how):
    before = pool.pids()
    queued = [pool.submit(pool_tasks.sleep_then, 0.3, i) for i in range(4)]
    crash = pool.submit(pool_tasks.exit_now, 7) if how == "exit" else pool.submit(pool_tasks.kill_self)
    t0 = time.perf_counter()
    with pytest.raises(WorkerCrashedError) as info:
        crash.result(timeout=30)
    assert time.perf_counter() - t0 < 2.0 + 0.3 * 4
    text = str(info.value)
    assert "slot0 cores" in text and "pid" in text
    assert ("exit code 7" if how == "exit" else "SIGKILL") in text
    assert [f.result(timeout=60) for f in queued] == [0, 1, 2, 3]  # queued tasks still ran
    assert pool.map(pool_tasks.add, [1, 2], [3, 4]) == [4, 6]
    assert pool.pids() != before
    assert pool.stats.crashes == 1


def test_task_timeout_kills_and_replaces_the_worker(pool):
    before = set(pool.pids())
    with pytest.raises(TaskTimeoutError, match="ran past its 0.5 s timeout") as info:
        pool.submit_with_timeout(0.5, pool_tasks.sleep_then, 30).result(timeout=30)
    assert isinstance(info.value, TimeoutError)
    assert pool.submit(pool_tasks.add, 1, 2).result(timeout=60) == 3
    deadline = time.monotonic() + 60
    while before <= set(pool.pids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not before <= set(pool.pids())


@pytest.mark.parametrize("end", ["close", "timeout", "crash"])
def test_what_a_task_started_ends_with_its_worker(pool, tmp_path, end):
    """A task's own children (say a PyDataset fork pool) go when its worker goes."""
    pidfile = tmp_path / "grandchild"
    if end == "close":
        pool.submit(pool_tasks.start_grandchild, str(pidfile)).result(timeout=60)
        assert _running(int(pidfile.read_text()))
        pool.close(timeout=10)
    else:
        task = pool.submit_with_timeout(3, pool_tasks.start_grandchild, str(pidfile), "hang" if end == "timeout" else "die")
        with pytest.raises(TaskTimeoutError if end == "timeout" else WorkerCrashedError):
            task.result(timeout=60)
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _running(grandchild):
        assert time.monotonic() < deadline, "a process started by a task outlived its worker"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"initializer": pool_tasks.failing_initializer}, "RuntimeError: initializer exploded"),
        ({"initializer": pool_tasks.exiting_initializer}, "exit code 5"),
        ({"slots": [DeviceSlot(index=0, kind="CPU", cores=(4096,))]}, "invalid CPU 4096"),
    ],
    ids=["initializer-raises", "initializer-exits", "bad-slot"],
)
def test_startup_failures_raise_worker_startup_error(no_leftovers, options, reason):
    slots = options.pop("slots", [CPU0])
    with pytest.raises(WorkerStartupError, match="worker 0 .* failed to start") as info:
        WorkerPool(slots, warm_import=False, **options)
    assert reason in str(info.value) + str(info.value.__cause__)


def test_fork_is_refused():
    import tensorflow  # noqa: F401

    with pytest.raises(ValueError) as info:
        WorkerPool([CPU0], start_method="fork")
    assert str(info.value) == FORK_REFUSED


def test_close_drains_then_refuses_and_cancel_fails_pending(no_leftovers):
    pool = WorkerPool([CPU0], warm_import=False)
    futures = [pool.submit(pool_tasks.sleep_then, 0.05, i) for i in range(5)]
    pool.close()
    assert [f.result(timeout=0) for f in futures] == list(range(5))
    with pytest.raises(PoolClosedError, match="is closed"):
        pool.submit(pool_tasks.add, 1)
    pool = WorkerPool([CPU0], warm_import=False)
    futures = [pool.submit(pool_tasks.sleep_then, 0.5, i) for i in range(4)]
    t0 = time.perf_counter()
    pool.close(cancel_pending=True)
    assert time.perf_counter() - t0 < 5
    assert isinstance(futures[-1].exception(timeout=0), PoolClosedError)


def test_workers_die_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal, sys
            sys.path.insert(0, {os.path.dirname(pool_tasks.__file__)!r})
            from pytest_kerasmp import WorkerPool, DeviceSlot
            import pool_tasks
            if __name__ == "__main__":
                pool = WorkerPool([DeviceSlot(index=0, kind="CPU", cores=(0,))] * 2, warm_import=False)
                grandchild = pool.submit(pool_tasks.start_grandchild, {str(tmp_path / "pid")!r}).result(60)
                print(*pool.pids(), grandchild, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    pids = [int(p) for p in done.stdout.split()]  # the two workers and what a task started
    assert len(pids) == 3, done.stderr
    deadline = time.monotonic() + 5
    while any(_running(p) for p in pids):
        assert time.monotonic() < deadline, "workers outlived their killed parent"
        time.sleep(0.1)


def test_interrupted_session_leaves_no_worker(pytester, run_pytest, tmp_path):
    pidfile = tmp_path / "pids"
    pytester.makepyfile(
        f"""
        import os, signal
        from pytest_kerasmp import DeviceSlot

        def test_interrupted(kerasmp_pool_factory):
            pool = kerasmp_pool_factory([DeviceSlot(index=0, kind="CPU", cores=(0,))], warm_import=False)
            open({str(pidfile)!r}, "w").write(" ".join(map(str, pool.pids())))
            signal.signal(signal.SIGINT, signal.default_int_handler)  # even if launched ignoring it
            os.kill(os.getpid(), signal.SIGINT)
        """
    )
    result = run_pytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    pids = [int(p) for p in pidfile.read_text().split()]
    time.sleep(1.0)
    assert not [p for p in pids if _running(p)]
