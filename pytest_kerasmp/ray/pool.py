"""The Ray backend of :class:`~pytest_kerasmp.WorkerPool`: one Ray actor per slot.

``WorkerPool(slots, backend="ray")`` makes a :class:`RayWorkerPool`: the same public API
(``map``, ``broadcast``, ``__enter__``... are inherited) and the same errors, with Ray
actors in place of local children. One dispatcher thread owns the workers and the queue, as
on the local backend; Ray's completion callbacks only post events to it. Arguments and
results travel through Ray's object store.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from pytest_kerasmp.errors import (
    POOL_CLOSED,
    RAY_STARTUP_TIMED_OUT,
    STARTUP_ADVICE_NONE,
    STARTUP_ADVICE_TRACEBACK,
    STARTUP_FAILED,
    PoolClosedError,
    RemoteTraceback,
    WorkerStartupError,
)
from pytest_kerasmp.ray import output
from pytest_kerasmp.ray.actor import MAIN_ENV
from pytest_kerasmp.ray.cluster import check_feasible, connect, kill_actor, slot_resources
from pytest_kerasmp.ray.connect import CONNECT_TIMEOUT_S
from pytest_kerasmp.ray.dispatch import STACKS_S, RayDispatcher, RayWorker, ray_failure
from pytest_kerasmp.runtime import lifecycle
from pytest_kerasmp.runtime.dispatch import PoolStats
from pytest_kerasmp.runtime.pool import WorkerPool, checked_slots
from pytest_kerasmp.runtime.taskqueue import new_task
from pytest_kerasmp.runtime.transport import dumps_call
from pytest_kerasmp.slots import placement
from pytest_kerasmp.slots.devices import DeviceSlot
from pytest_kerasmp.slots.placement import SESSION_ENV


def actor_options(slot: DeviceSlot, name: str, reserve: bool = True) -> dict[str, Any]:
    """Ray options that put an actor on ``slot``: its node (hard), its CPUs/GPUs (the CPUs
    only with ``reserve``: else it shares them, as local pools share a slot's cores), and the
    slot's environment (plus this process's import path) set before Python starts in it."""
    import sys

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    res = slot_resources(slot)
    env = {k: v for k, v in slot.environ().items() if not (slot.kind == "GPU" and k == "CUDA_VISIBLE_DEVICES")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if isinstance(p, str) and p and os.path.isdir(p))
    if lifecycle.quiet_logs():  # as for local children: TensorFlow's C++ start-up logs off
        env["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    for key in (SESSION_ENV, "PYTEST_XDIST_WORKER"):  # so that the actor records its placement
        if os.environ.get(key):
            env[key] = os.environ[key]
    main = lifecycle.main_script()
    if main:  # imported by the actor as local children do: task functions defined there resolve
        env[MAIN_ENV] = main
    return {
        "num_cpus": res["CPU"] if reserve else 0, "num_gpus": res.get("GPU", 0.0), "max_restarts": 0,
        "max_concurrency": 3,  # run, stacks, watch
        "scheduling_strategy": NodeAffinitySchedulingStrategy(slot.node, soft=False),
        "runtime_env": {"env_vars": env}, "name": None, "lifetime": None,
    }


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
        ray_reserve: bool = True,
        ray_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self._reserve = ray_reserve
        self.name, self.slots, self.start_method = name, checked_slots(slots), "ray"
        self.ray = connect(ray_address, timeout_s=ray_timeout_s)
        self.task_timeout_s, self.start_timeout_s = task_timeout_s, start_timeout_s
        self.stats = PoolStats()
        self._import_tf = import_tensorflow
        self._init_call = dumps_call(initializer, tuple(initargs), {}, out_of_band=False)[0] if initializer else None
        self._ids, self._gens = itertools.count(), itertools.count()
        self._closed = self._finished = False
        self._ended_why = None
        check_feasible(self.slots, f"pool {name!r}")
        t0 = time.monotonic()
        workers = [self.start_worker(i, s) for i, s in enumerate(self.slots)]
        try:
            self._wait_started(workers, t0 + start_timeout_s)
        except BaseException:
            for w in workers:
                kill_actor(w.actor)
            raise
        self.stats.start_s = time.monotonic() - t0
        self._dispatcher = RayDispatcher(self, workers)
        lifecycle.register_owner(self)
        self._dispatcher.thread.start()

    # ------------------------------------------------------------------------- workers

    def start_worker(self, index: int, slot: DeviceSlot, **fields: Any) -> RayWorker:
        from pytest_kerasmp.ray.actor import SlotWorker

        label = f"kerasmp-{self.name}-w{index}"
        cls = self.ray.remote(SlotWorker).options(**actor_options(slot, label, self._reserve))
        output.register(f"{self.name} w{index}", slot)
        actor = cls.remote(slot.to_json(), self._init_call, self._import_tf, f"{self.name} w{index}")
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

    def _to_object_store(self, view: Any) -> Any:
        """A large buffer of a call copied into Ray's object store (the actor maps it, read-only)."""
        import numpy as np

        return self.ray.put(np.frombuffer(view, np.uint8))

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
        self._ended_why = self._ended_why or "it was closed (close() was called)"
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
        self._ended_why = self._ended_why or f"it was terminated ({why})"
        d.closing, d.abort = True, why
        d.post(("wake",))
        d.thread.join(2.0)
        self._end(why)

    def _end(self, why: str) -> None:
        d = self._dispatcher
        d.fail_everything(why)
        for w in d.workers:
            w.state = "dead"
            kill_actor(w.actor)
            placement.release(w.pid)
        self._finished = True
        lifecycle.unregister_owner(self)

    def _submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], timeout_s: float | None, worker: int | None,
    ) -> Future[Any]:
        __tracebackhide__ = True
        name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}"
        if self._closed:
            raise PoolClosedError(POOL_CLOSED.format(pool=self.name, fn=name))
        # Pickled (and its arrays copied) now, as on the local backend: the caller may change
        # its arrays at once; a live model or an unimportable function is refused here.
        call, buffers = dumps_call(fn, args, kwargs, copy=self._to_object_store)
        task = new_task(self._dispatcher, next(self._ids), call, buffers, name, timeout_s, worker)
        self._dispatcher.enqueue(task)
        return task.future
