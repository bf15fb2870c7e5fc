"""The Ray backend of :class:`~pytest_kerasmp.WorkerPool`: one Ray actor per slot.

``WorkerPool(slots, backend="ray")`` makes a :class:`RayWorkerPool`: the same public API
(``map``, ``broadcast``, ``__enter__``... are inherited) and the same errors, with Ray
actors in place of local children. One dispatcher thread owns the workers and the queue, as
on the local backend; Ray's completion callbacks only post events to it. Arguments and
results travel through Ray's object store.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from pytest_kerasmp import lifecycle
from pytest_kerasmp._dispatch import MAX_START_ATTEMPTS, PoolStats, QueuedTask, resolve
from pytest_kerasmp._wire import Failed
from pytest_kerasmp.devices import DeviceSlot
from pytest_kerasmp.errors import (
    POOL_BROKEN,
    POOL_CLOSED,
    POOL_CLOSED_QUEUED,
    POOL_CLOSED_RUNNING,
    RAY_STARTUP_TIMED_OUT,
    SLOT_DEAD,
    STARTUP_ADVICE_NONE,
    STARTUP_ADVICE_TRACEBACK,
    STARTUP_FAILED,
    TASK_TIMED_OUT,
    WORKER_CRASHED,
    PoolBrokenError,
    PoolClosedError,
    RemoteTraceback,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerStartupError,
    unpack_exception,
    with_stacks,
)
from pytest_kerasmp.pool import WorkerPool
from pytest_kerasmp.ray_cluster import check_feasible, connect, node_alive, slot_resources
from pytest_kerasmp.transport import check_runnable_in_worker, dumps

IDLE_POLL_S = 0.5
STACKS_S = 1.0


def actor_options(slot: DeviceSlot, name: str) -> dict[str, Any]:
    """Ray options that put an actor on ``slot``: its node (hard), its CPUs/GPUs, and the
    slot's environment (plus this process's import path) set before Python starts in it."""
    import sys

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    res = slot_resources(slot)
    env = {k: v for k, v in slot.environ().items() if not (slot.kind == "GPU" and k == "CUDA_VISIBLE_DEVICES")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if isinstance(p, str) and p and os.path.isdir(p))
    env["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    return {
        "num_cpus": res["CPU"], "num_gpus": res.get("GPU", 0.0), "max_restarts": 0, "max_concurrency": 2,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(slot.node, soft=False),
        "runtime_env": {"env_vars": env}, "name": None, "lifetime": None,
    }


def ray_failure(exc: BaseException, node: str = "") -> tuple[str, str]:
    """How a Ray actor on ``node`` ended, from Ray's error (and whether its node is still in
    the cluster), and a hint (as ``describe_exit``)."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("\t")]
    detail = next((ln for ln in lines[1:] if "died" in ln or "exit" in ln.lower()), lines[-1] if lines else text)
    detail = detail.split(" Some common causes")[0]
    if "node has died" in text or "node was terminated" in text or (node and not node_alive(node)):
        return f"its node's end (Ray: {detail})", "the Ray node left the cluster; check that node's raylet log"
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
    ref: Any = None
    deadline: float | None = None
    failed_starts: int = 0
    crashed_at: float | None = None
    killed: bool = False


