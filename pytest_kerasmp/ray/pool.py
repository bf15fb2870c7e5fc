"""The Ray backend of :class:`~pytest_kerasmp.WorkerPool`: one Ray actor per slot.

``WorkerPool(slots, backend="ray")`` runs on a :class:`RayPoolBackend` (found by name through
``runtime.backends``): the same pool, API and errors, with Ray actors in place of local
children. One dispatcher thread owns the workers and the queue, as on the local backend;
Ray's completion callbacks only post events to it. Arguments and results travel through
Ray's object store.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import Any

from pytest_kerasmp import frameworks
from pytest_kerasmp.errors import (
    RAY_STARTUP_TIMED_OUT,
    STARTUP_ADVICE_NONE,
    STARTUP_ADVICE_TRACEBACK,
    STARTUP_FAILED,
    RemoteTraceback,
    WorkerStartupError,
)
from pytest_kerasmp.ray import output
from pytest_kerasmp.ray.actor import MAIN_ENV, NICE_ENV
from pytest_kerasmp.ray.backend import RayBackend
from pytest_kerasmp.ray.cluster import check_feasible, connect, kill_actor, slot_resources
from pytest_kerasmp.ray.connect import CONNECT_TIMEOUT_S
from pytest_kerasmp.ray.dispatch import STACKS_S, RayDispatcher, RayWorker, ray_failure
from pytest_kerasmp.runtime.pool.taskqueue import PoolSpec
from pytest_kerasmp.runtime.process import childio
from pytest_kerasmp.runtime.wire import transport
from pytest_kerasmp.runtime.wire.transport import dumps_call
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
    if childio.quiet_logs():  # as for local children: the framework's start-up logs off
        env.update(frameworks.active().quiet_environ())
    env["KERAS_BACKEND"] = frameworks.backend_name()[0]  # the session's, on every node
    for key in (SESSION_ENV, "PYTEST_XDIST_WORKER"):  # so that the actor records its placement
        if os.environ.get(key):
            env[key] = os.environ[key]
    main = transport.main_script()
    if main:  # imported by the actor as local children do: task functions defined there resolve
        env[MAIN_ENV] = main
    env[NICE_ENV] = str(os.getpriority(os.PRIO_PROCESS, 0))  # taken back from Ray's niceness
    return {
        "num_cpus": res["CPU"] if reserve else 0, "num_gpus": res.get("GPU", 0.0), "max_restarts": 0,
        "max_concurrency": 3,  # run, stacks, watch
        "scheduling_strategy": NodeAffinitySchedulingStrategy(slot.node, soft=False),
        "runtime_env": {"env_vars": env}, "name": None, "lifetime": None,
    }


class RayPoolBackend:
    """Workers as Ray actors on the slots' nodes (slots from :func:`~pytest_kerasmp.plan_ray_slots`),
    as ``config`` says (made by :meth:`RayBackend.for_pool <pytest_kerasmp.RayBackend>`)."""

    name = "ray"
    start_method = "ray"

    def __init__(self, config: RayBackend) -> None:
        self.address, self.reserve = config.address, config.reserve
        self.timeout_s = CONNECT_TIMEOUT_S if config.timeout_s is None else config.timeout_s
        self.ray: Any = None
        self._gens = itertools.count()

    def start(self, pool: PoolSpec) -> RayDispatcher:
        self.ray = connect(self.address, timeout_s=self.timeout_s)
        check_feasible(pool.slots, f"pool {pool.name!r}")
        deadline = time.monotonic() + pool.start_timeout_s
        workers = [self.start_worker(pool, i, s) for i, s in enumerate(pool.slots)]
        try:
            self._wait_started(pool, workers, deadline)
        except BaseException:
            for w in workers:
                kill_actor(w.actor)
            raise
        return RayDispatcher(pool, self, workers)

    def pack(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, list[Any]]:
        """Pickled now, as on the local backend (the caller may change its arrays at once),
        its large buffers copied straight into Ray's object store (the actor maps them)."""
        return dumps_call(fn, args, kwargs, copy=self._to_object_store)

    # ------------------------------------------------------------------------- workers

    def start_worker(self, pool: PoolSpec, index: int, slot: DeviceSlot, **fields: Any) -> RayWorker:
        from pytest_kerasmp.ray.actor import SlotWorker

        label = f"kerasmp-{pool.name}-w{index}"
        cls = self.ray.remote(SlotWorker).options(**actor_options(slot, label, self.reserve))
        output.register(f"{pool.name} w{index}", slot)
        actor = cls.remote(slot.to_json(), pool.init_call, pool.warm_import, f"{pool.name} w{index}")
        return RayWorker(index, slot, actor, actor.ready.remote(), next(self._gens), **fields)

    def who(self, pool: PoolSpec, w: RayWorker) -> str:
        pid = f", pid {w.pid}" if w.pid else ""
        return f"worker {w.index} ({w.slot.describe()}{pid}) of pool {pool.name!r}"

    def check_ready(self, pool: PoolSpec, w: RayWorker, info: Any = None, error: BaseException | None = None) -> None:
        """Mark ``w`` ready from its ready() answer, or raise its WorkerStartupError."""
        if error is not None:
            how, hint = ray_failure(error)
            exc = WorkerStartupError(STARTUP_FAILED.format(who=self.who(pool, w), reason=f"it ended before it was ready, with {how} ({hint})", advice=STARTUP_ADVICE_NONE))
            exc.__cause__ = error
            raise exc
        w.pid, w.ip = info["pid"], info["ip"]
        if info["failure"]:
            reason = info["failure"].strip().splitlines()[-1]
            exc = WorkerStartupError(STARTUP_FAILED.format(who=self.who(pool, w), reason=reason, advice=STARTUP_ADVICE_TRACEBACK))
            exc.__cause__ = RemoteTraceback(info["failure"])
            raise exc
        w.state = "idle"

    def _wait_started(self, pool: PoolSpec, workers: list[RayWorker], deadline: float) -> None:
        refs = {w.ready: w for w in workers}
        while refs:
            done, _ = self.ray.wait(list(refs), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                w = next(iter(refs.values()))
                raise WorkerStartupError(RAY_STARTUP_TIMED_OUT.format(who=self.who(pool, w), timeout=pool.start_timeout_s))
            w = refs.pop(done[0])
            try:
                info = self.ray.get(done[0], timeout=STACKS_S)
            except Exception as exc:
                self.check_ready(pool, w, error=exc)
            else:
                self.check_ready(pool, w, info)

    def _to_object_store(self, view: Any) -> Any:
        """A large buffer of a call copied into Ray's object store (the actor maps it, read-only)."""
        import numpy as np

        return self.ray.put(np.frombuffer(view, np.uint8))
