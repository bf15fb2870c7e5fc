"""A pool of warm, slot-pinned worker processes that takes Keras models only by reference.

``WorkerPool`` is the public face; ``_dispatch`` owns the workers and the queue in one
thread; ``lifecycle`` starts, watches and ends each worker process. It fails closed: every
future gets its result or an error that says what happened, every wait has a bound, and
nothing the pool started outlives it.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any, Protocol

from pytest_kerasmp.errors import (
    INTO_BAD,
    MAP_TIMED_OUT,
    POOL_BROKEN,
    POOL_CLOSED,
    WARM_IMPORT_DEPRECATED,
    PoolBrokenError,
    PoolClosedError,
    TaskTimeoutError,
)
from pytest_kerasmp.runtime import backends
from pytest_kerasmp.runtime.pool.taskqueue import PoolSpec, PoolStats, TaskQueue, interrupted_why, is_interrupt, new_task
from pytest_kerasmp.runtime.process import owners
from pytest_kerasmp.runtime.wire.transport import dumps_call
from pytest_kerasmp.slots.devices import DeviceSlot


class PoolBackend(Protocol):
    name: str
    #: What the pool reports as its start method ("spawn", "forkserver", "ray").
    start_method: str

    def start(self, pool: PoolSpec) -> TaskQueue:
        """Start a worker on each of ``pool.slots`` and wait for all (raising
        ``WorkerStartupError``); the dispatcher that owns them, its thread not yet started."""

    def pack(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, list[Any]]:
        """A call as it travels to a worker: pickled, with its large buffers out of band."""


__all__ = ["PoolStats", "WorkerPool"]


def checked_slots(slots: Sequence[DeviceSlot]) -> tuple[DeviceSlot, ...]:
    """``slots`` as a tuple, or a TypeError that says what a pool needs."""
    slots = tuple(slots)
    if not slots or not all(isinstance(s, DeviceSlot) for s in slots):
        raise TypeError(f"slots must be a non-empty sequence of DeviceSlot, got {list(slots)!r}")
    return slots


class WorkerPool(owners.Owned):
    """Warm worker processes, one per slot (a slot given twice runs two workers on it).

    Each worker is pinned to its slot with :func:`~pytest_kerasmp.pin_process` before it
    imports TensorFlow, imports TensorFlow once, runs ``initializer`` and then serves tasks.
    Functions travel by reference (module-level functions of an importable module); models
    as :class:`~pytest_kerasmp.ModelRef`; large numpy arrays through shared memory.

    Args:
        slots: The slots to start workers on.
        start_method: ``"spawn"`` (default) or ``"forkserver"`` (a server process that
            imported, never ran, TensorFlow forks each worker).
        initializer: Module-level function run once in every worker after TF is imported.
        initargs: Its arguments.
        task_timeout_s: Default per-task timeout; a task past it has its worker's stacks
            dumped, the worker killed and replaced, and raises :class:`TaskTimeoutError`.
        start_timeout_s: Bound on a worker's start (TF import and initializer).
        name: Name used in process names and messages.
        warm_import: Import the session's Keras backend (TensorFlow, JAX or PyTorch) in each
            worker before it is ready (default); ``False`` for pools that run numpy only.
        backend: ``"local"`` (default): child processes of this one; ``"ray"``: one Ray
            actor per slot (slots from :func:`~pytest_kerasmp.plan_ray_slots`), same API and
            errors; or a configured backend, e.g. ``RayBackend(address=..., reserve=False)``
            (:class:`~pytest_kerasmp.RayBackend`; ``pytest_kerasmp.runtime.backends``).
        import_tensorflow: Deprecated: ``warm_import``.
        ray_address: Deprecated: ``backend=RayBackend(address=...)``.
        ray_reserve: Deprecated: ``backend=RayBackend(reserve=...)``.
        ray_timeout_s: Deprecated: ``backend=RayBackend(timeout_s=...)``.
    """

    #: Whether a worker that dies is replaced (a cluster's owner restarts all of them instead).
    replace_workers = True

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
        warm_import: bool = True,
        backend: Any = "local",
        import_tensorflow: bool | None = None,
        ray_address: str | None = None,
        ray_reserve: bool | None = None,
        ray_timeout_s: float | None = None,
    ) -> None:
        if import_tensorflow is not None:
            warnings.warn(WARM_IMPORT_DEPRECATED, DeprecationWarning, stacklevel=2)
            warm_import = import_tensorflow
        backend = backends.from_ray_keywords(backend, "WorkerPool", ray_address, ray_reserve, ray_timeout_s)
        self._init_args = (slots, {
            "start_method": start_method, "initializer": initializer, "initargs": initargs,
            "task_timeout_s": task_timeout_s, "start_timeout_s": start_timeout_s, "name": name,
            "warm_import": warm_import, "backend": backend,
        })  # for restart()
        self.backend: PoolBackend = backends.for_pool(backend, start_method)
        self.start_method = self.backend.start_method
        self.name = name
        self.slots = checked_slots(slots)
        self.task_timeout_s = task_timeout_s
        self.start_timeout_s = start_timeout_s
        self.stats = PoolStats()
        #: Import the framework in each worker before it is ready.
        self.warm_import = warm_import
        #: The initializer's call, pickled (run once in every worker).
        self.init_call: bytes | None = None
        if initializer is not None:
            self.init_call, _ = dumps_call(initializer, tuple(initargs), {}, out_of_band=False)
        self._ids = itertools.count()
        self._closed = self._finished = False
        self._ended_why: str | None = None  # why it was closed or terminated (the first reason)
        t0 = time.monotonic()
        #: What the backend gets (frozen): never the pool itself.
        self.spec = PoolSpec(
            name=self.name, slots=self.slots, start_timeout_s=self.start_timeout_s, init_call=self.init_call,
            warm_import=self.warm_import, replace_workers=self.replace_workers, stats=self.stats,
        )
        self._dispatcher: TaskQueue = self.backend.start(self.spec)
        self.stats.start_s = time.monotonic() - t0
        owners.register_owner(self)
        self._dispatcher.thread.start()

    # ----------------------------------------------------------------------------- public

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a free worker; a Future of its result."""
        __tracebackhide__ = True
        return self._submit(fn, args, kwargs, self.task_timeout_s, None)

    def submit_with_timeout(
        self, timeout_s: float | None, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Future[Any]:
        """:meth:`submit` with its own timeout (``None``: no timeout)."""
        __tracebackhide__ = True
        return self._submit(fn, args, kwargs, timeout_s, None)

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None, into: Sequence[Any] | None = None,
    ) -> list[Any]:
        """``[fn(*xs) for xs in zip(*iterables)]`` across the workers, results in input order.

        ``timeout`` bounds the whole call: past it, tasks not yet started are cancelled
        and :class:`TaskTimeoutError` says how many finished.

        ``into``: one numpy array per task; each task's result (an array of the same shape,
        of a dtype that casts to it) is copied into it, and ``map`` returns ``into``. Views
        of one :func:`~pytest_kerasmp.shared_empty` array are written by the workers
        themselves, straight from their memory: a large output assembled from parts comes
        back with no copy by the caller. Any other array is filled by the caller. Returns the
        arrays of ``into``, as a list. A task that fails leaves its array partly written;
        past ``timeout``, tasks still running are ended too (their workers replaced), so no
        late result lands in ``into`` after ``map`` raised.
        """
        __tracebackhide__ = True
        calls = list(zip(*iterables, strict=False))
        dests = [None] * len(calls) if into is None else self._destinations(into, len(calls))
        futures = [self._submit(fn, xs, {}, self.task_timeout_s, None, d) for xs, d in zip(calls, dests, strict=True)]
        results = self._gather(futures, timeout, "map", fn, end_running=into is not None)
        if into is None:
            return results
        from pytest_kerasmp.runtime.wire.shared import copy_into

        for future, result, dest in zip(futures, results, dests, strict=True):
            if result is not dest:  # not written by the worker: copy it here (the same check)
                copy_into(dest, result, f"task {future.task_id} ({getattr(fn, '__qualname__', fn)})")  # type: ignore[attr-defined]
        return dests

    def broadcast(self, fn: Callable[..., Any], /, *args: Any, timeout: float | None = None, **kwargs: Any) -> list[Any]:
        """Run ``fn`` once on every worker (e.g. to warm a model); one result per worker."""
        __tracebackhide__ = True
        futures = [self._submit(fn, args, kwargs, self.task_timeout_s, w) for w in range(len(self.slots))]
        return self._gather(futures, timeout, "broadcast", fn)

    def pids(self) -> list[int | None]:
        """The current process id of each worker (changes when a worker is replaced; on Ray,
        the pid on the worker's node)."""
        return [w.pid if w.state != "dead" else None for w in self._dispatcher.workers]

    def nodes(self) -> list[str]:
        """The Ray node id of each worker's slot ("" for a local slot)."""
        return [w.slot.node for w in self._dispatcher.workers]

    def health(self) -> str | None:
        """None while the pool can run tasks; else why it cannot (closed, terminated, broken)."""
        if self._closed:
            return self._ended_why or "it was closed"
        if self._dispatcher.broken is not None:
            return f"it broke ({self._dispatcher.broken})"
        return None

    def restart(self) -> None:
        """Start the pool afresh, with the arguments it was made with: what is left of it is
        terminated first (its pending tasks fail), then new workers start on the same slots;
        the same object serves again (the session pool fixture uses this)."""
        if not self._finished:
            self.terminate("restarted")
        slots, options = self._init_args
        try:
            self.__init__(slots, **options)  # type: ignore[misc]
        except BaseException as exc:
            self._closed = self._finished = True
            self._ended_why = f"its restart failed ({type(exc).__name__}: {exc})"
            raise

    def close(self, timeout: float = 60.0, *, cancel_pending: bool = False) -> None:
        """Finish queued tasks within ``timeout``, then stop the workers; returns within
        ``timeout`` plus a few seconds.

        Past ``timeout`` (or at once with ``cancel_pending``) queued tasks fail with
        :class:`PoolClosedError`; tasks still running then are killed (their stacks
        attached) and fail with it too. No worker is replaced during close, and no worker
        process or shared memory outlives this call.
        """
        if self._closed:
            return
        d = self._begin_close("it was closed (close() was called)")
        try:
            if cancel_pending:
                d.fail_queued("close(cancel_pending=True)")
            d.wake()
            d.thread.join(timeout)
            if d.thread.is_alive():
                d.dump_on_abort = True
                d.abort = f"close(timeout={timeout:g}) expired"
                d.wake()
                d.thread.join(5.0)
        except BaseException:  # Ctrl-C while closing: end it now
            self.terminate("interrupted during close()")
            raise
        self._finish(f"close(timeout={timeout:g}) expired", stop_timeout=2.0)

    def terminate(self, why: str = "terminated") -> None:
        """End the pool now (Ctrl-C, interpreter exit), also while a close() waits:
        queued and running tasks fail with :class:`PoolClosedError` naming ``why``;
        running workers are killed."""
        if self._finished:
            return
        d = self._begin_close(f"it was terminated ({why})")
        d.abort = why
        d.kill_workers()
        d.wake()
        d.thread.join(2.0)
        self._finish(why, stop_timeout=0.0)

    def close_after_with(self, failed: bool) -> None:
        self.close(cancel_pending=failed)  # after an error in the block, queued work is dropped

    # ---------------------------------------------------------------------------- private

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout_s: float | None,
        worker: int | None,
        into: Any = None,
    ) -> Future[Any]:
        __tracebackhide__ = True
        d = self._dispatcher
        name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}"
        if self._closed:
            raise PoolClosedError(POOL_CLOSED.format(pool=self.name, fn=name))
        if d.broken is not None:
            raise PoolBrokenError(POOL_BROKEN.format(pool=self.name, cause=d.broken))
        call, buffers = self.backend.pack(fn, args, kwargs)
        task = new_task(d, next(self._ids), call, buffers, name, timeout_s, worker, into)
        d.enqueue(task)
        return task.future

    @staticmethod
    def _destinations(into: Any, tasks: int) -> list[Any]:
        """``into`` as a list of writable numpy arrays, one per task; else the error."""
        import numpy as np

        if not isinstance(into, Sequence):
            shape = f" of shape {into.shape}" if isinstance(into, np.ndarray) else ""
            raise TypeError(INTO_BAD.format(tasks=tasks, got=f"a {type(into).__name__}{shape}"))
        if len(into) != tasks:
            raise ValueError(INTO_BAD.format(tasks=tasks, got=f"{len(into)} items"))
        for i, d in enumerate(into):
            if not isinstance(d, np.ndarray) or not d.flags.writeable:
                what = "a read-only array" if isinstance(d, np.ndarray) else f"a {type(d).__name__}"
                raise ValueError(INTO_BAD.format(tasks=tasks, got=f"{what} at index {i}"))
        return list(into)

    def _gather(
        self, futures: list[Future[Any]], timeout: float | None, what: str, fn: Any, end_running: bool = False,
    ) -> list[Any]:
        __tracebackhide__ = True
        try:
            done, not_done = wait_futures(futures, timeout)
        except BaseException as exc:
            if is_interrupt(exc):  # Ctrl-C, SIGTERM: end the pool now, not in 60 s
                self.terminate("interrupted while waiting for its tasks")
            else:  # pytest-timeout, a signal handler: end this call's tasks, keep the pool
                self._dispatcher.abandon(futures, interrupted_why(f"{what}({getattr(fn, '__qualname__', fn)})", exc))
            raise
        if not_done:
            for f in not_done:
                f.cancel()
            if end_running:
                self._dispatcher.abandon(list(not_done), f"{what}(into=...) timed out after {timeout:g} s")
            raise TaskTimeoutError(MAP_TIMED_OUT.format(
                what=what, fn=getattr(fn, "__qualname__", fn), pool=self.name, timeout=timeout,
                done=len(done), total=len(futures),
            ))
        return [f.result() for f in futures]

    def _begin_close(self, why: str) -> TaskQueue:
        """Refuse new tasks from now on; no worker is replaced any more."""
        d = self._dispatcher
        self._ended_why = self._ended_why or why
        self._closed = True
        with d.lock:
            d.closing = True
        return d

    def _finish(self, why: str, stop_timeout: float) -> None:
        """After the dispatcher stopped: resolve whatever is left, end every worker."""
        self._dispatcher.finish(why, stop_timeout)
        self._finished = True
        owners.unregister_owner(self)
