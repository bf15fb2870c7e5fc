"""Scenario: the broken recipes from the usual articles, each failing the way it does today.

Pattern: each pitfall runs as written in the articles, in a child process with a short
bound when it can hang (a hang is detected in seconds, then the whole process group is
killed), and next to it the plugin's way of doing the same job passes.
Asserted, per pitfall (the failure it really has with TF 2.21 / Keras 3.15 here):
- fork after the parent ran ``model.predict``: the pool's children hang in theirs (a
  plain eager op before the fork did not hang here; a compiled function did);
- a live model sent to a child: it is pickled and rebuilt with safe mode off, so a model
  that ``load_model`` would refuse (a Lambda layer) is silently rebuilt;
- ``PyDataset(use_multiprocessing=True)`` whose ``__getitem__`` calls a ``tf.function``,
  after the process ran ``model.predict``: the forked workers hang, and Keras waits for
  them without a bound (eager ops and numpy there did not hang here);
- ``fit(use_multiprocessing=True, workers=4)``: a TypeError in Keras 3;
- a ``multiprocessing.Queue`` passed through ``Pool.starmap``: a RuntimeError;
- ``set_visible_devices(gpus[i])`` on a machine without that GPU: an IndexError;
- worker loops that exit on a 0.1 s ``queue.Empty``: results lost, and counted.
Measured: nothing; this scenario is about correctness.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from pytest_kerasmp import ModelRef, WorkerPool, detect_gpus

HANG_BOUND_S = 6.0


#: Scripts that hang (each printing how far it got), run by the ``hang_runs`` fixture.
HANGS = {
    "fork": """
    import multiprocessing
    import numpy as np
    import keras

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])

    def predict(i):
        return float(model.predict(np.ones((2, 8)), verbose=0).sum() + i)

    if __name__ == "__main__":
        model.predict(np.ones((2, 8)), verbose=0)  # the parent ran TensorFlow: forking is now unsafe
        print("forking", flush=True)
        with multiprocessing.get_context("fork").Pool(2) as pool:
            print(pool.map(predict, range(2)), flush=True)
    """,
    "pydataset": """
    import numpy as np
    import keras
    import tensorflow as tf

    flip = tf.function(tf.image.flip_left_right)

    class Flipped(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return flip(tf.fill((8, 4, 4, 3), float(i))).numpy()  # compiled TensorFlow

    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, keras.layers.Identity()(inputs))
    model.predict(np.ones((1, 4, 4, 3)), verbose=0)  # the process ran TensorFlow
    print("threads", model.predict(Flipped(workers=2), verbose=0).shape, flush=True)
    print("forking", flush=True)
    print(model.predict(Flipped(workers=2, use_multiprocessing=True), verbose=0).shape, flush=True)
    """,
}


def start_bounded(code: str) -> tuple[subprocess.Popen, float]:
    """Start ``code`` in a new process group (its forked children in it too); with its start time."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, start_new_session=True,
    )
    return proc, time.monotonic()


def finish_bounded(started: tuple[subprocess.Popen, float], timeout: float) -> tuple[str, subprocess.CompletedProcess]:
    """("done", result) if the process ended within ``timeout`` of its start; else ("hung",
    what it printed), its whole group killed."""
    proc, t0 = started
    try:
        out, err = proc.communicate(timeout=max(0.0, t0 + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the forked children too
        out, err = proc.communicate(timeout=10)
        return "hung", subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return "done", subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_bounded(code: str, timeout: float) -> tuple[str, subprocess.CompletedProcess]:
    """Run ``code``: ("done", result), or ("hung", what it printed) if not done in ``timeout``."""
    return finish_bounded(start_bounded(code), timeout)


@pytest.fixture(scope="module")
def hang_runs():
    """The two scripts that hang, started together: each mostly waits out its bound, so the
    module waits once (on 2 cores, some 10 s less of the harness). Killed at the end."""
    runs = {name: start_bounded(code) for name, code in HANGS.items()}
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)


# ------------------------------------------------------------------ run in the workers


def tf_op(i: int) -> float:
    import tensorflow as tf

    return float(tf.reduce_sum(tf.ones((4, 4))) + i)


def square(i: int) -> int:
    return i * i


# ------------------------------------------------------------------------- pitfalls


def test_fork_after_tensorflow_started_hangs_and_the_pool_does_not(kerasmp_pool, hang_runs):
    status, done = finish_bounded(hang_runs["fork"], timeout=HANG_BOUND_S + 5)  # ~3 s of it: the import
    assert status == "hung" and done.stdout.endswith("forking\n"), f"the forked pool finished: {done}"
    assert kerasmp_pool.map(tf_op, range(4)) == [16.0, 17.0, 18.0, 19.0]
    with pytest.raises(ValueError, match="start_method='fork' is not supported"):
        WorkerPool(kerasmp_pool.slots, start_method="fork")


def test_a_live_model_sent_to_a_child_is_rebuilt_with_safe_mode_off(kerasmp_pool, tmp_path):
    import keras

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(inputs))
    rebuilt = pickle.loads(pickle.dumps(model))  # what spawn does with a model argument
    np.testing.assert_array_equal(np.asarray(rebuilt(np.ones((1, 3)))), np.full((1, 3), 2.0))
    ref = ModelRef.save(model, tmp_path, "lambda")
    with pytest.raises(ValueError, match="safe_mode"):
        ref.load()  # the same model, by reference, in safe mode: refused, as it should be
    with pytest.raises(TypeError, match="send a pytest_kerasmp.ModelRef instead"):
        kerasmp_pool.submit(square, model)


