"""The Ray backend of :class:`~pytest_kerasmp.InferenceServer`: the server is a Ray actor.

``InferenceServer(model_ref, backend="ray")`` runs on a :class:`RayServerBackend` (found by
name through ``runtime.backends``): the same dynamic batching (``runtime.serve.child``'s loop runs
in the actor, fed by concurrent actor calls) and the same client semantics (each request answered exactly once, ids, timeouts, busy, closed,
died). The actor is named, so a :class:`RayInferenceClient` works in any process on any
node that can reach the cluster: it connects to the cluster's address and looks the actor
up by name on first use. Arrays travel through Ray's object store.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

from pytest_kerasmp.errors import (
    RAY_STARTUP_TIMED_OUT,
    SERVER_CLOSED,
    SERVER_DIED,
    STARTUP_ADVICE_TRACEBACK,
    STARTUP_FAILED,
    RemoteTraceback,
    ServerClosedError,
    ServerDiedError,
    WorkerStartupError,
)
from pytest_kerasmp.ray import output
from pytest_kerasmp.ray.backend import RayBackend
from pytest_kerasmp.ray.cluster import check_feasible, connect, kill_actor, plan_ray_slots
from pytest_kerasmp.ray.connect import CONNECT_TIMEOUT_S
from pytest_kerasmp.ray.dispatch import ray_failure
from pytest_kerasmp.ray.pool import actor_options
from pytest_kerasmp.runtime.serve.client import InferenceClient, _closed, machine
from pytest_kerasmp.runtime.wire.messages import Answer, Busy, Closed, Failed
from pytest_kerasmp.slots import placement

NAMESPACE = "kerasmp"


#: At most this many requests wait in a Ray server (each fallback call holds an actor thread).
RAY_MAX_QUEUE = 128

#: What this process found of each server, by (cluster, actor name): its actor handle, and
#: where its loop listens (None until asked). Kept for the process's life, so that a client
#: unpickled again (one per task of a pool, say) asks Ray nothing: the names are unique.
_found: dict[tuple[str, str], tuple[Any, dict[str, Any] | None]] = {}


class RayInferenceClient(InferenceClient):
    """A client of a Ray server, for any process that can reach the cluster (pickle it to a
    pool's workers, a ``multiprocessing`` child, a Ray task...).

    It finds the actor by name once per process and asks where its loop listens. On the
    server's machine (same boot and network namespace) it then talks to the loop directly,
    exactly as a local client does (its socket, shared-memory arenas: no Ray on the request
    path); elsewhere each request is an actor call, the fallback, into the same loop.
    """

    def __init__(self, actor_name: str, cluster: str, *args: Any) -> None:
        self.actor_name, self.cluster = actor_name, cluster
        super().__init__(*args)

    def _setup(self) -> None:
        super()._setup()
        self._direct: tuple[int, bool] | None = None  # (pid, whether this process talks directly)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_direct", None)
        return state

    def _actor(self) -> Any:
        found = _found.get((self.cluster, self.actor_name))
        if found is None:
            ray = connect(self.cluster, quiet=True)
            try:
                found = _found[(self.cluster, self.actor_name)] = (ray.get_actor(self.actor_name, namespace=NAMESPACE), None)
            except ValueError:
                return None
        return found[0]

    def direct(self) -> bool:
        """Whether this process reaches the server's loop directly (same machine)."""
        import ray

        if self._direct is None or self._direct[0] != os.getpid():
            actor = self._actor()
            if actor is None:
                return False  # gone: the fallback says how
            endpoint = _found[(self.cluster, self.actor_name)][1]
            if endpoint is None:
                try:
                    endpoint = ray.get(actor.endpoint.remote(), timeout=self.request_timeout_s)
                except Exception:
                    return False
                _found[(self.cluster, self.actor_name)] = (actor, endpoint)
            self.socket_address = endpoint["address"]
            self._direct = (os.getpid(), endpoint["machine"] == machine())
        return self._direct[1]

    def _talks_directly(self) -> bool:
        # Known already (a request by a thread found out): finding out calls Ray, which may
        # wait, and submit does not wait.
        return self._direct == (os.getpid(), True)

    def stats(self) -> dict[str, Any]:
        import ray

        if self.direct():
            return super().stats()
        actor = self._actor()
        if actor is None:
            raise ServerDiedError(self._message(SERVER_DIED, "stats", " (its Ray actor is gone)"))
        stats: dict[str, Any] = ray.get(actor.stats.remote(), timeout=self.request_timeout_s)
        return stats

    def _round_trip(self, req_id: int, arrays: list[Any], what: str, deadline: float, timeout: float) -> tuple[Any, list[Any]]:
        import ray

        if self.direct():
            return super()._round_trip(req_id, arrays, what, deadline, timeout)
        actor = self._actor()
        if actor is None:
            if self.address in _closed:
                raise ServerClosedError(self._message(SERVER_CLOSED, what))
            raise ServerDiedError(self._message(SERVER_DIED, what, " (its Ray actor is gone)"))
        ref = actor.predict.remote(req_id, arrays, max(0.0, deadline - time.monotonic()))
        try:
            reply = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()) + 1.0)
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


