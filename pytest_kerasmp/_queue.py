"""The queue half of a pool's dispatcher, shared by the local and the Ray backend.

A dispatcher owns its workers and a queue of tasks; this part holds the queue and decides
what fails how: a submit after close or to a broken pool is refused, a task queued when the
pool closes fails with PoolClosedError, what only a dead slot could run fails with
PoolBrokenError (and everything, once no slot is left). How workers are watched, started and
killed is the backend's (``_dispatch.Dispatcher``: child processes; ``_ray_dispatch``:
Ray actors); each tells this part how to wake its loop.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from concurrent.futures import Future, InvalidStateError
from typing import Any

from pytest_kerasmp.errors import (
    POOL_BROKEN,
    POOL_CLOSED,
    POOL_CLOSED_QUEUED,
    SLOT_DEAD,
    PoolBrokenError,
    PoolClosedError,
)

#: A slot whose worker fails to start this many times in a row is given up.
MAX_START_ATTEMPTS = 3


@dataclasses.dataclass(eq=False)
class QueuedTask:
    id: int
    call: bytes
    buffers: list[Any]  # out-of-band buffers of the call, copied at submit
    future: Future[Any]
    fn: str
    timeout_s: float | None
    worker: int | None = None  # run on this worker only (broadcast)
    requeued: bool = False  # put back once: its first worker died before it started


def resolve(future: Future[Any], *, result: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it already has one (cancelled, or failed by close)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class TaskQueue:
    """State every dispatcher shares: its workers (each with ``index``, ``slot``, ``state``),
    the queue, and whether the pool is closing, aborting or broken."""

    def __init__(self, pool: Any, workers: list[Any]) -> None:
        self.pool = pool  # for its name, stats and how to start workers
        self.name: str = pool.name
        self.stats: Any = pool.stats
        self.workers = workers
        self.lock = threading.Lock()
        self.pending: collections.deque[QueuedTask] = collections.deque()
        self.closing = False
        self.abort: str | None = None  # why running work is to be killed now
        self.dump_on_abort = False  # collect the stacks of running workers before the kill
        self.broken: str | None = None  # why nothing more can run
        self.broken_cause: BaseException | None = None  # the error behind it

    def wake(self) -> None:
        """Wake the dispatcher's loop (the backend's way)."""
        raise NotImplementedError

    def enqueue(self, task: QueuedTask) -> None:
        with self.lock:
            if self.closing:  # a submit that raced close(): refused, never left unread
                raise PoolClosedError(POOL_CLOSED.format(pool=self.name, fn=task.fn))
            if self.broken is not None:
                raise self.broken_error()
            if task.worker is not None and self.workers[task.worker].state == "dead":
                raise self.broken_error(f"worker {task.worker} is dead")
            self.pending.append(task)
        self.wake()

    def broken_error(self, cause: str | None = None) -> PoolBrokenError:
        """The error for work this pool cannot run, with the failure behind it as cause."""
        error = PoolBrokenError(POOL_BROKEN.format(pool=self.name, cause=cause or self.broken))
        error.__cause__ = self.broken_cause
        return error

    def fail(self, task: QueuedTask, error: BaseException) -> None:
        task.buffers = []
        self.stats.tasks_failed += 1
        resolve(task.future, error=error)

    def fail_queued(self, why: str) -> None:
        """Fail every task not yet started with PoolClosedError(why)."""
        with self.lock:
            queued, self.pending = list(self.pending), collections.deque()
        for task in queued:
            self.fail(task, PoolClosedError(POOL_CLOSED_QUEUED.format(pool=self.name, why=why, task=task.id, fn=task.fn)))

    def next_task(self, w: Any) -> QueuedTask | None:
        """The next queued task idle worker ``w`` may run (taken off the queue), or None."""
        with self.lock:
            task = next((t for t in self.pending if t.worker in (None, w.index)), None)
            if task is not None:
                self.pending.remove(task)
        return task

    def claim(self, task: QueuedTask) -> bool:
        """Mark ``task`` (just taken off the queue) running; False if it was cancelled while
        queued. A task put back by :meth:`requeue` is running already."""
        return task.requeued or task.future.set_running_or_notify_cancel()

    def put_back(self, task: QueuedTask) -> None:
        """Queue ``task`` again, first in line (taken for a worker that turned out dead)."""
        with self.lock:
            self.pending.appendleft(task)

    def requeue(self, task: QueuedTask) -> bool:
        """Put back, first in line, a task whose worker died before it started (it never ran,
        so the death is not its failure); once only: False if it was put back before."""
        if task.requeued:
            return False
        task.requeued = True
        self.put_back(task)
        return True

    def give_up(self, w: Any, error: Exception, attempts: int, *, cause: str | None = None) -> None:
        """No worker can start on ``w``'s slot (after ``attempts`` starts that failed, or for
        ``cause``): fail what only it could run, or all if none is left; the last startup error
        (with the child's traceback or stacks) is the cause."""
        w.state = "dead"
        reason = str(error).split("; ")[0]
        cause = cause or SLOT_DEAD.format(pool=self.name, slot=w.slot.describe(), attempts=attempts, reason=reason)
        alive = any(x.state != "dead" for x in self.workers)
        with self.lock:
            if not alive:
                self.broken, self.broken_cause = cause, error
            doomed = [t for t in self.pending if not alive or t.worker == w.index]
            for task in doomed:
                self.pending.remove(task)
        for task in doomed:
            failure = PoolBrokenError(POOL_BROKEN.format(pool=self.name, cause=cause))
            failure.__cause__ = error
            self.fail(task, failure)
