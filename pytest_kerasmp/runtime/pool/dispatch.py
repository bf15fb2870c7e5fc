"""The pool's dispatcher: one thread that owns every worker and every queued task.

It waits on the workers' connections, their exits and a wake-up pipe together, so a dead
worker is seen at once; it gives each idle worker one task at a time, so a crash is charged
to exactly the task that was running. It fails closed: whatever goes wrong, every future is
resolved (with its result or an error that says what happened), and an unexpected error in
the dispatcher itself marks the pool broken with that cause.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading
import time
from multiprocessing.reduction import send_handle
from typing import Any

from pytest_kerasmp.errors import (
    ARENA_FAILED,
    POOL_CLOSED_RUNNING,
    PoolClosedError,
    WorkerStartupError,
    unpack_exception,
    with_stacks,
)
from pytest_kerasmp.runtime.pool.assist import CallerAssist
from pytest_kerasmp.runtime.pool.policy import DispatchPolicy
from pytest_kerasmp.runtime.pool.taskqueue import MAX_START_ATTEMPTS, PoolSpec, QueuedTask, resolve
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


class Dispatcher(CallerAssist, DispatchPolicy):
    """State and loop of one pool; ``pool.py`` is its public face (the queue: ``_queue``)."""

    workers: list[Worker]

    def __init__(self, pool: PoolSpec, backend: Any, workers: list[Worker]) -> None:
        super().__init__(pool, workers)
        self.backend = backend  # the LocalBackend that starts replacements (a cluster's own)
        #: Held while the workers' state changes: by the loop (not while it waits) and by a
        #: submitting thread that hands its task to an idle worker itself.
        self.turn = threading.RLock()
        self.watcher = Watcher()
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
                self.check_deadlines()
                self.assign()

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
            self.start_failed(w, exc)
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
                self.start_failed(w, exc)
            return
        while self._pending_message(w):  # a result sent just before dying still counts
            if not self._on_message(w):
                break
        how, hint = w.child.describe_exit()
        w.task_started = w.task_started or self._started(w)  # read before the arena is closed
        if w.task is not None and not w.task_started and w.task.buffers is None:
            w.task.buffers = w.to_worker.read(w.task.layout)  # it may be requeued: take its arrays back
        self.retire(w)
        if self.abort is not None:  # killed by terminate() or an expired close(): not a crash
            if w.task is not None:
                task, w.task = w.task, None
                self.fail(task, self._closed_running(w, task, self.abort))
            return
        self.worker_died(w, how, hint)

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

    # ------------------------------------------------------- the policy's interface

    def retire(self, w: Worker) -> None:
        w.state, w.writing = "dead", None  # (dead: its region may be reused)
        self.watcher.remove(w)
        w.child.stop(grace=0.0)
        w.to_worker.close()
        w.from_worker.close()

    def restart(self, w: Worker, crashed_at: float | None, failed_starts: int = 0) -> None:
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

    def end_now(self, w: Worker) -> None:
        w.child.kill()

    def take_stacks(self, workers: list[Worker]) -> dict[int, str | None]:
        by_pid = dump_stacks_of([w.child for w in workers])
        return {w.index: by_pid.get(w.pid) for w in workers}

    def start_timed_out(self, w: Worker) -> Exception:
        return w.child.timed_out_starting(self.pool.start_timeout_s)

    # -------------------------------------------------------------------------- tasks

    def died_unseen(self, w: Worker) -> bool:
        return readable(w.child.sentinel, 0)

    def on_death(self, w: Worker) -> None:
        self._on_exit(w)

    def hand(self, w: Worker, task: QueuedTask) -> None:
        try:
            layout = w.to_worker.write(task.buffers or ())
        except OSError as exc:
            w.state, w.task = "idle", None
            self.fail(task, OSError(ARENA_FAILED.format(task=task.id, fn=task.fn, error=exc)))
            return
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