def flip_batch(i: int) -> np.ndarray:
    import tensorflow as tf

    return tf.function(tf.image.flip_left_right)(tf.fill((8, 4, 4, 3), float(i))).numpy()


def test_pydataset_forking_into_a_tf_function_hangs_and_the_pool_does_not(kerasmp_pool, hang_runs):
    status, done = finish_bounded(hang_runs["pydataset"], timeout=HANG_BOUND_S + 5)
    assert status == "hung", f"the forked PyDataset finished: {done}"
    assert done.stdout == "threads (32, 4, 4, 3)\nforking\n", done  # threads worked; the fork hung
    batches = kerasmp_pool.map(flip_batch, range(4))  # the same batches, in spawned workers
    assert [float(b[0, 0, 0, 0]) for b in batches] == [0.0, 1.0, 2.0, 3.0]


def test_fit_with_workers_and_use_multiprocessing_is_a_type_error_in_keras_3():
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((8, 2), np.float32), np.ones((8, 1), np.float32)
    with pytest.raises(TypeError, match="workers|use_multiprocessing"):
        model.fit(x, y, epochs=1, verbose=0, workers=4, use_multiprocessing=True)
    model.fit(x, y, epochs=1, verbose=0)  # without them it trains


def test_a_queue_through_pool_starmap_is_a_runtime_error(kerasmp_pool):
    status, done = run_bounded(
        """
        import multiprocessing

        def put(q, i):
            q.put(i)

        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            q = ctx.Queue()
            with ctx.Pool(2) as pool:
                try:
                    pool.starmap(put, [(q, i) for i in range(4)])
                except RuntimeError as exc:
                    print("RuntimeError:", exc)
        """,
        timeout=30,
    )
    assert status == "done" and "RuntimeError: Queue objects should only be shared between processes through inheritance" in done.stdout, done
    assert kerasmp_pool.map(square, range(4)) == [0, 1, 4, 9]  # results come back without a queue


def test_set_visible_devices_with_a_gpu_index_that_does_not_exist():
    if len(detect_gpus()) >= 2:
        pytest.skip("this machine has 2 GPUs, so gpus[1] exists")
    status, done = run_bounded(
        """
        import tensorflow as tf
        gpus = tf.config.list_physical_devices("GPU")
        try:
            tf.config.set_visible_devices(gpus[1], "GPU")
        except IndexError as exc:
            print("IndexError:", exc, len(gpus))
        """,
        timeout=60,
    )
    assert status == "done" and "IndexError: list index out of range" in done.stdout, done
    status, done = run_bounded(
        """
        from pytest_kerasmp import pin_process, plan_slots
        slot = plan_slots(2)[1]
        pin_process(slot)
        import tensorflow as tf
        print("pinned", slot.describe(), float(tf.reduce_sum(tf.ones(3))))
        """,
        timeout=60,
    )
    assert status == "done" and "pinned slot1" in done.stdout, done


def test_worker_loops_that_exit_on_a_short_queue_empty_lose_results(kerasmp_pool):
    status, done = run_bounded(
        """
        import multiprocessing, queue, time

        def worker(tasks, results):
            while True:
                try:
                    item = tasks.get(timeout=0.1)  # the recipe: Empty means "done"
                except queue.Empty:
                    return
                results.put(item * item)

        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            tasks, results = ctx.Queue(), ctx.Queue()
            workers = [ctx.Process(target=worker, args=(tasks, results)) for _ in range(2)]
            for w in workers:
                w.start()
            time.sleep(1.0)  # the producer is slower than 0.1 s (e.g. it loads a model first)
            for i in range(20):
                tasks.put(i)
            got = []
            while True:
                try:
                    got.append(results.get(timeout=0.1))  # the recipe's collector
                except queue.Empty:
                    break
            for w in workers:
                w.join(5)
            print("sent 20 answered", len(got))
            tasks.cancel_join_thread()
        """,
        timeout=60,
    )
    assert status == "done", "the recipe hung"
    answered = int(done.stdout.split()[-1])
    assert answered < 20, f"all 20 answered this time: {done.stdout}"
    print(f"\nqueue.Empty recipe: 20 sent, {answered} answered, {20 - answered} lost")
    assert kerasmp_pool.map(square, range(20)) == [i * i for i in range(20)]  # none lost
