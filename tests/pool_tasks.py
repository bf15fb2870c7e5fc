"""Module-level functions that tests send to worker processes (they travel by reference)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np


def whoami() -> dict:
    import tensorflow as tf

    return {
        "pid": os.getpid(),
        "cores": sorted(os.sched_getaffinity(0)),
        "intra": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_was_imported": "tensorflow" in sys.modules,
    }


def add(a, b=0):
    return a + b


def raise_value_error(text):
    raise ValueError(text)


def exit_now(code):
    os._exit(code)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def a_lock():
    return threading.Lock()


def scale(array, factor):
    return array * factor


def failing_initializer():
    raise RuntimeError("initializer exploded on purpose")


def exiting_initializer():
    os._exit(5)


def predict_sum(ref, x):
    t0 = time.perf_counter()
    model = ref.load()
    load_s = time.perf_counter() - t0
    from pytest_kerasmp.modelref import loaded_models

    return float(np.asarray(model(x)).sum()), load_s, id(model), loaded_models()


def build_custom(units=3):
    import keras

    @keras.saving.register_keras_serializable(package="tests")
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return 2 * x

    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(units, kernel_initializer="ones")(Doubler()(inputs)))


def echo(value):
    return value


_kept = []


def keep(array):
    """Keep a reference to an argument after the task (it must stay intact)."""
    _kept.append(array)
    return float(array.sum())


def kept_sums():
    return [float(a.sum()) for a in _kept]


def slot_env(_=None):
    import json

    return json.loads(os.environ["PYTEST_KERASMP_SLOT"])


def start_grandchild(pidfile: str, then: str = "return"):
    """Start a long-sleeping process of our own, note its pid, then return, hang or die."""
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(pidfile, "w") as f:
        f.write(str(child.pid))
    if then == "hang":
        time.sleep(120)
    elif then == "die":
        os._exit(9)
    return child.pid


def signal_self(number):
    """Die by signal ``number`` (named or not)."""
    os.kill(os.getpid(), number)
    time.sleep(10)


def signalling_initializer(number):
    os.kill(os.getpid(), number)
    time.sleep(10)


def fail_if_exists(path):
    """An initializer that fails once ``path`` exists (so only replacements fail)."""
    if os.path.exists(path):
        raise RuntimeError(f"replacement initializer fails on purpose ({path} exists)")


def say(text):
    print(text, flush=True)
    return text


def at_pin():
    """What the worker had imported, and its set-up time, when it pinned itself."""
    from pytest_kerasmp.runtime.process import bootstrap as _child

    return _child.at_pin


def sleep_then_exit(seconds, code=9):
    """Die on its own after ``seconds`` (e.g. while its pool is closing)."""
    time.sleep(seconds)
    os._exit(code)


def writeable(array):
    """Whether a task may write into its array argument in place."""
    return bool(array.flags.writeable)


def shared_mappings(_=None):
    """How many shared_empty regions this worker has mapped."""
    with open("/proc/self/maps") as maps:
        return sum("kerasmp-shared" in line for line in maps)


def filled(shape, value, dtype="float32"):
    return np.full(shape, value, dtype=dtype)


def slow_filled(shape, value, delay_s):
    time.sleep(delay_s)
    return np.full(shape, value, dtype="float32")


def niceness(_=None):
    """The niceness of every thread of this process."""
    return sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")})
