"""The Ray backend of :class:`~pytest_kerasmp.InferenceServer`: the server is a Ray actor.

``InferenceServer(model_ref, backend="ray")`` makes a :class:`RayInferenceServer`: the same
dynamic batching (``_server._Server`` runs in the actor, fed by concurrent actor calls) and
the same client semantics (each request answered exactly once, ids, timeouts, busy, closed,
died). The actor is named, so a :class:`RayInferenceClient` works in any process on any
node that can reach the cluster: it connects to the cluster's address and looks the actor
up by name on first use. Arrays travel through Ray's object store.
"""

from __future__ import annotations

import secrets
import time
import warnings
from typing import Any

from pytest_kerasmp.errors import (
    RAY_STARTUP_TIMED_OUT,
    SERVER_CLOSE_TIMED_OUT,
    SERVER_CLOSED,
    SERVER_DIED,
    STARTUP_ADVICE_TRACEBACK,
    STARTUP_FAILED,
    KerasMPWarning,
    RemoteTraceback,
    ServerClosedError,
    ServerDiedError,
    WorkerStartupError,
)
from pytest_kerasmp.modelref import ModelRef
from pytest_kerasmp.ray import output
from pytest_kerasmp.ray.cluster import check_feasible, connect, kill_actor, plan_ray_slots
from pytest_kerasmp.ray.connect import CONNECT_TIMEOUT_S
from pytest_kerasmp.ray.dispatch import ray_failure
from pytest_kerasmp.ray.pool import actor_options
from pytest_kerasmp.runtime import lifecycle
from pytest_kerasmp.runtime.server import InferenceClient, InferenceServer, _clients, _closed, check_options
from pytest_kerasmp.runtime.wire import Answer, Busy, Closed, Failed
from pytest_kerasmp.slots import placement
from pytest_kerasmp.slots.devices import DeviceSlot

NAMESPACE = "kerasmp"


#: At most this many requests wait in a Ray server (each holds an actor thread).
RAY_MAX_QUEUE = 128

class RayInferenceClient(InferenceClient):
    """A client of a :class:`RayInferenceServer`, for any process that can reach the cluster
    (pickle it to a pool's workers, a ``multiprocessing`` child, a Ray task...)."""

    def __init__(self, actor_name: str, cluster: str, *args: Any) -> None:
        self.actor_name, self.cluster = actor_name, cluster
        super().__init__(*args)

    def _setup(self) -> None:
        super()._setup()
        self._handle: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_handle", None)
        return state

    def _actor(self) -> Any:
        if self._handle is None:
            ray = connect(self.cluster, quiet=True)
            try:
                self._handle = ray.get_actor(self.actor_name, namespace=NAMESPACE)
            except ValueError:
                return None
        return self._handle

    def _forget(self) -> None:
        pass  # nothing per thread: a late answer goes to its own ObjectRef, never to another call

    def _round_trip(self, req_id: int, arrays: list[Any], what: str, deadline: float, timeout: float) -> tuple[Any, list[Any]]:
        import ray

        actor = self._actor()
        if actor is None:
            if self.address in _closed:
                raise ServerClosedError(self._message(SERVER_CLOSED, what))
            raise ServerDiedError(self._message(SERVER_DIED, what, " (its Ray actor is gone)"))
        ref = actor.predict.remote(req_id, arrays)
        try:
            reply = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(self._no_answer(what, timeout)) from None
        except ray.exceptions.RayActorError as exc:
            if self.address in _closed:
                raise ServerClosedError(self._message(SERVER_CLOSED, what)) from None
            how, _ = ray_failure(exc)
            raise ServerDiedError(self._message(SERVER_DIED, what, f" ({how})")) from exc
        if isinstance(reply, (Busy, Closed, Failed)):
            return reply, []
        specs = [(0, o.nbytes, o.shape, o.dtype.str) for o in reply]
        return Answer(req_id, specs, False), list(reply)