class RayServerBackend:
    """The server as a named Ray actor on a Ray slot (default: the cluster's first), as
    ``config`` says (made by :meth:`RayBackend.for_server <pytest_kerasmp.RayBackend>`)."""

    name = "ray"

    def __init__(self, config: RayBackend) -> None:
        self.address, self.reserve = config.address, config.reserve
        self.timeout_s = CONNECT_TIMEOUT_S if config.timeout_s is None else config.timeout_s

    def start(self, server: Any, start_timeout_s: float) -> RayServer:
        ray = connect(self.address, timeout_s=self.timeout_s)
        server.slot = server.slot or plan_ray_slots()[0]
        check_feasible([server.slot], f"inference server {server.name!r}")
        # Each waiting request holds one of the actor's threads: the queue is capped to what
        # the threads allow, so that a full queue answers Busy and close() still gets a thread.
        server.max_queue = server.options["max_queue"] = min(server.max_queue, RAY_MAX_QUEUE)
        return RayServer(ray, server, self.reserve, start_timeout_s)


class RayServer:
    """A started Ray server actor."""

    def __init__(self, ray: Any, server: Any, reserve: bool, start_timeout_s: float) -> None:
        from pytest_kerasmp.ray.actor import ServerWorker

        self.ray = ray
        self.name, self.slot, self.max_queue = server.name, server.slot, server.max_queue
        self.actor_name = f"kerasmp-{server.name}-{secrets.token_hex(6)}"
        self.address = f"ray:{self.actor_name}".encode()
        self.cluster = ray.get_runtime_context().gcs_address
        self.pid = 0
        ray_options = actor_options(self.slot, self.actor_name, reserve)
        ray_options.update(name=self.actor_name, namespace=NAMESPACE, max_concurrency=self.max_queue + 8)
        output.register(server.name, self.slot)
        self.actor = ray.remote(ServerWorker).options(**ray_options).remote(self.slot.to_json(), server.model_ref, server.options, server.name)
        try:
            info = self._wait_ready(start_timeout_s)
        except BaseException:
            kill_actor(self.actor)
            raise
        self.pid = info["pid"]
        self.inputs, self.outputs = info["specs"]

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

    def client(self, server: Any, request_timeout_s: float, busy_timeout_s: float) -> RayInferenceClient:
        """A picklable client, for any process that can reach the cluster."""
        return RayInferenceClient(
            self.actor_name, self.cluster, self.address, self.name, self.pid, self.slot.describe(), self.inputs,
            self.outputs, request_timeout_s, busy_timeout_s, self.max_queue,
        )

    def is_alive(self) -> bool:
        try:
            self.ray.get(self.actor.ready.remote(), timeout=5.0)
        except Exception:
            return False
        return True

    def stop(self, timeout: float) -> str | None:
        """Answer what it accepted, then end; past ``timeout``, its stacks and the kill."""
        ray = self.ray
        left = None
        try:
            left = ray.get(self.actor.drain.remote(timeout), timeout=timeout + 2.0)
        except ray.exceptions.RayActorError:
            left = 0  # already gone: its requests failed with ServerDiedError
        except Exception:
            left = -1
        stacks = None
        if left:
            try:
                stacks = ray.get(self.actor.stacks.remote(), timeout=1.0) or "(none)"
            except Exception:
                stacks = "(none)"
        self.kill()
        return stacks

    def kill(self) -> None:
        kill_actor(self.actor)
        placement.release(self.pid or None)
