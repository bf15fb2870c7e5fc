"""Scenario: what a warm worker pool costs, next to what it replaces.

Pattern: ``WorkerPool`` workers pinned to the session's slots, started once, fed functions
by reference, arrays through shared memory and models as ``ModelRef``.
Measured (each against its reference in the same run, see the summary table):
- pool start, 2 workers ready, vs one ``python -c "import tensorflow"``;
- a crashed worker's replacement ready vs the same import;
- a 32x224x224x3 float32 array to a worker and back vs ``numpy.copy`` of it twice,
  through the pool's shared memory and through plain pickling in the pipe;
- the second task on a loaded ``ModelRef`` vs the first (which loads the file);
- an empty task's round trip (pytest-benchmark alone).
Asserted: every round trip returns what was sent, bit for bit.
Known hazard: spawn pays the TensorFlow import in every worker, so a pool started per task
is slower than serial; start it once (the ``kerasmp_pool`` fixture) and keep it warm.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pytest_kerasmp import ModelRef, WorkerCrashedError, WorkerPool, seed_everything

IMPORT_TF = [sys.executable, "-c", "import tensorflow"]


def import_tensorflow_in_a_new_process() -> None:
    subprocess.run(IMPORT_TF, check=True, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


# ---------------------------------------------------------------- run in the workers


def echo(value):
    return value


def echo_pickled(data: bytes) -> bytes:
    return pickle.dumps(pickle.loads(data), protocol=5)


def noop() -> None:
    return None


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def predict_with(ref: ModelRef, x: np.ndarray) -> np.ndarray:
    return np.asarray(ref.load()(x, training=False))


def count_params(ref: ModelRef, x: np.ndarray) -> int:
    return ref.load().count_params()


def build_cnn():
    import keras

    seed_everything(0)
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ],
        name="cnn",
    )


# ---------------------------------------------------------------------- scenarios


@pytest.fixture
def two_slots(kerasmp_slots):
    return [kerasmp_slots[i % len(kerasmp_slots)] for i in range(2)]


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_pool_start_vs_one_tensorflow_import(kerasmp_speedup, two_slots, start_method):
    starts: list[float] = []

    def start_pool() -> None:
        with WorkerPool(two_slots, start_method=start_method, name=f"start-{start_method}") as pool:
            starts.append(pool.stats.start_s)

    comparison = kerasmp_speedup(
        import_tensorflow_in_a_new_process, start_pool, workers=2, rounds=3,
        variant=f"start-{start_method}", kind="overhead", warmup=start_method == "forkserver",
    )
    # The pool's own figure: construction to all workers ready (close not included); for
    # forkserver the first start is the warm-up, which also starts the server.
    ready = float(np.median(starts[1:] if start_method == "forkserver" else starts))
    comparison.extra.update({"ready_s": starts, "ready_median_s": ready, "ready_over_import": ready / comparison.serial_median_s})
    print(f"\n{start_method}: 2 workers ready in {ready:.3f} s (median; first start "
          f"{starts[0]:.2f} s), one import {comparison.serial_median_s:.2f} s: "
          f"{ready / comparison.serial_median_s:.2f}x")


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_crashed_worker_replaced_vs_one_tensorflow_import(kerasmp_speedup, kerasmp_pool_factory, two_slots, start_method):
    pool = kerasmp_pool_factory(two_slots[:1], start_method=start_method, name=f"crash-{start_method}")

    def crash_and_wait_for_replacement() -> None:
        replaced = len(pool.stats.replacement_ready_s)
        with pytest.raises(WorkerCrashedError):
            pool.submit(kill_self).result(timeout=30)
        deadline = time.monotonic() + 60
        while len(pool.stats.replacement_ready_s) == replaced:
            assert time.monotonic() < deadline, "the crashed worker was not replaced within 60 s"
            time.sleep(0.002)

    comparison = kerasmp_speedup(
        import_tensorflow_in_a_new_process, crash_and_wait_for_replacement,
        workers=1, rounds=3, variant=f"replace-{start_method}", kind="overhead", warmup=start_method == "forkserver",
    )
    ready = pool.stats.replacement_ready_s
    comparison.extra.update({"crash_to_ready_s": ready, "crash_to_ready_median_s": float(np.median(ready))})
    print(f"\n{start_method}: crash to replacement ready, as the pool saw it: median "
          f"{np.median(ready):.3f} s over {len(ready)} crashes")
    assert pool.submit(echo, 7).result(timeout=30) == 7


@pytest.mark.parametrize("transport", ["shared-memory", "pipe-pickle"])
def test_array_round_trip_vs_two_copies(kerasmp_speedup, kerasmp_pool_factory, two_slots, transport):
    pool = kerasmp_pool_factory(two_slots[:1], warm_import=False, name="arrays")
    array = np.random.default_rng(0).random((32, 224, 224, 3), dtype=np.float32)

    def two_copies() -> np.ndarray:
        return np.copy(np.copy(array))

    def round_trip() -> np.ndarray:
        if transport == "shared-memory":
            return pool.submit(echo, array).result(timeout=30)
        data = pickle.dumps(array, protocol=5)  # in band: the whole array through the pipe
        return pickle.loads(pool.submit(echo_pickled, data).result(timeout=30))

    comparison = kerasmp_speedup(
        two_copies, round_trip, workers=1, rounds=15, variant=f"array-{transport}", kind="overhead",
        check=lambda copied, sent_back: np.testing.assert_array_equal(sent_back, copied),
    )
    print(f"\n{transport}: {array.nbytes / 2**20:.1f} MiB there and back at "
          f"{comparison.speedup:.0%} of the speed of two numpy copies")


@pytest.mark.parametrize("task", [count_params, predict_with], ids=["load", "load-predict"])
def test_second_task_on_a_loaded_modelref_vs_the_first(kerasmp_speedup, kerasmp_pool_factory, two_slots, tmp_path, task):
    pool = kerasmp_pool_factory(two_slots[:1], name="modelref")  # one worker: the cache is per process
    model = build_cnn()
    x = np.random.default_rng(1).random((4, 32, 32, 3), dtype=np.float32)
    expected = np.asarray(model(x, training=False))
    refs = iter(ModelRef.save(model, tmp_path, f"cnn{i}") for i in range(100))
    current: list[ModelRef] = []

    def first_task() -> np.ndarray:  # a file this worker has not loaded yet
        current[:] = [next(refs)]
        return pool.submit(task, current[0], x).result(timeout=60)

    def second_task() -> np.ndarray:
        return pool.submit(task, current[0], x).result(timeout=60)

    def check(first, second) -> None:
        if task is count_params:
            assert first == second == model.count_params()
        else:
            np.testing.assert_allclose(second, expected, rtol=1e-5, atol=1e-6)

    comparison = kerasmp_speedup(
        first_task, second_task, workers=1, rounds=5, variant=f"modelref-{task.__name__}", check=check
    )
    print(f"\nsecond task {comparison.parallel_median_s * 1e3:.2f} ms = "
          f"{1 / comparison.speedup:.2%} of the first ({comparison.serial_median_s * 1e3:.0f} ms)")


def test_empty_task_round_trip(benchmark, kerasmp_pool_factory, two_slots):
    pool = kerasmp_pool_factory(two_slots[:1], warm_import=False, name="empty")

    def round_trip() -> None:
        pool.submit(noop).result(timeout=30)

    for _ in range(20):
        round_trip()
    benchmark.pedantic(round_trip, rounds=500, iterations=1)
    times = []
    for _ in range(200):  # our own timing as well, for the report (and when benchmarks are off)
        t0 = time.perf_counter()
        round_trip()
        times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    benchmark.extra_info["median_ms"] = median * 1e3
    print(f"\nempty task round trip: median {median * 1e3:.3f} ms")
