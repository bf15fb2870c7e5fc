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
import time
from concurrent.futures import Future, InvalidStateError
from typing import Any

from pytest_kerasmp.errors import (
    CALLER_INTERRUPTED,
    POOL_BROKEN,
    POOL_CLOSED,
    POOL_CLOSED_QUEUED,
    SLOT_DEAD,
    TASK_CANCELLED_QUEUED,
    TASK_CANCELLED_RUNNING,
    PoolBrokenError,
    PoolClosedError,
    TaskCancelledError,
)
from pytest_kerasmp.slots.devices import DeviceSlot

#: A slot whose worker fails to start this many times in a row is given up.
MAX_START_ATTEMPTS = 3


@dataclasses.dataclass(eq=False)
class QueuedTask:
    id: int
    call: bytes
    #: Out-of-band buffers of the call: copies (or, for the moment of a submit that hands the
    #: task to a worker at once, views of the caller's arrays); None once they are in its
    #: worker's arena, at ``layout``.
    buffers: list[Any] | None
    future: Future[Any]
    fn: str
    timeout_s: float | None
    worker: int | None = None  # run on this worker only (broadcast)
    layout: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    abandoned: str | None = None  # why its caller stopped waiting: not run, or its worker killed
    claimed: bool = False  # its future is running (taken for a worker once)
    requeued: bool = False  # put back once: its first worker died before it started
    into: Any = None  # map(into=...): the numpy array its result is copied into


@dataclasses.dataclass
class PoolStats:
    """What the pool has done.

    ``start_s`` is the time from construction to every worker ready; ``replacement_ready_s``
    the time from a worker's death to its replacement being ready, one per replacement.
    ``crashes`` counts workers that died on their own; ``timeouts`` tasks killed for time.
    """

    start_s: float | None = None
    tasks_done: int = 0
    tasks_failed: int = 0
    crashes: int = 0
    timeouts: int = 0
    replacement_ready_s: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """What crosses the seam to a pool backend: all it needs to start the pool's workers and
    replace them, and nothing of the pool's face (made by ``WorkerPool``)."""

    name: str
    slots: tuple[DeviceSlot, ...]
    start_timeout_s: float
    #: The initializer's call, pickled (run once in every worker), or None.
    init_call: bytes | None
    #: Import the session's framework in each worker before it is ready.
    warm_import: bool
    #: Whether a worker that dies is replaced (a cluster's owner restarts all of them instead).
    replace_workers: bool
    #: Where the dispatcher counts what the pool did (the pool's own ``stats``).
    stats: PoolStats


