"""A pool of warm, slot-pinned worker processes that takes Keras models only by reference.

One dispatcher thread owns all worker state. It waits on the result pipes, the worker
sentinels and a wake-up pipe together, so a dead worker is seen at once; it gives each idle
worker one task at a time, so a crash is charged to exactly the task that was running.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import itertools
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection, wait
from typing import Any

from pytest_kerasmp import _worker, placement
from pytest_kerasmp.devices import DeviceSlot
from pytest_kerasmp.errors import (
    ARENA_FAILED,
    FORK_REFUSED,
    POOL_CLOSED,
    TASK_TIMED_OUT,
    WORKER_CRASHED,
    WORKER_START_TIMEOUT,
    WORKER_STARTUP_FAILED,
    KerasMPWarning,
    PoolClosedError,
    RemoteTraceback,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerStartupError,
    unpack_exception,
)
from pytest_kerasmp.transport import Arena, dumps_call

START_METHODS = ("spawn", "forkserver", "fork")
#: The dispatcher wakes at least this often even when nothing happens.
IDLE_POLL_S = 0.5

_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@dataclasses.dataclass(eq=False)
class _Task:
    id: int
    call: bytes
    buffers: list[bytearray]  # out-of-band buffers of the call, copied at submit
    future: Future[Any]
    fn: str
    timeout_s: float | None
    worker: int | None = None  # run on this worker only (broadcast)


@dataclasses.dataclass(eq=False)
class _Worker:
    index: int
    slot: DeviceSlot
    process: Any
    conn: Connection
    state: str = "starting"  # starting | idle | busy | dead
    pid: int | None = None
    task: _Task | None = None
    deadline: float | None = None
    crashed_at: float | None = None
    startup_error: str | None = None
    to_worker: Arena = dataclasses.field(default_factory=Arena)
    from_worker: Arena = dataclasses.field(default_factory=Arena)

    def describe(self) -> str:
        return self.slot.describe()


@dataclasses.dataclass
class PoolStats:
    """What the pool has done.

    ``start_s`` is the time from construction to every worker ready; ``replacement_ready_s``
    the time from a worker's death to its replacement being ready, one per replacement.
    """

    start_s: float | None = None
    tasks_done: int = 0
    tasks_failed: int = 0
    crashes: int = 0
    timeouts: int = 0
    replacement_ready_s: list[float] = dataclasses.field(default_factory=list)


def end_process(process: Any, grace_s: float = 2.0) -> None:
    """Terminate ``process`` if it still runs, then kill it and its process group; reaped."""
    if process.is_alive():
        process.terminate()
        process.join(grace_s)
    kill_group(process.pid)
    if process.is_alive():
        process.kill()
        process.join(grace_s)


def kill_group(pid: int | None) -> None:
    """SIGKILL the process group that ``pid`` leads: a child the plugin started and whatever
    its tasks started (e.g. a ``PyDataset`` fork pool). A group id is not reused while any
    member lives, so this is safe after the leader was reaped."""
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def how_it_died(exitcode: int | None) -> tuple[str, str]:
    if exitcode is None:
        return "an unknown status", "check the worker's output above"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = (
            "SIGKILL is usually the OOM killer: lower the batch size or the number of workers"
            if name == "SIGKILL"
            else "a native crash: run the task in one process to get its traceback"
        )
        return name, hint
    return f"exit code {exitcode}", "the task or a library called exit; check the worker's output"


class WorkerPool:
    """Warm worker processes, one per slot (a slot given twice runs two workers on it).

    Each worker is pinned to its slot with :func:`~pytest_kerasmp.pin_process` before it
    imports TensorFlow, imports TensorFlow once, runs ``initializer`` and then serves tasks.
    Functions travel by reference; models as :class:`~pytest_kerasmp.ModelRef`; large numpy
    arrays through shared memory.

    Args:
        slots: The slots to start workers on.
        start_method: ``"spawn"`` (default) or ``"forkserver"``; ``"fork"`` is refused once
            TensorFlow is imported here.
        initializer: Module-level function run once in every worker after TF is imported.
        initargs: Its arguments.
        task_timeout_s: Default per-task timeout; a task past it has its worker killed and
            replaced and raises :class:`TaskTimeoutError`.
        start_timeout_s: Bound on a worker's start (TF import and initializer).
        name: Name used in process names and messages.
        import_tensorflow: Import TensorFlow in each worker before it is ready (warm).
        preload_tensorflow: With forkserver, import (never run) TensorFlow in the server so
            that new workers start without paying the import.
    """

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
        preload_tensorflow: bool = True,
    ) -> None:
        if start_method not in START_METHODS:
            raise ValueError(f"start_method={start_method!r} is not one of {START_METHODS}")
        if start_method == "fork":
            self._refuse_fork()
            warnings.warn(
                "start_method='fork': a worker forked after this process runs TensorFlow (model.predict, "
                "fit, a tf.function) deadlocks; prefer 'spawn' or 'forkserver'",
                KerasMPWarning,
                stacklevel=2,
            )
        slots = list(slots)
        if not slots or not all(isinstance(s, DeviceSlot) for s in slots):
            raise TypeError(f"slots must be a non-empty sequence of DeviceSlot, got {slots!r}")
        self.name = name
        self.slots = tuple(slots)
        self.start_method = start_method
        self.task_timeout_s = task_timeout_s
        self.start_timeout_s = start_timeout_s
        self.stats = PoolStats()
        self._import_tf = import_tensorflow
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            preload = ["pytest_kerasmp._worker"] + (["tensorflow"] if preload_tensorflow else [])
            self._ctx.set_forkserver_preload(preload)
        self._init_call: bytes | None = None
        if initializer is not None:
            self._init_call, _ = dumps_call(initializer, tuple(initargs), {}, out_of_band=False)
        self._lock = threading.Lock()
        self._pending: collections.deque[_Task] = collections.deque()
        self._ids = itertools.count()
        self._closing = False
        self._abort = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._workers: list[_Worker] = []
        self._thread: threading.Thread | None = None
        _live_pools.add(self)
        try:
            t0 = time.perf_counter()
            self._workers = [self._spawn(i, s) for i, s in enumerate(self.slots)]
            self._wait_ready()
            self.stats.start_s = time.perf_counter() - t0
        except BaseException:
            self._shutdown_workers(timeout=2.0)
            self._release()
            raise
        self._thread = threading.Thread(target=self._loop, name=f"kerasmp-{name}-dispatch", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------- public

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a free worker; a Future of its result."""
        return self._submit(fn, args, kwargs, self.task_timeout_s, None)

    def submit_with_timeout(
        self, timeout_s: float | None, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Future[Any]:
        """:meth:`submit` with its own timeout (``None``: no timeout)."""
        return self._submit(fn, args, kwargs, timeout_s, None)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> list[Any]:
        """``[fn(*xs) for xs in zip(*iterables)]`` across the workers, results in input order."""
        futures = [self.submit(fn, *xs) for xs in zip(*iterables, strict=False)]
        return [f.result() for f in futures]

    def broadcast(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn`` once on every worker (e.g. to warm a model); one result per worker."""
        futures = [
            self._submit(fn, args, kwargs, self.task_timeout_s, w) for w in range(len(self.slots))
        ]
        return [f.result() for f in futures]

    def pids(self) -> list[int | None]:
        """The current process id of each worker (changes when a worker is replaced)."""
        return [w.pid for w in self._workers]

    def close(self, timeout: float = 60.0, *, cancel_pending: bool = False) -> None:
        """Finish queued tasks (within ``timeout``), stop the workers, then terminate and kill.

        With ``cancel_pending`` tasks not yet started fail with :class:`PoolClosedError`.
        No worker process and no shared memory outlives this call.
        """
        with self._lock:
            if self._closing and self._thread is None:
                return
            self._closing = True
            if cancel_pending:
                self._abort = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._lock:
                    self._abort = True
                self._wake()
                self._thread.join(5.0)
            self._thread = None
        self._shutdown_workers(timeout=min(timeout, 10.0))
        self._release()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(cancel_pending=exc_type is not None)

    # ---------------------------------------------------------------------------- workers

    def _refuse_fork(self) -> None:
        if "tensorflow" in sys.modules:
            raise ValueError(FORK_REFUSED)

    def _spawn(self, index: int, slot: DeviceSlot) -> _Worker:
        if self.start_method == "fork":
            self._refuse_fork()
        parent, child = self._ctx.Pipe(duplex=True)
        kind = "gpu" + str(slot.gpu) if slot.kind == "GPU" else f"cpu{slot.index}"
        process = self._ctx.Process(
            target=_worker.main,
            args=(child, slot.to_json_text(), os.getpid(), self._import_tf, self._init_call),
            name=f"kerasmp-{self.name}-w{index}-{kind}",
        )
        process.start()
        child.close()
        return _Worker(index=index, slot=slot, process=process, conn=parent, pid=process.pid)

    def _wait_ready(self) -> None:
        deadline = time.perf_counter() + self.start_timeout_s
        waiting = {w.conn: w for w in self._workers}
        sentinels = {w.process.sentinel: w for w in self._workers}
        while waiting:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                w = next(iter(waiting.values()))
                raise WorkerStartupError(
                    WORKER_START_TIMEOUT.format(
                        index=w.index, slot=w.describe(), pool=self.name, timeout=self.start_timeout_s
                    )
                )
            for obj in wait([*waiting, *sentinels], timeout=remaining):
                w = waiting.get(obj) or sentinels[obj]  # type: ignore[call-overload]
                if w.conn not in waiting:
                    continue
                self._on_startup_message(w)
                if w.state == "idle":
                    del waiting[w.conn]

    def _on_startup_message(self, w: _Worker) -> None:
        """Read a starting worker's first message; raise WorkerStartupError if it failed."""
        try:
            msg = w.conn.recv() if w.conn.poll() else None
        except (EOFError, OSError):
            msg = None
        if msg is not None and msg[0] == "ready":
            w.state, w.pid = "idle", msg[1]
            return
        if msg is None:
            w.process.join(1.0)
            how, _ = how_it_died(w.process.exitcode)
            text, reason = "", f"the process exited with {how} before it was ready"
        else:
            text = msg[1]
            reason = text.strip().splitlines()[-1]
        raise self._startup_error(w, reason, text)

    def _startup_error(self, w: _Worker, reason: str, text: str | None) -> WorkerStartupError:
        """The error for a worker that could not start, with the child's traceback attached."""
        error = WorkerStartupError(
            WORKER_STARTUP_FAILED.format(index=w.index, slot=w.describe(), pool=self.name, reason=reason)
        )
        error.__cause__ = RemoteTraceback(text) if text else None
        return error

    def _shutdown_workers(self, timeout: float) -> None:
        for w in self._workers:
            if w.state == "starting":  # nothing to finish: do not wait for its TF import
                w.process.kill()
            elif w.process.is_alive():
                try:
                    w.conn.send(("stop",))
                except OSError:
                    pass
        deadline = time.perf_counter() + timeout
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.perf_counter()))
        for w in self._workers:
            end_process(w.process)
            self._bury(w)

    def _bury(self, w: _Worker) -> None:
        placement.release(w.process.pid)  # issue 10: its end, for the placement table
        w.conn.close()
        w.to_worker.close()
        w.from_worker.close()
        w.state = "dead"

    def _release(self) -> None:
        for task in list(self._pending):
            self._fail(task, PoolClosedError(POOL_CLOSED.format(pool=self.name, fn=task.fn)))
        self._pending.clear()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        _live_pools.discard(self)

    # ------------------------------------------------------------------------------ tasks

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout_s: float | None,
        worker: int | None,
    ) -> Future[Any]:
        if self._closing:
            raise PoolClosedError(POOL_CLOSED.format(pool=self.name, fn=getattr(fn, "__name__", fn)))
        call, buffers = dumps_call(fn, args, kwargs)
        task = _Task(
            id=next(self._ids),
            call=call,
            buffers=buffers,
            future=Future(),
            fn=f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}",
            timeout_s=timeout_s,
            worker=worker,
        )
        with self._lock:
            if self._closing:
                raise PoolClosedError(POOL_CLOSED.format(pool=self.name, fn=task.fn))
            self._pending.append(task)
        self._wake()
        return task.future

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed

    def _fail(self, task: _Task, error: BaseException) -> None:
        task.buffers = []
        self.stats.tasks_failed += 1
        if not task.future.done():
            task.future.set_exception(error)

    # ------------------------------------------------------------------------- dispatcher

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._abort:
                    for task in list(self._pending):
                        self._fail(task, PoolClosedError(POOL_CLOSED.format(pool=self.name, fn=task.fn)))
                    self._pending.clear()
                busy = any(w.state == "busy" for w in self._workers)
                if self._closing and not self._pending and not busy:
                    return
                if self._abort and not busy:
                    return
            live = [w for w in self._workers if w.state != "dead"]
            deadlines = [w.deadline for w in live if w.deadline is not None]
            timeout = IDLE_POLL_S
            if deadlines:
                timeout = max(0.0, min(timeout, min(deadlines) - time.perf_counter()))
            by_conn = {w.conn: w for w in live}
            by_sentinel = {w.process.sentinel: w for w in live}
            ready = wait([self._wake_r, *by_conn, *by_sentinel], timeout=timeout)
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            for obj in ready:
                if obj in by_conn:
                    self._on_message(by_conn[obj])  # type: ignore[index]
            for obj in ready:
                if obj in by_sentinel:
                    self._on_death(by_sentinel[obj])  # type: ignore[index]
            self._check_deadlines()
            self._assign()

    def _on_message(self, w: _Worker) -> bool:
        """Handle one message from ``w``; False when its pipe is closed (it died)."""
        if w.state == "dead":
            return False
        try:
            msg = w.conn.recv()
            if msg[0] == "ok" and msg[4]:
                w.from_worker.receive(w.conn)
        except (EOFError, OSError):
            return False  # it died; its sentinel says how
        kind = msg[0]
        if kind == "ready":
            w.state, w.pid, w.deadline = "idle", msg[1], None
            if w.crashed_at is not None:
                self.stats.replacement_ready_s.append(time.perf_counter() - w.crashed_at)
        elif kind == "startup-error":
            w.startup_error = msg[1]
        elif kind in ("ok", "error") and w.task is not None and w.task.id == msg[1]:
            task, w.task, w.state, w.deadline = w.task, None, "idle", None
            if msg[-1]:  # the task kept a view of its arguments' arena: leave it to the worker
                w.to_worker.close()
            if kind == "ok":
                self._resolve(task, msg[2], w.from_worker.read(msg[3]))
            else:
                self._reject(task, msg[2], msg[3])
        return True

    def _resolve(self, task: _Task, data: bytes, buffers: list[bytearray]) -> None:
        try:
            result = pickle.loads(data, buffers=buffers)
        except Exception as exc:
            self._fail(task, TypeError(f"the result of task {task.id} ({task.fn}) could not be unpickled: {exc}"))
            return
        self.stats.tasks_done += 1
        if not task.future.done():
            task.future.set_result(result)

    def _reject(self, task: _Task, data: bytes, text: str) -> None:
        self._fail(task, unpack_exception(data, text))

    def _on_death(self, w: _Worker) -> None:
        if w.state == "dead":
            return
        while True:  # a result sent just before dying still counts
            try:
                if not w.conn.poll() or not self._on_message(w):
                    break
            except (EOFError, OSError):
                break
        w.process.join(1.0)
        kill_group(w.process.pid)  # what its tasks started does not outlive it
        how, hint = how_it_died(w.process.exitcode)
        was_starting = w.state == "starting"
        self._bury(w)
        if w.task is not None:
            self.stats.crashes += 1
            self._fail(
                w.task,
                WorkerCrashedError(
                    WORKER_CRASHED.format(
                        index=w.index, slot=w.describe(), pid=w.pid, pool=self.name,
                        how=how, task=w.task.id, fn=w.task.fn, hint=hint,
                    )
                ),
            )
            w.task = None
        elif not was_starting and not self._closing:
            self.stats.crashes += 1
        if was_starting:
            reason = (w.startup_error or "").strip().splitlines()[-1:] or [f"exited with {how}"]
            self._give_up_on(w, reason[0], w.startup_error)
            return
        if not self._closing:
            self._replace(w)

    def _replace(self, w: _Worker) -> None:
        crashed_at = time.perf_counter()
        try:
            new = self._spawn(w.index, w.slot)
        except Exception as exc:
            self._give_up_on(w, str(exc), None)
            return
        new.crashed_at = crashed_at
        new.deadline = crashed_at + self.start_timeout_s
        self._workers[w.index] = new

    def _give_up_on(self, w: _Worker, reason: str, text: str | None) -> None:
        """A replacement could not start: fail what only it could run, or all if none is left."""
        error = self._startup_error(w, reason, text)
        alive = any(x.state != "dead" for x in self._workers)
        with self._lock:
            doomed = [t for t in self._pending if not alive or t.worker == w.index]
            for task in doomed:
                self._pending.remove(task)
        for task in doomed:
            self._fail(task, error)

    def _check_deadlines(self) -> None:
        now = time.perf_counter()
        for w in self._workers:
            if w.deadline is None or now < w.deadline or w.state == "dead":
                continue
            if w.state == "starting":
                w.startup_error = WORKER_START_TIMEOUT.format(
                    index=w.index, slot=w.describe(), pool=self.name, timeout=self.start_timeout_s
                )
            elif w.task is not None:
                task, w.task = w.task, None
                self.stats.timeouts += 1
                self._fail(
                    task,
                    TaskTimeoutError(
                        TASK_TIMED_OUT.format(
                            task=task.id, fn=task.fn, timeout=task.timeout_s, index=w.index,
                            slot=w.describe(), pid=w.pid,
                        )
                    ),
                )
            w.deadline = None
            kill_group(w.process.pid)  # the worker and what its task started
            w.process.kill()  # its sentinel fires next round: _on_death replaces it

    def _assign(self) -> None:
        for w in self._workers:
            if w.state != "idle":
                continue
            with self._lock:
                task = next((t for t in self._pending if t.worker in (None, w.index)), None)
                if task is None:
                    continue
                self._pending.remove(task)
            if task.future.cancelled():
                continue
            try:
                layout = w.to_worker.write(task.buffers)
            except OSError as exc:
                self._fail(task, OSError(ARENA_FAILED.format(task=task.id, fn=task.fn, error=exc)))
                continue
            try:
                w.conn.send(("task", task.id, task.call, layout, w.to_worker.fresh))
                w.to_worker.hand_over(w.conn)
            except OSError:  # died just now: run it elsewhere, the sentinel reports the death
                with self._lock:
                    self._pending.appendleft(task)
                continue
            task.future.set_running_or_notify_cancel()
            task.buffers = []  # in the worker's arena now
            w.state, w.task = "busy", task
            w.deadline = time.perf_counter() + task.timeout_s if task.timeout_s else None


def _close_all_at_exit() -> None:
    for pool in list(_live_pools):
        pool.close(timeout=2.0, cancel_pending=True)


atexit.register(_close_all_at_exit)
