"""The dispatcher of the Ray backend's pool: one thread that owns the actors and the queue.

As the local ``_dispatch``: one task at a time per worker, so a death is charged to exactly
the task that ran; Ray's completion callbacks only post events to this thread; whatever
goes wrong, every future is resolved, and an error of the thread itself breaks the pool.

A death is charged to a task only when the actor may have started it. Ray tells of an
actor's death some milliseconds after it happened and cannot tell whether a call it fails
had begun, so a task goes straight to an actor (``run``) only in the round in which the
actor's previous answer arrived; an actor idle since earlier first takes the task without
running it (``accept``, then ``run_accepted``), and a task whose actor died before taking
it goes back to the queue, once. An actor whose death Ray has already reported is given
no task at all.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any

from pytest_kerasmp.errors import (
    POOL_CLOSED_QUEUED,
    POOL_CLOSED_RUNNING,
    RAY_STARTUP_TIMED_OUT,
    SLOT_NODE_GONE,
    PoolClosedError,
    WorkerStartupError,
    unpack_exception,
    with_stacks,
)
from pytest_kerasmp.ray.cluster import kill_actor, node_alive
from pytest_kerasmp.runtime.pool.policy import DispatchPolicy
from pytest_kerasmp.runtime.pool.taskqueue import PoolSpec, QueuedTask, resolve
from pytest_kerasmp.runtime.wire.messages import Failed
from pytest_kerasmp.slots import placement
from pytest_kerasmp.slots.devices import DeviceSlot

IDLE_POLL_S = 0.5
STACKS_S = 1.0


def ray_failure(exc: BaseException, node: str = "") -> tuple[str, str]:
    """How a Ray actor on ``node`` ended, from Ray's error (and whether its node is still in
    the cluster), and a hint (as ``describe_exit``)."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("\t")]
    detail = next((ln for ln in lines[1:] if "died" in ln or "exit" in ln.lower()), lines[-1] if lines else text)
    detail = detail.split(" Some common causes")[0]
    if "node has died" in text or "node was terminated" in text or (node and not node_alive(node)):
        return f"its node's end (Ray: {detail})", "check that node's raylet log for why it left"
    return f"the end of its Ray worker process (Ray: {detail})", (
        "a SIGKILL is usually the OOM killer: lower the batch size or the number of slots per node"
    )

@dataclasses.dataclass(eq=False)
class RayWorker:
    index: int
    slot: DeviceSlot
    actor: Any
    ready: Any  # the ObjectRef of its ready() call
    gen: int
    state: str = "starting"  # starting | idle | busy | dead
    pid: int | None = None
    ip: str = ""
    task: QueuedTask | None = None
    task_started: bool = False  # its task went to ``run``: a death now is the task's failure
    fresh: bool = False  # it answered in this round of the dispatcher: alive a moment ago
    watch: Any = None  # the future of its watch() call: done once Ray reports its death
    ref: Any = None
    deadline: float | None = None
    failed_starts: int = 0
    crashed_at: float | None = None
    killed: bool = False