class RayWorkerPool(WorkerPool):
    """:class:`WorkerPool` on Ray; see ``WorkerPool`` for the arguments, plus ``ray_address``
    (``None``: the cluster this process is connected to, else a new local one)."""

    _dispatcher: RayDispatcher  # type: ignore[assignment]

    def __init__(
        self,
        slots: Sequence[DeviceSlot],
        *,
        start_method: str = "spawn",
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        task_timeout_s: float | None = None,
        start_timeout_s: float = 120.0,
        name: str = "pool",
        import_tensorflow: bool = True,
        backend: str = "ray",
        ray_address: str | None = None,
    ) -> None:
        from pytest_kerasmp.transport import dumps_call

        slots = list(slots)
        if not slots or not all(isinstance(s, DeviceSlot) for s in slots):
            raise TypeError(f"slots must be a non-empty sequence of DeviceSlot, got {slots!r}")
        self.ray = connect(ray_address)
        self.name, self.slots, self.start_method = name, tuple(slots), "ray"
        self.task_timeout_s, self.start_timeout_s = task_timeout_s, start_timeout_s
        self.stats = PoolStats()
        self._import_tf = import_tensorflow
        self._init_call = dumps_call(initializer, tuple(initargs), {}, out_of_band=False)[0] if initializer else None
        self._ids, self._gens = itertools.count(), itertools.count()
        self._closed = self._finished = False
        check_feasible(self.slots, f"pool {name!r}")
        t0 = time.monotonic()
        workers = [self.start_worker(i, s) for i, s in enumerate(self.slots)]
        try:
            self._wait_started(workers, t0 + start_timeout_s)
        except BaseException:
            for w in workers:
                self.ray.kill(w.actor, no_restart=True)
            raise
        self.stats.start_s = time.monotonic() - t0
        self._dispatcher = RayDispatcher(self, workers)
        lifecycle.register_owner(self)
        self._dispatcher.thread.start()

    # ------------------------------------------------------------------------- workers

    def start_worker(self, index: int, slot: DeviceSlot, **fields: Any) -> RayWorker:
        from pytest_kerasmp._ray_actor import SlotWorker

        label = f"kerasmp-{self.name}-w{index}"
        cls = self.ray.remote(SlotWorker).options(**actor_options(slot, label))
        actor = cls.remote(slot.to_json(), self._init_call, self._import_tf)
        return RayWorker(index, slot, actor, actor.ready.remote(), next(self._gens), **fields)

    def who(self, w: RayWorker) -> str:
        pid = f", pid {w.pid}" if w.pid else ""
        return f"worker {w.index} ({w.slot.describe()}{pid}) of pool {self.name!r}"

    def check_ready(self, w: RayWorker, info: Any = None, error: BaseException | None = None) -> None:
        """Mark ``w`` ready from its ready() answer, or raise its WorkerStartupError."""
        if error is not None:
            how, hint = ray_failure(error)
            exc = WorkerStartupError(STARTUP_FAILED.format(who=self.who(w), reason=f"it ended before it was ready, with {how} ({hint})", advice=STARTUP_ADVICE_NONE))
            exc.__cause__ = error
            raise exc
        w.pid, w.ip = info["pid"], info["ip"]
        if info["failure"]:
            reason = info["failure"].strip().splitlines()[-1]
            exc = WorkerStartupError(STARTUP_FAILED.format(who=self.who(w), reason=reason, advice=STARTUP_ADVICE_TRACEBACK))
            exc.__cause__ = RemoteTraceback(info["failure"])
            raise exc
        w.state = "idle"

    def _wait_started(self, workers: list[RayWorker], deadline: float) -> None:
        refs = {w.ready: w for w in workers}
        while refs:
            done, _ = self.ray.wait(list(refs), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                w = next(iter(refs.values()))
                raise WorkerStartupError(RAY_STARTUP_TIMED_OUT.format(who=self.who(w), timeout=self.start_timeout_s))
            w = refs.pop(done[0])
            try:
                info = self.ray.get(done[0], timeout=STACKS_S)
            except Exception as exc:
                self.check_ready(w, error=exc)
            else:
                self.check_ready(w, info)

    # -------------------------------------------------------------------------- public

    def pids(self) -> list[int | None]:
        return [w.pid if w.state != "dead" else None for w in self._dispatcher.workers]

    def nodes(self) -> list[str]:
        """The Ray node id of each worker's slot."""
        return [w.slot.node for w in self._dispatcher.workers]

    def close(self, timeout: float = 60.0, *, cancel_pending: bool = False) -> None:
        if self._closed:
            return
        d = self._dispatcher
        self._closed = True
        d.closing = True
        try:
            if cancel_pending:
                d.fail_queued("close(cancel_pending=True)")
            d.post(("wake",))
            d.thread.join(timeout)
            if d.thread.is_alive():
                d.dump_on_abort = True
                d.abort = f"close(timeout={timeout:g}) expired"
                d.post(("wake",))
                d.thread.join(5.0)
        except BaseException:
            self.terminate("interrupted during close()")
            raise
        self._end(f"close(timeout={timeout:g}) expired")

    def terminate(self, why: str = "terminated") -> None:
        if self._finished:
            return
        d = self._dispatcher
        self._closed = True
        d.closing, d.abort = True, why
        d.post(("wake",))
        d.thread.join(2.0)
        self._end(why)

    def _end(self, why: str) -> None:
        d = self._dispatcher
        d.fail_everything(why)
        for w in d.workers:
            w.state = "dead"
            self.ray.kill(w.actor, no_restart=True)
        self._finished = True
        lifecycle.unregister_owner(self)

    def _submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], timeout_s: float | None, worker: int | None,
    ) -> Future[Any]:
        __tracebackhide__ = True
        name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}"
        if self._closed:
            raise PoolClosedError(POOL_CLOSED.format(pool=self.name, fn=name))
        check_runnable_in_worker(fn)
        dumps((fn, args, kwargs), f"a call of {name}", buffers=[])  # refuses live models, names what cannot travel
        task = QueuedTask(next(self._ids), b"", [], Future(), name, timeout_s, worker)
        task.payload = (fn, args, kwargs)  # type: ignore[attr-defined]
        self._dispatcher.enqueue(task)
        return task.future


