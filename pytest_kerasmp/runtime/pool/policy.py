"""The dispatcher policy, written once: what a pool does when a worker fails to start, overruns,
is abandoned, dies, or when the dispatcher itself fails; every event worded one way.

The local dispatcher (``pool.dispatch``) and the Ray one (``ray.dispatch``) differ in how they
learn of events (a process sentinel and a pipe; Ray's completion callbacks) and in how they
act on a worker: the small interface below. What they decide is the same:

- a start that fails or overruns its bound is retried on the same slot, up to
  ``MAX_START_ATTEMPTS`` starts, then the slot is given up (``give_up``);
- a task past its timeout, or abandoned by its caller, gets its worker's stacks, fails with
  :class:`TaskTimeoutError` or :class:`TaskCancelledError`, and its worker is ended and
  replaced;
- a worker that dies is charged with its task only if it may have started it; a task it never
  started goes back to the queue, once; the worker is then replaced, unless the pool is
  closing or its owner restarts all its processes together (a cluster), in which case what
  only it could run fails;
- an unexpected error in the dispatcher fails the pool closed: every future is resolved with
  :class:`PoolBrokenError` naming it.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from pytest_kerasmp.errors import (
    NONE_REPLACED,
    TASK_TIMED_OUT,
    WORKER_CRASHED,
    WORKER_DIED_BEFORE_START,
    WORKER_GONE,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerCrashedError,
    with_stacks,
)
from pytest_kerasmp.runtime.pool.taskqueue import MAX_START_ATTEMPTS, TaskQueue

#: What happens to a worker that ended, in the one wording every error uses.
FATE_REPLACED = "the pool is starting a replacement on the same slot"
FATE_CLOSING = "it was not replaced: the pool is closing"
FATE_OWNER_RESTARTS = "it was not replaced: its owner restarts all its processes together"


class DispatchPolicy(TaskQueue):
    """The decisions of every dispatcher, over the interface it implements (below)."""

    #: Set when the dispatcher failed closed (its loop ends; a caller's thread may set it).
    failed_closed = False

    # ------------------------------------------------ the interface a dispatcher implements

    def end_now(self, w: Any) -> None:
        """End worker ``w`` now (a kill: no grace), its task left to the caller."""
        raise NotImplementedError

    def retire(self, w: Any) -> None:
        """``w`` will not run again: mark it dead and free what it holds (its process or
        actor ended, its connection and arenas closed)."""
        raise NotImplementedError

    def restart(self, w: Any, crashed_at: float | None, failed_starts: int) -> None:
        """Start a replacement of ``w`` on its slot (``failed_starts`` so far), or give the
        slot up (``give_up``) when none can start."""
        raise NotImplementedError

    def take_stacks(self, workers: list[Any]) -> dict[int, str | None]:
        """The Python stacks of ``workers``, by worker index (None where one gave none)."""
        raise NotImplementedError

    def start_timed_out(self, w: Any) -> Exception:
        """The error of ``w``'s start past ``start_timeout_s`` (with what it printed)."""
        raise NotImplementedError

    def after_overdue(self, w: Any) -> None:
        """``w`` was killed for its overdue task, which has failed: have it replaced (the
        local loop replaces it when it sees the exit)."""

    def slot_lost(self, w: Any) -> str | None:
        """Why no replacement can start on ``w``'s slot at all (its node left), or None."""
        return None

    def died_unseen(self, w: Any) -> bool:
        """Whether idle ``w`` is known dead already, though its death is not handled yet."""
        raise NotImplementedError

    def on_death(self, w: Any) -> None:
        """Handle the death of ``w`` (retire it, then ``worker_died``, the backend's way)."""
        raise NotImplementedError

    def hand(self, w: Any, task: Any) -> None:
        """Send ``task`` to ``w`` (now busy with it) and set its deadline; a failure to send is
        the backend's to resolve (the task is ``w``'s: whatever happens resolves it)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ the policy

    def fate(self, w: Any) -> str:
        """What happens to ``w`` now that it ended, in words (``worker_died`` does it)."""
        if self.closing:
            return FATE_CLOSING
        if not self.pool.replace_workers:
            return FATE_OWNER_RESTARTS
        return self.slot_lost(w) or FATE_REPLACED

    def assign(self) -> None:
        """Give each idle worker the next task it may run, one at a time (so that a death is
        charged to exactly the task that ran); a worker found dead gets none."""
        for w in self.workers:
            if w.state != "idle":
                continue
            task = self.next_task(w)
            if task is None:
                continue
            if self.died_unseen(w):  # it died since the last look: never given a task
                self.put_back(task)
                self.on_death(w)
                continue
            w.state, w.task, w.task_started = "busy", task, False  # from here on a failure of any kind resolves it
            self.hand(w, task)

    def start_failed(self, w: Any, error: Exception) -> None:
        """``w``'s start failed with ``error``: try again on its slot, or give the slot up."""
        self.retire(w)
        attempts = w.failed_starts + 1
        if attempts < MAX_START_ATTEMPTS and not self.closing and self.abort is None:
            self.restart(w, w.crashed_at, attempts)
        else:
            self.give_up(w, error, attempts)

    def check_deadlines(self) -> None:
        """Fail a start past its bound; end running tasks past their timeout, or abandoned by
        their caller: their stacks first (all at once), then the error, then the worker."""
        now = time.monotonic()
        ending: list[Any] = []
        for w in self.workers:
            if w.state == "dead":
                continue
            expired = w.deadline is not None and now >= w.deadline
            if w.state == "starting" and expired:
                w.deadline = None
                self.start_failed(w, self.start_timed_out(w))
            elif w.task is not None and (expired or w.task.abandoned is not None):
                ending.append(w)
        if not ending:
            return
        stacks = self.take_stacks(ending)
        for w in ending:
            task, w.task, w.deadline = w.task, None, None
            w.killed = True
            self.end_now(w)  # before its caller hears: it may be writing into the caller's array
            fate = self.fate(w)
            if task.abandoned is not None:
                error: TaskCancelledError | TaskTimeoutError = self.cancelled_error(task, w, fate)
            else:
                self.stats.timeouts += 1
                error = TaskTimeoutError(TASK_TIMED_OUT.format(
                    task=task.id, fn=task.fn, timeout=task.timeout_s, index=w.index,
                    slot=w.slot.describe(), pid=w.pid, fate=fate,
                ))
            self.fail(task, with_stacks(error, stacks.get(w.index)))
            self.after_overdue(w)

    def worker_died(self, w: Any, how: str, hint: str, cause: BaseException | None = None) -> None:
        """``w`` died (``how``; ``hint``: what to do) and is retired: its task fails if it may
        have started it (else it goes back to the queue, once); then it is replaced, or what
        only it could run fails."""
        if not w.killed:
            self.stats.crashes += 1
        task, w.task, w.deadline = w.task, None, None
        if task is not None and not w.task_started and self.requeue(task):
            task = None  # it never started the task: the task never ran and runs again
        if task is not None:
            crash = WorkerCrashedError((WORKER_CRASHED if w.task_started else WORKER_DIED_BEFORE_START).format(
                index=w.index, slot=w.slot.describe(), pid=w.pid, pool=self.name,
                how=how, task=task.id, fn=task.fn, fate=self.fate(w), hint=hint,
            ))
            if cause is not None:
                crash.__cause__ = cause
            self.fail(task, crash)
        if self.closing:
            return
        if self.pool.replace_workers:
            self.restart(w, time.monotonic(), 0)
            return
        alive = any(x.state != "dead" for x in self.workers)  # not replaced: what only it could run never runs
        with self.lock:
            if not alive:
                self.broken = NONE_REPLACED
            doomed = [t for t in self.pending if t.worker == w.index or not alive]
            for queued in doomed:
                self.pending.remove(queued)
        for queued in doomed:
            self.fail(queued, WorkerCrashedError(WORKER_GONE.format(
                index=w.index, slot=w.slot.describe(), pid=w.pid, pool=self.name, how=how, task=queued.id, fn=queued.fn,
            )) if queued.worker == w.index else self.broken_error())

    def fail_closed(self, exc: BaseException) -> None:
        """An unexpected error in the dispatcher's work (in its thread, or a caller's doing
        it): every future is resolved with PoolBrokenError naming it; the pool is broken."""
        self.failed_closed = True
        with self.lock:
            self.broken, self.broken_cause = f"its dispatcher thread failed with {type(exc).__name__}: {exc}", exc
            queued, self.pending = list(self.pending), collections.deque()
        running = [w.task for w in self.workers if w.task is not None]
        for w in self.workers:
            w.task = None
            self.end_now(w)
        for task in queued + running:
            self.fail(task, self.broken_error())
        self.wake()  # the loop sees the pool broken and ends


__all__ = ["FATE_CLOSING", "FATE_OWNER_RESTARTS", "FATE_REPLACED", "DispatchPolicy"]
