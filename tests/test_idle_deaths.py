"""A worker's death is charged to a task only when the worker may have started it, on both
backends: a worker found dead before a task is sent gets no task, and a task whose worker
died before taking it goes back to the queue once (a second such death fails it, saying so).

Each test kills idle workers right before a submit, the race that used to fail the next task
(about 1 in 5 submits within 50 ms of the kill, local and Ray alike); each bounds its waits.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

import pool_tasks
from pytest_kerasmp import PoolBrokenError, WorkerCrashedError, WorkerPool
from pytest_kerasmp.runtime.pool import dispatch as _dispatch
from pytest_kerasmp.errors import WORKER_DIED_BEFORE_START
from pytest_kerasmp.runtime.process.lifecycle import describe_exit
from cpu_slots import CPU0



def wait_replaced(pool: WorkerPool, old: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while pool.pids()[0] in (old, None) or pool._dispatcher.workers[0].state != "idle":
        assert time.monotonic() < deadline, f"worker {old} was not replaced within {within} s"
        time.sleep(0.01)


def kill_idle_then_submit(pool: WorkerPool, trials: int) -> list[BaseException]:
    """SIGKILL the idle worker, submit at once; the tasks' errors (none expected)."""
    errors = []
    for i in range(trials):
        old = pool.pids()[0]
        os.kill(old, signal.SIGKILL)
        future = pool.submit(pool_tasks.add, i, 1)
        try:
            assert future.result(timeout=30) == i + 1
        except (WorkerCrashedError, PoolBrokenError) as exc:
            errors.append(exc)
        wait_replaced(pool, old)
    return errors


def test_a_task_submitted_right_after_an_idle_worker_died_runs(make_pool, execution_backend):
    trials = 10 if execution_backend[0] == "local" else 5  # a Ray actor takes seconds to replace
    pool = make_pool()
    assert pool.submit(pool_tasks.add, 0, 0).result(timeout=30) == 0
    time.sleep(0.2)  # idle since an earlier round (on Ray: the next task is taken before it runs)
    assert kill_idle_then_submit(pool, trials) == []
    assert pool.stats.crashes == trials and pool.stats.tasks_failed == 0 and pool.stats.tasks_done == trials + 1


def test_local_a_task_its_worker_never_started_is_requeued_once_then_fails_saying_so(no_leftovers, monkeypatch):
    """The pool does not see the workers' mark (as if each died before making it): the task
    that kills its worker is put back once, then fails with the message for that."""
    monkeypatch.setattr(_dispatch.Dispatcher, "_started", staticmethod(lambda w: False))
    with WorkerPool([CPU0], warm_import=False, name="requeue") as pool:
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashedError) as info:
            pool.submit(pool_tasks.kill_self).result(timeout=30)
        assert time.monotonic() - t0 < 20
        message = str(info.value)
        pid = int(re.search(r", pid (\d+)\)", message).group(1))  # the second worker's
        assert message == WORKER_DIED_BEFORE_START.format(
            index=0, slot=CPU0.describe(), pid=pid, pool="requeue", how="SIGKILL", task=0, fn="pool_tasks:kill_self",
            fate="the pool is starting a replacement on the same slot", hint=describe_exit(-signal.SIGKILL)[1],
        )
        assert pool.stats.crashes == 2 and pool.stats.tasks_failed == 1  # requeued once, run twice
        assert pool.submit(pool_tasks.add, 1, 2).result(timeout=30) == 3


def test_local_a_task_that_was_running_still_fails_with_its_worker(no_leftovers):
    with WorkerPool([CPU0], warm_import=False, name="running") as pool:
        with pytest.raises(WorkerCrashedError, match=r"died with SIGKILL while running task 0 \(pool_tasks:kill_self\)"):
            pool.submit(pool_tasks.kill_self).result(timeout=30)
        assert pool.stats.crashes == 1