class RayDispatcher:
    """One thread that owns the workers and the queue of a :class:`RayWorkerPool`."""

    def __init__(self, pool: RayWorkerPool, workers: list[RayWorker]) -> None:
        self.pool, self.ray, self.name, self.stats = pool, pool.ray, pool.name, pool.stats
        self.workers = workers
        self.lock = threading.Lock()
        self.pending: collections.deque[QueuedTask] = collections.deque()
        self.events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.closing = False
        self.abort: str | None = None
        self.dump_on_abort = False
        self.broken: str | None = None
        self.broken_cause: BaseException | None = None
        self.thread = threading.Thread(target=self.run, name=f"kerasmp-{self.name}-ray-dispatch", daemon=True)

    def post(self, event: tuple[Any, ...]) -> None:
        self.events.put(event)

    def enqueue(self, task: QueuedTask) -> None:
        with self.lock:
            if self.closing:
                raise PoolClosedError(POOL_CLOSED.format(pool=self.name, fn=task.fn))
            if self.broken is not None:
                raise self.broken_error()
            if task.worker is not None and self.workers[task.worker].state == "dead":
                raise self.broken_error(f"worker {task.worker} is dead")
            self.pending.append(task)
        self.post(("wake",))

    def broken_error(self, cause: str | None = None) -> PoolBrokenError:
        error = PoolBrokenError(POOL_BROKEN.format(pool=self.name, cause=cause or self.broken))
        error.__cause__ = self.broken_cause
        return error

    def fail(self, task: QueuedTask, error: BaseException) -> None:
        self.stats.tasks_failed += 1
        resolve(task.future, error=error)

    def fail_queued(self, why: str) -> None:
        with self.lock:
            queued, self.pending = list(self.pending), collections.deque()
        for task in queued:
            self.fail(task, PoolClosedError(POOL_CLOSED_QUEUED.format(pool=self.name, why=why, task=task.id, fn=task.fn)))

    def fail_everything(self, why: str, stacks: dict[int, str | None] | None = None) -> None:
        self.fail_queued(why)
        for w in self.workers:
            if w.task is not None:
                task, w.task = w.task, None
                self.ray.kill(w.actor, no_restart=True)
                error = PoolClosedError(POOL_CLOSED_RUNNING.format(
                    pool=self.name, why=why, task=task.id, fn=task.fn, index=w.index, slot=w.slot.describe(), pid=w.pid,
                ))
                self.fail(task, with_stacks(error, (stacks or {}).get(w.index)))

    # ------------------------------------------------------------------------- the loop

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # fail closed, as the local dispatcher
            with self.lock:
                self.broken = f"its dispatcher thread failed with {type(exc).__name__}: {exc}"
                self.broken_cause = exc
            self.fail_everything(self.broken)

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
                self.fail_everything(self.abort, self._stacks(busy) if self.dump_on_abort else None)
                return
            self._check_deadlines()
            self._assign()
            with self.lock:
                busy_now = any(w.state == "busy" for w in self.workers)
                if self.closing and not busy_now and not self.pending:
                    return
            if self.closing and not any(w.state != "dead" for w in self.workers):
                self.fail_everything("its last worker died during close()")
                return

    def _watch(self, kind: str, w: RayWorker, ref: Any) -> None:
        gen = w.gen
        ref.future().add_done_callback(lambda f: self.post((kind, w.index, gen, f)))

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
                self.pool.check_ready(w, None if error else future.result(), error)
            except WorkerStartupError as exc:
                self._start_failed(w, exc)
                return
            w.deadline, w.failed_starts = None, 0
            if w.crashed_at is not None:
                self.stats.replacement_ready_s.append(time.monotonic() - w.crashed_at)
        elif kind == "done" and w.task is not None:
            task, w.task, w.deadline = w.task, None, None
            if error is not None and isinstance(error, self.ray.exceptions.RayActorError):
                self._crashed(w, task, error)
                return
            w.state = "idle"
            if error is not None:
                self.fail(task, error)
                return
            result = future.result()
            if isinstance(result, Failed):
                self.fail(task, unpack_exception(result.exc, result.text))
            else:
                self.stats.tasks_done += 1
                resolve(task.future, result=result)

    def _crashed(self, w: RayWorker, task: QueuedTask, error: BaseException) -> None:
        how, hint = ray_failure(error, w.slot.node)
        w.state = "dead"
        self.stats.crashes += 1
        replace = not self.closing
        fate = "the pool is starting a replacement on the same slot" if replace else "it was not replaced: the pool is closing"
        crash = WorkerCrashedError(WORKER_CRASHED.format(
            index=w.index, slot=w.slot.describe(), pid=w.pid, pool=self.name, how=how, task=task.id, fn=task.fn, fate=fate, hint=hint,
        ))
        crash.__cause__ = error
        self.fail(task, crash)
        if replace:
            self._restart(w, time.monotonic(), 0)

    def _restart(self, w: RayWorker, crashed_at: float | None, failed_starts: int) -> None:
        self.ray.kill(w.actor, no_restart=True)
        if not node_alive(w.slot.node):
            self._give_up(w, WorkerStartupError(f"its Ray node {w.slot.node[:8]} is gone from the cluster"), failed_starts + 1)
            return
        new = self.pool.start_worker(w.index, w.slot, crashed_at=crashed_at, failed_starts=failed_starts)
        new.deadline = time.monotonic() + self.pool.start_timeout_s
        self.workers[w.index] = new
        self._watch("ready", new, new.ready)

    def _start_failed(self, w: RayWorker, error: Exception) -> None:
        w.state = "dead"
        attempts = w.failed_starts + 1
        if attempts < MAX_START_ATTEMPTS and not self.closing and self.abort is None:
            self._restart(w, w.crashed_at, attempts)
        else:
            self.ray.kill(w.actor, no_restart=True)
            self._give_up(w, error, attempts)

    def _give_up(self, w: RayWorker, error: Exception, attempts: int) -> None:
        w.state = "dead"
        reason = str(error).split("; ")[0]
        cause = SLOT_DEAD.format(pool=self.name, slot=w.slot.describe(), attempts=attempts, reason=reason)
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

    def _stacks(self, workers: list[RayWorker]) -> dict[int, str | None]:
        refs = {w.index: w.actor.stacks.remote() for w in workers}
        out: dict[int, str | None] = {}
        deadline = time.monotonic() + STACKS_S
        for index, ref in refs.items():
            try:
                out[index] = self.ray.get(ref, timeout=max(0.05, deadline - time.monotonic()))
            except Exception:
                out[index] = None
        return out

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.deadline is None or now < w.deadline or w.state == "dead":
                continue
            w.deadline = None
            if w.state == "starting":
                self._start_failed(w, WorkerStartupError(RAY_STARTUP_TIMED_OUT.format(who=self.pool.who(w), timeout=self.pool.start_timeout_s)))
            elif w.task is not None:
                task, w.task = w.task, None
                stacks = self._stacks([w]).get(w.index)
                self.stats.timeouts += 1
                fate = "the pool is starting a replacement" if not self.closing else "not replaced: the pool is closing"
                self.fail(task, with_stacks(TaskTimeoutError(TASK_TIMED_OUT.format(
                    task=task.id, fn=task.fn, timeout=task.timeout_s, index=w.index, slot=w.slot.describe(), pid=w.pid, fate=fate,
                )), stacks))
                w.state = "dead"
                if not self.closing:
                    self._restart(w, time.monotonic(), 0)
                else:
                    self.ray.kill(w.actor, no_restart=True)

    def _assign(self) -> None:
        for w in self.workers:
            if w.state != "idle":
                continue
            with self.lock:
                task = next((t for t in self.pending if t.worker in (None, w.index)), None)
                if task is None:
                    continue
                self.pending.remove(task)
            if not task.future.set_running_or_notify_cancel():
                continue
            fn, args, kwargs = task.payload  # type: ignore[attr-defined]
            del task.payload  # type: ignore[attr-defined]
            w.state, w.task = "busy", task
            w.ref = w.actor.run.remote(fn, args, kwargs)
            w.deadline = time.monotonic() + task.timeout_s if task.timeout_s else None
            self._watch("done", w, w.ref)
