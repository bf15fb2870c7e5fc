"""The pool's dispatcher: one thread that owns every worker and every queued task.

It waits on the workers' connections, their exits and a wake-up pipe together, so a dead
worker is seen at once; it gives each idle worker one task at a time, so a crash is charged
to exactly the task that was running. It fails closed: whatever goes wrong, every future is
resolved (with its result or an error that says what happened), and an unexpected error in
the dispatcher itself marks the pool broken with that cause.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import threading
import time
from multiprocessing.reduction import send_handle
from typing import Any

from pytest_kerasmp.errors import (
    ARENA_FAILED,
    NONE_REPLACED,
    POOL_CLOSED_RUNNING,
    TASK_TIMED_OUT,
    WORKER_CRASHED,
    WORKER_DIED_BEFORE_START,
    WORKER_GONE,
    PoolClosedError,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerStartupError,
    unpack_exception,
    with_stacks,
)
from pytest_kerasmp.runtime.pool.assist import CallerAssist
from pytest_kerasmp.runtime.pool.taskqueue import MAX_START_ATTEMPTS, QueuedTask, TaskQueue, resolve
from pytest_kerasmp.runtime.process.childio import dump_stacks_of
from pytest_kerasmp.runtime.process.lifecycle import Child
from pytest_kerasmp.runtime.process.watcher import Watcher, readable
from pytest_kerasmp.runtime.wire.messages import Done, Failed, Ready, Stop, Task
from pytest_kerasmp.runtime.wire.shared import SentRegions
from pytest_kerasmp.runtime.wire.transport import Arena, ResultArenas
from pytest_kerasmp.slots.devices import DeviceSlot

#: The dispatcher wakes at least this often even when nothing happens.
IDLE_POLL_S = 0.5
@dataclasses.dataclass(eq=False)
class Worker:
    index: int
    slot: DeviceSlot
    child: Child
    state: str = "starting"  # starting | idle | busy | dead
    task: QueuedTask | None = None
    task_started: bool = False  # it marked its task started: a death now is the task's failure
    deadline: float | None = None
    failed_starts: int = 0
    crashed_at: float | None = None  # when its predecessor died (replacement time)
    killed: bool = False  # by the pool (timeout): not a crash
    to_worker: Arena = dataclasses.field(default_factory=lambda: Arena(header=True))  # marked with task id + 1
    from_worker: ResultArenas = dataclasses.field(default_factory=ResultArenas)  # results: views, no copy
    regions: SentRegions = dataclasses.field(default_factory=SentRegions)  # shared arrays it has mapped
    writing: Any = None  # the shared array its task writes into, held until it is done or buried

    @property
    def pid(self) -> int:
        return self.child.pid


class Dispatcher(CallerAssist, TaskQueue):
    """State and loop of one pool; ``pool.py`` is its public face (the queue: ``_queue``)."""

    workers: list[Worker]

    def __init__(self, pool: Any, backend: Any, workers: list[Worker]) -> None:
        super().__init__(pool, workers)
        self.backend = backend  # the LocalBackend that starts replacements (a cluster's own)
        #: Held while the workers' state changes: by the loop (not while it waits) and by a
        #: submitting thread that hands its task to an idle worker itself.
        self.turn = threading.RLock()
        self.watcher = Watcher()
        self.failed_closed = False
        for w in workers:
            self.watcher.add(w)
        self.thread = threading.Thread(target=self.run, name=f"kerasmp-{self.name}-dispatch", daemon=True)

    # ------------------------------------------------------------------ called by the pool

    def wake(self) -> None:
        self.watcher.wake()

    def fail_everything(self, why: str, stacks: dict[int, str | None] | None = None) -> None:
        """Fail what is queued and running with PoolClosedError(why), killing busy workers
        (``stacks``, by pid, are attached to their tasks). From the dispatcher thread, or
        from the caller once the dispatcher has stopped (or is stuck)."""
        self.fail_queued(why)
        for w in self.workers:
            if w.task is not None:
                task, w.task = w.task, None
                w.child.kill()
                self.fail(task, with_stacks(self._closed_running(w, task, why), (stacks or {}).get(w.child.pid)))

    def kill_workers(self) -> None:
        """SIGKILL every worker now (terminate): the loop then fails their tasks."""
        for w in self.workers:
            w.child.kill()

    def finish(self, why: str, stop_timeout: float) -> None:
        """After the loop stopped (or is stuck): fail what is left with ``why``, end every
        worker within ``stop_timeout`` (idle ones are asked first), close the wake-up pipe."""
        self.fail_everything(why)
        self.stop_workers(stop_timeout)
        self.close_fds()

    def close_fds(self) -> None:
        self.watcher.close()

    # -------------------------------------------------------------------------- the loop

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self.fail_closed(exc)

    def fail_closed(self, exc: BaseException) -> None:
        """An unexpected error in the dispatcher's work (in its thread, or a caller's doing it):
        every future is resolved with PoolBrokenError naming it, and the pool is broken."""
        cause = f"its dispatcher thread failed with {type(exc).__name__}: {exc}"
        self.failed_closed = True
        with self.lock:
            self.broken, self.broken_cause = cause, exc
            queued, self.pending = list(self.pending), collections.deque()
        running = [w.task for w in self.workers if w.task is not None]
        for w in self.workers:
            w.task = None
            w.child.kill()
        for task in queued + running:
            self.fail(task, self.broken_error())
        self.wake()  # the loop sees the pool broken and ends

    def _loop(self) -> None:
        while not self.failed_closed:  # a caller's thread may fail it closed too
            if self.abort is not None:
                self._abort_now(self.abort)
                return
            with self.lock:
                busy = any(w.state == "busy" for w in self.workers)
                if self.closing and not busy and not self.pending:
                    return
            live = [w for w in self.workers if w.state != "dead"]
            if self.closing and not live:
                self.fail_everything("its last worker died during close()")
                return
            deadlines = [w.deadline for w in live if w.deadline is not None]
            timeout = IDLE_POLL_S
            if deadlines:
                timeout = max(0.0, min(timeout, min(deadlines) - time.monotonic()))
            messages, exits = self.watcher.wait(timeout)
            with self.turn:
                for w in messages:  # a waiting caller may have read it meanwhile (help_wait)
                    if w.state != "dead" and self._pending_message(w):
                        self._on_message(w)
                for w in exits:
                    self._on_exit(w)
                self._check_deadlines()
                self._assign()

    def _abort_now(self, why: str) -> None:
        """Kill running work (its stacks first, when a close timed out), fail it and
        everything queued, with ``why``."""
        busy = [w.child for w in self.workers if w.task is not None]
        self.fail_everything(why, dump_stacks_of(busy) if self.dump_on_abort else None)

    # -------------------------------------------------------------------------- messages

    def _on_message(self, w: Worker) -> bool:
        """Handle one message from ``w``; False when its connection is closed (it died)."""
        if w.state == "dead":
            return False
        if w.state == "starting":
            return self._on_startup(w)
        try:
            msg = w.child.conn.recv()
            if isinstance(msg, Done) and msg.grew:
                w.from_worker.receive(w.child.conn)
        except (EOFError, OSError):
            return False  # it died; its exit says how
        if isinstance(msg, (Done, Failed)) and w.task is not None and w.task.id == msg.id:
            task, wrote_into = w.task, w.writing is not None  # (the worker wrote into a shared array)
            w.task, w.state, w.deadline, w.writing = None, "idle", None, None
            if msg.retired:  # the task kept a view of its arguments' arena: leave it to the worker
                w.to_worker.close()
            if isinstance(msg, Done) and wrote_into:
                self.stats.tasks_done += 1
                resolve(task.future, result=task.into)
            elif isinstance(msg, Done):
                self._resolve(task, msg.data, w.from_worker.take(msg.layout))
            else:
                self.fail(task, unpack_exception(msg.exc, msg.text))
        return True

    def _on_startup(self, w: Worker) -> bool:
        try:
            ready = w.child.poll_startup()
        except WorkerStartupError as exc:
            self._start_failed(w, exc)
            return False
        if isinstance(ready, Ready):
            w.state, w.deadline, w.failed_starts = "idle", None, 0
            if w.crashed_at is not None:
                self.stats.replacement_ready_s.append(time.monotonic() - w.crashed_at)
        return True

    def _resolve(self, task: QueuedTask, data: bytes, buffers: list[Any]) -> None:
        try:
            result = pickle.loads(data, buffers=buffers)
        except Exception as exc:
            self.fail(task, TypeError(f"the result of task {task.id} ({task.fn}) could not be unpickled: {exc}"))
            return
        self.stats.tasks_done += 1
        resolve(task.future, result=result)

    # ---------------------------------------------------------------------- deaths, starts

    def _on_exit(self, w: Worker) -> None:
        if w.state == "dead":
            return
        if w.state == "starting":
            try:
                w.child.poll_startup()
            except WorkerStartupError as exc:
                self._start_failed(w, exc)
            return
        while self._pending_message(w):  # a result sent just before dying still counts
            if not self._on_message(w):
                break
        how, hint = w.child.describe_exit()
        w.task_started = w.task_started or self._started(w)  # read before the arena is closed
        if w.task is not None and not w.task_started and w.task.buffers is None:
            w.task.buffers = w.to_worker.read(w.task.layout)  # it may be requeued: take its arrays back
        self._bury(w)
        if self.abort is not None:  # killed by terminate() or an expired close(): not a crash
            if w.task is not None:
                task, w.task = w.task, None
                self.fail(task, self._closed_running(w, task, self.abort))
            return
        if not w.killed:
            self.stats.crashes += 1
        replace = not self.closing and self.pool.replace_workers
        if w.task is not None and not w.task_started and self.requeue(w.task):
            w.task = None  # it never marked it started: the task never ran, and goes back to the queue (once)
        if w.task is not None:
            task, w.task = w.task, None
            fate = (
                "the pool is starting a replacement on the same slot" if replace
                else "it was not replaced: the pool is closing" if self.closing
                else "it was not replaced: its owner restarts all its processes together"
            )
            self.fail(task, WorkerCrashedError((WORKER_CRASHED if w.task_started else WORKER_DIED_BEFORE_START).format(
                index=w.index, slot=w.slot.describe(), pid=w.pid, pool=self.name,
                how=how, task=task.id, fn=task.fn, fate=fate, hint=hint,
            )))
        if replace:
            self._restart(w, crashed_at=time.monotonic())
        elif not self.closing:  # not replaced: what only this worker could run never runs now
            alive = any(x.state != "dead" for x in self.workers)
            with self.lock:
                if not alive:
                    self.broken = NONE_REPLACED
                doomed = [t for t in self.pending if t.worker == w.index or not alive]
                for task in doomed:
                    self.pending.remove(task)
            for task in doomed:
                self.fail(task, WorkerCrashedError(WORKER_GONE.format(
                    index=w.index, slot=w.slot.describe(), pid=w.pid, pool=self.name, how=how, task=task.id, fn=task.fn,
                )) if task.worker == w.index else self.broken_error())

    @staticmethod
    def _started(w: Worker) -> bool:
        """Whether ``w`` marked its task started in the arena it got it through (it does so
        before any of the task runs: a worker that died without it never started the task)."""
        return w.task is not None and w.to_worker.marked() == w.task.id + 1

    @staticmethod
    def _pending_message(w: Worker) -> bool:
        try:
            return w.child.conn.poll()
        except (OSError, ValueError):  # closed, or broken by the death
            return False

    def _bury(self, w: Worker) -> None:
        w.state, w.writing = "dead", None  # (dead: its region may be reused)
        self.watcher.remove(w)
        w.child.stop(grace=0.0)
        w.to_worker.close()
        w.from_worker.close()

    def _restart(self, w: Worker, crashed_at: float | None, failed_starts: int = 0) -> None:
        while True:
            try:
                child = self.backend.start_child(self.pool, w.index, w.slot)
                break
            except Exception as exc:  # e.g. out of file descriptors: counts as a failed start
                failed_starts += 1
                if failed_starts >= MAX_START_ATTEMPTS:
                    self.give_up(w, exc, failed_starts)
                    return
        new = Worker(index=w.index, slot=w.slot, child=child, crashed_at=crashed_at, failed_starts=failed_starts)
        new.deadline = time.monotonic() + self.pool.start_timeout_s
        self.workers[w.index] = new
        self.watcher.add(new)

    def _start_failed(self, w: Worker, error: Exception) -> None:
        self._bury(w)
        attempts = w.failed_starts + 1
        if attempts < MAX_START_ATTEMPTS and not self.closing and self.abort is None:
            self._restart(w, w.crashed_at, attempts)
        else:
            self.give_up(w, error, attempts)

    def _check_deadlines(self) -> None:
        """Fail a start past its bound; end running tasks past their timeout, or abandoned by
        their caller: their stacks first (all at once), then the kill; the exit replaces them."""
        now = time.monotonic()
        ending: list[Worker] = []
        for w in self.workers:
            if w.state == "dead":
                continue
            expired = w.deadline is not None and now >= w.deadline
            if w.state == "starting" and expired:
                w.deadline = None
                self._start_failed(w, w.child.timed_out_starting(self.pool.start_timeout_s))
            elif w.task is not None and (expired or w.task.abandoned is not None):
                ending.append(w)
        if not ending:
            return
        stacks = dump_stacks_of([w.child for w in ending])
        fate = "the pool is starting a replacement" if not self.closing else "not replaced: the pool is closing"
        for w in ending:
            task, w.task, w.deadline = w.task, None, None
            assert task is not None
            w.killed = True
            w.child.kill()  # its exit shows next round: _on_exit replaces it
            if task.abandoned is not None:
                error: TaskCancelledError | TaskTimeoutError = self.cancelled_error(task, w, fate)
            else:
                self.stats.timeouts += 1
                error = TaskTimeoutError(TASK_TIMED_OUT.format(
                    task=task.id, fn=task.fn, timeout=task.timeout_s, index=w.index,
                    slot=w.slot.describe(), pid=w.pid, fate=fate,
                ))
            self.fail(task, with_stacks(error, stacks.get(w.pid)))

    def _assign(self) -> None:
        for w in self.workers:
            if w.state != "idle":
                continue
            task = self.next_task(w)
            if task is None:
                continue
            if readable(w.child.sentinel, 0):  # it died since the last look: never given a task
                self.put_back(task)
                self._on_exit(w)
                continue
            w.state, w.task, w.task_started = "busy", task, False  # from here on a failure of any kind resolves it
            try:
                layout = w.to_worker.write(task.buffers or ())
            except OSError as exc:
                w.state, w.task = "idle", None
                self.fail(task, OSError(ARENA_FAILED.format(task=task.id, fn=task.fn, error=exc)))
                continue
            task.buffers, task.layout = None, layout  # in the worker's arena now (read back if requeued)
            out, fresh_out = w.from_worker.choose()
            into, drop, new = w.regions.route(task.into)
            w.writing = task.into if into is not None else None
            try:
                w.child.conn.send(Task(
                    task.id, task.call, layout, w.to_worker.fresh, out, fresh_out, into, drop, tuple(r.id for r in new),
                ))
                w.to_worker.hand_over(w.child.conn)
                for region in new:
                    send_handle(w.child.conn, region.fd, 0)
            except OSError:  # it died just now, before it could mark the task started: its exit requeues it
                pass
            w.deadline = time.monotonic() + task.timeout_s if task.timeout_s else None

    def _closed_running(self, w: Worker, task: QueuedTask, why: str) -> PoolClosedError:
        return PoolClosedError(POOL_CLOSED_RUNNING.format(
            pool=self.name, why=why, task=task.id, fn=task.fn, index=w.index, slot=w.slot.describe(), pid=w.pid,
        ))

    def stop_workers(self, timeout: float) -> None:
        """Ask idle workers to stop, then end every worker within ``timeout`` (+ kill)."""
        for w in self.workers:
            if w.child.is_alive():
                w.child.audit_network()  # what it listened on, before it closes its sockets
            if w.state == "idle":
                try:
                    w.child.conn.send(Stop())
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        for w in self.workers:
            self.watcher.remove(w)
            w.child.stop(grace=max(0.0, deadline - time.monotonic()) if w.state == "idle" else 0.0)
            w.state = "dead"
            w.to_worker.close()
            w.from_worker.close()
