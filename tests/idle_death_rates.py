"""How many tasks fail when submitted right after an idle worker's SIGKILL (issue 22).

    python tests/idle_death_rates.py local|ray [trials]

Each trial SIGKILLs the pool's one idle worker, waits (trial % 10) * 5 ms (0-45 ms: the window
in which such a task used to fail), submits one task and waits for it, then for the
replacement. A worker's death before it took a task must fail no task: the expected count is 0.
Ray runs on a one-node loopback cluster of its own.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pool_tasks  # noqa: E402

from pytest_kerasmp import DeviceSlot, WorkerPool  # noqa: E402


def main(backend: str, trials: int) -> None:
    cluster = None
    if backend == "ray":
        from pytest_kerasmp.ray.cluster import LocalRayCluster, plan_ray_slots

        cluster = LocalRayCluster(1, cpus_per_node=1)
        pool = WorkerPool(plan_ray_slots()[:1], backend="ray", warm_import=False, name="idle")
    else:
        slot = DeviceSlot(index=0, kind="CPU", cores=(sorted(os.sched_getaffinity(0))[0],))
        pool = WorkerPool([slot], warm_import=False, name="idle")
    failed: collections.Counter[str] = collections.Counter()
    try:
        assert pool.submit(pool_tasks.add, 1, 1).result(timeout=60) == 2
        for i in range(trials):
            pid = pool.pids()[0]
            os.kill(pid, signal.SIGKILL)
            time.sleep((i % 10) * 0.005)
            future = pool.submit(pool_tasks.add, i, 1)
            try:
                assert future.result(timeout=60) == i + 1
            except Exception as exc:
                failed[f"{type(exc).__name__}: {str(exc)[:200]}"] += 1
            deadline = time.monotonic() + 60
            while pool.pids()[0] in (pid, None) or pool._dispatcher.workers[0].state != "idle":
                assert time.monotonic() < deadline, "the worker was not replaced within 60 s"
                time.sleep(0.01)
        print(f"{backend}: {sum(failed.values())} of {trials} tasks failed (workers killed: {pool.stats.crashes})")
        for message, n in failed.items():
            print(f"  {n}x {message}")
    finally:
        pool.close(timeout=10)
        if cluster is not None:
            cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 50)