class RayInferenceServer(InferenceServer):
    """:class:`InferenceServer` as a Ray actor on a Ray slot (default: the cluster's first)."""

    def __init__(
        self,
        model_ref: ModelRef,
        slot: DeviceSlot | None = None,
        *,
        max_batch_size: int = 64,
        max_delay_ms: float = 2.0,
        max_queue: int = 1024,
        request_timeout_s: float = 60.0,
        busy_timeout_s: float = 10.0,
        start_timeout_s: float = 120.0,
        start_method: str = "spawn",
        name: str = "server",
        backend: str = "ray",
        ray_address: str | None = None,
        ray_reserve: bool = True,
        ray_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        from pytest_kerasmp.ray.actor import ServerWorker

        check_options(model_ref, max_batch_size, max_queue, max_delay_ms)
        self.ray = ray = connect(ray_address, timeout_s=ray_timeout_s)
        slot = slot or plan_ray_slots()[0]
        check_feasible([slot], f"inference server {name!r}")
        self.name, self.slot, self.model_ref = name, slot, model_ref
        self.request_timeout_s, self.busy_timeout_s, self.max_queue = request_timeout_s, busy_timeout_s, max_queue
        self.actor_name = f"kerasmp-{name}-{secrets.token_hex(6)}"
        self.address = f"ray:{self.actor_name}".encode()
        self.cluster = ray.get_runtime_context().gcs_address
        self._closed = False
        self.pid = 0
        # Each waiting request holds one of the actor's threads: the queue is capped to what
        # the threads allow, so that a full queue answers Busy and close() still gets a thread.
        self.max_queue = max_queue = min(max_queue, RAY_MAX_QUEUE)
        options = {"max_batch_size": max_batch_size, "max_delay_ms": max_delay_ms, "max_queue": max_queue}
        ray_options = actor_options(slot, self.actor_name, ray_reserve)
        ray_options.update(name=self.actor_name, namespace=NAMESPACE, max_concurrency=max_queue + 8)
        output.register(name, slot)
        self.actor = ray.remote(ServerWorker).options(**ray_options).remote(slot.to_json(), model_ref, options, name)
        try:
            info = self._wait_ready(start_timeout_s)
        except BaseException:
            kill_actor(self.actor)
            raise
        self.pid = info["pid"]
        self.inputs, self.outputs = info["specs"]
        lifecycle.register_owner(self)
        self._client = self.client()

    def _who(self) -> str:
        return f"inference server {self.name!r} ({self.slot.describe()}{f', pid {self.pid}' if self.pid else ''})"

    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        ray = self.ray
        try:
            info: dict[str, Any] = ray.get(self.actor.ready.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise WorkerStartupError(RAY_STARTUP_TIMED_OUT.format(who=self._who(), timeout=timeout)) from None
        except ray.exceptions.RayActorError as exc:
            how, hint = ray_failure(exc, self.slot.node)
            raise ServerDiedError(f"{self._who()} ended before it was ready, with {how}; {hint}") from exc
        if info["failure"]:
            self.pid = info["pid"]
            reason = info["failure"].strip().splitlines()[-1]
            error = WorkerStartupError(STARTUP_FAILED.format(who=self._who(), reason=reason, advice=STARTUP_ADVICE_TRACEBACK))
            error.__cause__ = RemoteTraceback(info["failure"])
            raise error
        return info

    def client(self, *, request_timeout_s: float | None = None, busy_timeout_s: float | None = None) -> RayInferenceClient:
        """A picklable client for this server, for any process that can reach the cluster."""
        return RayInferenceClient(
            self.actor_name, self.cluster, self.address, self.name, self.pid, self.slot.describe(), self.inputs, self.outputs,
            self.request_timeout_s if request_timeout_s is None else request_timeout_s,
            self.busy_timeout_s if busy_timeout_s is None else busy_timeout_s,
            self.max_queue,
        )

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.ray.get(self.actor.stats.remote(), timeout=self.request_timeout_s)
        return stats

    def is_alive(self) -> bool:
        try:
            self.ray.get(self.actor.ready.remote(), timeout=5.0)
        except Exception:
            return False
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Answer every accepted request, then stop; kill past ``timeout`` (with a warning
        that carries the actor's stacks)."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        for client in list(_clients.get(self.address, ())):
            client._drain(deadline)
        self._closed = True
        _closed.add(self.address)
        self._client.close()
        ray = self.ray
        left = None
        try:
            remaining = max(0.0, deadline - time.monotonic())
            left = ray.get(self.actor.drain.remote(remaining), timeout=remaining + 2.0)
        except ray.exceptions.RayActorError:
            left = 0  # already gone: its requests failed with ServerDiedError
        except Exception:
            left = -1
        if left:
            try:
                stacks = ray.get(self.actor.stacks.remote(), timeout=1.0)
            except Exception:
                stacks = None
            warnings.warn(SERVER_CLOSE_TIMED_OUT.format(
                name=self.name, pid=self.pid, slot=self.slot.describe(), timeout=timeout, stacks=stacks or "(none)",
            ), KerasMPWarning, stacklevel=2)
        kill_actor(self.actor)
        placement.release(self.pid or None)
        lifecycle.unregister_owner(self)

    def terminate(self, why: str = "terminated") -> None:
        if self._closed:
            return
        self._closed = True
        _closed.add(self.address)
        kill_actor(self.actor)
        placement.release(self.pid or None)
        lifecycle.unregister_owner(self)
