"""Functions the cluster tests run in every task of a TFCluster (importable by the tasks)."""

from __future__ import annotations

import json
import os
import signal
import time

_strategy = None


def strategy():
    """The task's MultiWorkerMirroredStrategy, made in its first call and kept (as user code does)."""
    global _strategy
    if _strategy is None:
        import tensorflow as tf

        _strategy = tf.distribute.MultiWorkerMirroredStrategy()
    return _strategy


def describe() -> dict:
    """Where the task runs and what it was told, before it runs any op."""
    from tensorflow.python.eager import context

    from pytest_kerasmp import current_slot, task_info

    return {
        "pid": os.getpid(),
        "task": task_info(),
        "tf_config": json.loads(os.environ["TF_CONFIG"]),
        "cores": sorted(os.sched_getaffinity(0)),
        "slot": current_slot().to_json(),
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "growth": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH"),
        "context_initialized": context.context()._context_handle is not None,
    }


def all_reduce_rank() -> tuple[float, int, float | None]:
    """Sum of (task index + 1) over the tasks, the replicas in sync, and the strategy's collective timeout."""
    import tensorflow as tf

    from pytest_kerasmp import task_info

    s = strategy()
    value = float(task_info()[1] + 1)
    out = s.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", tf.constant(value)))
    return float(s.experimental_local_results(out)[0]), s.num_replicas_in_sync, s.extended._communication_options.timeout_seconds


def train_steps(steps: int, die_at: int | None = None, victim: int = 1) -> int:
    """All-reduce a gradient-sized tensor ``steps`` times; task ``victim`` SIGKILLs itself at step ``die_at``."""
    import tensorflow as tf

    from pytest_kerasmp import task_info

    s, rank = strategy(), task_info()[1]
    grad = tf.ones((256, 256))
    for step in range(steps):
        if step == die_at and rank == victim:
            print(f"task {rank} dies at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        s.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", grad))
    return steps


def raise_in(victim: int) -> str:
    from pytest_kerasmp import task_info

    if task_info()[1] == victim:
        print("about to fail: the learning rate is negative", flush=True)
        raise ValueError("learning rate must be positive, got -0.1")
    time.sleep(60)  # the healthy task would wait for the other in a collective
    return "done"


def sleep_in(victim: int, seconds: float) -> str:
    from pytest_kerasmp import task_info

    if task_info()[1] == victim:
        time.sleep(seconds)
    return "done"


def late_second_collective(seconds: float) -> str:
    """Both tasks all-reduce once; then task 1 arrives ``seconds`` late at the second."""
    from pytest_kerasmp import task_info

    all_reduce_rank()
    if task_info()[1] == 1:
        time.sleep(seconds)
    all_reduce_rank()
    return "done"


def race_for_claims(directory: str, first_port: int, n: int, barrier, queue) -> None:
    """Claim ports first_port.. one by one, in step with another racer (a port test)."""
    from pathlib import Path

    from pytest_kerasmp.runtime.cluster import ports

    won = []
    for port in range(first_port, first_port + n):
        barrier.wait(timeout=30)
        if ports.claim(Path(directory), port):
            won.append(port)
    queue.put(won)