def new_task(owner: TaskQueue, id: int, call: bytes, buffers: list[Any], fn: str, timeout_s: float | None,
             worker: int | None, into: Any = None) -> QueuedTask:
    """A task and its :class:`TaskFuture`, linked so that an interrupted wait can abandon it."""
    future = TaskFuture(owner)
    task = QueuedTask(id, call, buffers, future, fn, timeout_s, worker, into=into)
    future.task, future.task_id = task, id
    return task


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` ends the process's work: Ctrl-C, SIGTERM (which the plugin and the
    lifecycle turn into a ``KeyboardInterrupt``) or ``SystemExit``. Any other exception that
    ends a wait (pytest-timeout's failure, a signal handler's own exception) is not: it ends
    only the call it interrupted."""
    return isinstance(exc, (KeyboardInterrupt, SystemExit))


def interrupted_why(where: str, exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return CALLER_INTERRUPTED.format(where=where, error=f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


class TaskFuture(Future[Any]):
    """The Future of a pool task. A wait in :meth:`result` or :meth:`exception` that ends with
    an exception other than an interrupt (see :func:`is_interrupt`) or its own ``timeout``
    abandons the task: not run if still queued; if running, its worker's stacks are taken and
    the worker is killed and replaced, so the pool serves the next call."""

    def __init__(self, owner: TaskQueue | None = None) -> None:
        super().__init__()
        self.owner = owner
        self.task: QueuedTask | None = None
        self.task_id = -1  # its task's id (kept once the task is let go)

    def result(self, timeout: float | None = None) -> Any:
        t0 = time.monotonic()
        try:
            if self.owner is not None and not self.done():
                self.owner.help_wait(self)
            return super().result(timeout)
        except BaseException as exc:
            self._interrupted(exc, timeout, t0, "Future.result()")
            raise

    def exception(self, timeout: float | None = None) -> BaseException | None:
        t0 = time.monotonic()
        try:
            return super().exception(timeout)
        except BaseException as exc:
            self._interrupted(exc, timeout, t0, "Future.exception()")
            raise

    def _interrupted(self, exc: BaseException, timeout: float | None, t0: float, where: str) -> None:
        if self.done() or self.owner is None or is_interrupt(exc):
            return
        if isinstance(exc, TimeoutError) and timeout is not None and time.monotonic() - t0 >= timeout:
            return  # the caller's own timeout: the task goes on
        self.owner.abandon([self], interrupted_why(where, exc))


def resolve(future: Future[Any], *, result: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it already has one (cancelled, or failed by close)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
    if isinstance(future, TaskFuture):  # no cycle with its task: a result (maybe a view of a
        future.task = None  # worker's arena) goes when its caller drops it, not at the next GC


class TaskQueue:
    """State every dispatcher shares: its workers (each with ``index``, ``slot``, ``state``),
    the queue, and whether the pool is closing, aborting or broken."""

    def __init__(self, pool: PoolSpec, workers: list[Any]) -> None:
        self.pool = pool  # its name, stats and how to start workers
        self.name: str = pool.name
        self.stats: PoolStats = pool.stats
        self.workers = workers
        self.lock = threading.Lock()
        self.pending: collections.deque[QueuedTask] = collections.deque()
        self.closing = False
        self.abort: str | None = None  # why running work is to be killed now
        self.dump_on_abort = False  # collect the stacks of running workers before the kill
        self.broken: str | None = None  # why nothing more can run
        self.broken_cause: BaseException | None = None  # the error behind it

    #: The dispatcher's loop (started by the pool).
    thread: threading.Thread

    def wake(self) -> None:
        """Wake the dispatcher's loop (the backend's way)."""
        raise NotImplementedError

    def kill_workers(self) -> None:
        """Kill every worker now (the pool is being terminated; the loop fails their tasks)."""
        raise NotImplementedError

    def finish(self, why: str, stop_timeout: float) -> None:
        """After the loop stopped (or is stuck): fail what is left with ``why``, end every
        worker within ``stop_timeout``, free what the dispatcher holds."""
        raise NotImplementedError

    def enqueue(self, task: QueuedTask) -> None:
        self.append(task)
        self.dispatch_now(task)

    def append(self, task: QueuedTask) -> None:
        """Queue ``task``, or refuse it: the pool is closing or broken, or its worker is dead."""
        with self.lock:
            if self.closing:  # a submit that raced close(): refused, never left unread
                raise PoolClosedError(POOL_CLOSED.format(pool=self.name, fn=task.fn))
            if self.broken is not None:
                raise self.broken_error()
            if task.worker is not None and self.workers[task.worker].state == "dead":
                raise self.broken_error(f"worker {task.worker} is dead")
            self.pending.append(task)

    def help_wait(self, future: TaskFuture) -> None:
        """The caller is about to wait for ``future``: a backend may let it fetch the answer
        itself for a moment (fewer thread switches); the default does nothing."""

    def dispatch_now(self, task: QueuedTask) -> None:
        """Get ``task`` under way: the backend's loop is woken to assign it (a backend may
        assign it from the caller's thread instead, when it can do so safely)."""
        self.wake()

    def abandon(self, futures: list[Future[Any]], why: str) -> None:
        """The caller stopped waiting for ``futures`` (``why``): their queued tasks fail now with
        :class:`TaskCancelledError`; running ones are ended by the dispatcher's loop (stacks,
        kill, replacement: ``cancel_running``)."""
        tasks = [f.task for f in futures if isinstance(f, TaskFuture) and f.task is not None and not f.done()]
        for task in tasks:
            task.abandoned = why
        with self.lock:
            queued = [t for t in tasks if t in self.pending]
            for task in queued:
                self.pending.remove(task)
        for task in queued:
            self.fail(task, self.cancelled_error(task))
        if len(queued) < len(tasks):
            self.wake()

    def cancelled_error(self, task: QueuedTask, w: Any = None, fate: str = "") -> TaskCancelledError:
        """The error of an abandoned task: not started, or (``w``) killed while it ran."""
        if w is None:
            return TaskCancelledError(TASK_CANCELLED_QUEUED.format(task=task.id, fn=task.fn, pool=self.name, why=task.abandoned))
        return TaskCancelledError(TASK_CANCELLED_RUNNING.format(
            task=task.id, fn=task.fn, index=w.index, slot=w.slot.describe(), pid=w.pid, pool=self.name,
            why=task.abandoned, fate=fate,
        ))

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
        """The next queued task idle worker ``w`` may run, taken off the queue and marked
        running; None if there is none (cancelled and abandoned tasks are skipped)."""
        while True:
            with self.lock:
                task = next((t for t in self.pending if t.worker in (None, w.index)), None)
                if task is None:
                    return None
                self.pending.remove(task)
            if task.abandoned is not None:  # abandoned just as it was taken
                self.fail(task, self.cancelled_error(task))
            elif task.claimed or task.future.set_running_or_notify_cancel():
                task.claimed = True  # running from now on, also if it is put back
                return task

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