class RayDispatcher(DispatchPolicy):
    """One thread that owns the workers and the queue of a :class:`RayWorkerPool`."""

    workers: list[RayWorker]

    def __init__(self, pool: PoolSpec, backend: Any, workers: list[RayWorker]) -> None:
        super().__init__(pool, workers)
        self.backend = backend  # the RayPoolBackend that starts replacements
        self.ray = backend.ray
        self.events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name=f"kerasmp-{self.name}-ray-dispatch", daemon=True)

    def post(self, event: tuple[Any, ...]) -> None:
        self.events.put(event)

    def wake(self) -> None:
        self.post(("wake",))

    def fail_everything(self, why: str, stacks: dict[int, str | None] | None = None) -> None:
        self.fail_queued(why)
        for w in self.workers:
            if w.task is not None:
                task, w.task = w.task, None
                kill_actor(w.actor)
                if not w.task_started:  # it had not taken the task yet: the task never ran
                    self.fail(task, PoolClosedError(POOL_CLOSED_QUEUED.format(pool=self.name, why=why, task=task.id, fn=task.fn)))
                    continue
                error = PoolClosedError(POOL_CLOSED_RUNNING.format(
                    pool=self.name, why=why, task=task.id, fn=task.fn, index=w.index, slot=w.slot.describe(), pid=w.pid,
                ))
                self.fail(task, with_stacks(error, (stacks or {}).get(w.index)))

    def kill_workers(self) -> None:
        """Kill every actor now (terminate): the loop then fails their tasks."""
        for w in self.workers:
            kill_actor(w.actor)

    def finish(self, why: str, stop_timeout: float) -> None:
        """After the loop stopped: fail what is left with ``why``, kill every actor."""
        self.fail_everything(why)
        for w in self.workers:
            w.state = "dead"
            kill_actor(w.actor)
            placement.release(w.pid)

    # ------------------------------------------------------------------------- the loop

    def run(self) -> None:
        try:
            for w in self.workers:
                w.watch = self._watch("gone", w, w.actor.watch.remote())
            self._loop()
        except BaseException as exc:
            self.fail_closed(exc)

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            deadlines = [w.deadline for w in self.workers if w.deadline is not None and w.state != "dead"]
            timeout = max(0.0, min([IDLE_POLL_S, *(d - now for d in deadlines)]))
            events: list[tuple[Any, ...]] = []
            try:
                events.append(self.events.get(timeout=timeout))
                while True:
                    events.append(self.events.get_nowait())
            except queue.Empty:
                pass
            for event in events:
                self._on_event(event)
            if self.abort is not None:
                busy = [w for w in self.workers if w.task is not None]
                self.fail_everything(self.abort, self.take_stacks(busy) if self.dump_on_abort else None)
                return
            self.check_deadlines()
            self.assign()
            with self.lock:
                busy_now = any(w.state == "busy" for w in self.workers)
                if self.closing and not busy_now and not self.pending:
                    return
            if self.closing and not any(w.state != "dead" for w in self.workers):
                self.fail_everything("its last worker died during close()")
                return

    def _watch(self, kind: str, w: RayWorker, ref: Any) -> Any:
        gen = w.gen
        future = ref.future()
        future.add_done_callback(lambda f: self.post((kind, w.index, gen, f)))
        return future

    def _on_event(self, event: tuple[Any, ...]) -> None:
        if event[0] == "wake":
            return
        kind, index, gen, future = event
        w = self.workers[index]
        if w.gen != gen or w.state == "dead":
            return
        error = future.exception()
        if kind == "ready":
            if w.state != "starting":
                return
            try:
                self.backend.check_ready(self.pool, w, None if error else future.result(), error)
            except WorkerStartupError as exc:
                self.start_failed(w, exc)
                return
            w.deadline, w.failed_starts, w.fresh = None, 0, True
            if w.crashed_at is not None:
                self.stats.replacement_ready_s.append(time.monotonic() - w.crashed_at)
            w.watch = self._watch("gone", w, w.actor.watch.remote())
        elif kind == "gone" and w.state == "idle":  # died between tasks: replaced, nothing failed
            self.on_death(w)
        elif kind == "accepted" and w.task is not None and not w.task_started:
            if error is None:  # it holds the task: now it runs it
                self._send(w, w.actor.run_accepted.remote())
            elif isinstance(error, self.ray.exceptions.RayActorError):
                self._crashed(w, error)  # before it took the task: back to the queue
            else:
                task, w.task, w.deadline, w.state = w.task, None, None, "idle"
                self.fail(task, error)
        elif kind == "done" and w.task is not None:
            if error is not None and isinstance(error, self.ray.exceptions.RayActorError):
                self._crashed(w, error)
                return
            task, w.task, w.deadline = w.task, None, None
            w.state, w.fresh = "idle", error is None  # its answer: alive a moment ago
            if error is not None:
                self.fail(task, error)
                return
            result = future.result()
            if isinstance(result, Failed):
                self.fail(task, unpack_exception(result.exc, result.text))
            else:
                self.stats.tasks_done += 1
                resolve(task.future, result=result)

    def _crashed(self, w: RayWorker, error: BaseException) -> None:
        """``w`` died holding a task: the policy charges it (or requeues it) and replaces ``w``."""
        if self.abort is not None:  # killed by terminate() or an expired close(): not a crash;
            return  # the loop fails its task as closed, right after this round's events
        how, hint = ray_failure(error, w.slot.node)
        self.retire(w)
        self.worker_died(w, how, hint, cause=error)

    # ------------------------------------------------------- the policy's interface

    def end_now(self, w: RayWorker) -> None:
        kill_actor(w.actor)

    def retire(self, w: RayWorker) -> None:
        w.state = "dead"
        kill_actor(w.actor)
        placement.release(w.pid)

    def slot_lost(self, w: RayWorker) -> str | None:
        if node_alive(w.slot.node):
            return None
        return f"its slot was given up, no replacement started: its Ray node {w.slot.node[:8]} is gone from the cluster"

    def start_timed_out(self, w: RayWorker) -> Exception:
        return WorkerStartupError(RAY_STARTUP_TIMED_OUT.format(who=self.backend.who(self.pool, w), timeout=self.pool.start_timeout_s))

    def after_overdue(self, w: RayWorker) -> None:
        self.retire(w)
        if not self.closing:
            self.restart(w, time.monotonic(), 0)

    def restart(self, w: RayWorker, crashed_at: float | None, failed_starts: int) -> None:
        if not node_alive(w.slot.node):  # no start is tried: its slot is given up
            cause = SLOT_NODE_GONE.format(pool=self.name, slot=w.slot.describe(), node=w.slot.node[:8])
            self.give_up(w, WorkerStartupError(cause), failed_starts, cause=cause)
            return
        new = self.backend.start_worker(self.pool, w.index, w.slot, crashed_at=crashed_at, failed_starts=failed_starts)
        new.deadline = time.monotonic() + self.pool.start_timeout_s
        self.workers[w.index] = new
        self._watch("ready", new, new.ready)

    def take_stacks(self, workers: list[RayWorker]) -> dict[int, str | None]:
        refs = {w.index: w.actor.stacks.remote() for w in workers}
        out: dict[int, str | None] = {}
        deadline = time.monotonic() + STACKS_S
        for index, ref in refs.items():
            try:
                out[index] = self.ray.get(ref, timeout=max(0.05, deadline - time.monotonic()))
            except Exception:
                out[index] = None
        return out

    def died_unseen(self, w: RayWorker) -> bool:
        return w.watch is not None and w.watch.done()  # Ray reported its death

    def on_death(self, w: RayWorker) -> None:
        self.retire(w)
        self.worker_died(w, "", "")

    def hand(self, w: RayWorker, task: QueuedTask) -> None:
        w.deadline = time.monotonic() + task.timeout_s if task.timeout_s else None
        if w.fresh:  # it answered in this round: the task goes straight to it
            self._send(w, w.actor.run.remote(task.call, *(task.buffers or ())))  # the buffers: ObjectRefs, read in place
        else:  # idle since earlier: it takes the task first, so that a death before is not charged to it
            w.ref = w.actor.accept.remote(task.call, *(task.buffers or ()))
            self._watch("accepted", w, w.ref)

    def assign(self) -> None:
        super().assign()
        for w in self.workers:
            w.fresh = False  # a worker is fresh only in the round its answer arrived

    def _send(self, w: RayWorker, ref: Any) -> None:
        """``ref`` is the call that runs ``w``'s task: from now on a death is the task's failure."""
        assert w.task is not None
        w.ref, w.task_started, w.task.buffers = ref, True, []
        self._watch("done", w, ref)
