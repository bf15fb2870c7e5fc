"""InferenceServer: one process owns a Keras model on one slot; any process calls it.

Requests from every client are batched dynamically (up to ``max_batch_size`` rows, or
``max_delay_ms`` after the oldest waiting request arrived) and each is answered exactly
once, with its rows or an error. The server process runs on an execution backend
(``runtime.backends``): locally a child of this process (:class:`LocalServerBackend`), or a
Ray actor; this class is the same for both. Clients are in ``runtime.serve.client``.
"""

from __future__ import annotations

import os
import secrets
import time
import warnings
from typing import Any, Protocol

from pytest_kerasmp.errors import SERVER_CLOSE_TIMED_OUT, KerasMPWarning, ServerDiedError
from pytest_kerasmp.modelref import ModelRef
from pytest_kerasmp.runtime import backends
from pytest_kerasmp.runtime.process import owners
from pytest_kerasmp.runtime.process.lifecycle import Child
from pytest_kerasmp.runtime.serve.client import InferenceClient, _clients, _closed
from pytest_kerasmp.runtime.wire.messages import Stop
from pytest_kerasmp.slots.devices import DeviceSlot


class ServerHandle(Protocol):
    """A started server process, as its :class:`~pytest_kerasmp.InferenceServer` uses it."""

    pid: int
    address: bytes
    inputs: list[Any]
    outputs: list[Any]

    def client(self, server: Any, request_timeout_s: float, busy_timeout_s: float) -> InferenceClient: ...

    def stop(self, timeout: float) -> str | None:
        """Stop after answering what it accepted, within ``timeout``; past it, kill it and
        return its stacks (``"(none)"`` if it gave none); None when it stopped in time."""

    def kill(self) -> None: ...

    def is_alive(self) -> bool: ...


class ServerBackend(Protocol):
    name: str

    def start(self, server: Any, start_timeout_s: float) -> ServerHandle: ...


__all__ = ["InferenceClient", "InferenceServer", "LocalServerBackend"]


def check_options(model_ref: ModelRef, max_batch_size: int, max_queue: int, max_delay_ms: float) -> None:
    """A server's model and batching options, or the error that says what is wrong."""
    if not isinstance(model_ref, ModelRef):
        raise TypeError(f"model_ref must be a pytest_kerasmp.ModelRef (ModelRef.save(model, dir)), got {type(model_ref).__name__}")
    if max_batch_size < 1 or max_queue < 1 or max_delay_ms < 0:
        raise ValueError("max_batch_size and max_queue must be >= 1 and max_delay_ms >= 0")


class InferenceServer(owners.Owned):
    """One process that owns a Keras model on one slot and serves batched predictions.

    Args:
        model_ref: The model, as a :class:`ModelRef` (loaded in the server process).
        slot: The slot to pin the server to; default: the session's slot 0 (or the first
            planned slot outside pytest; on Ray, the cluster's first).
        max_batch_size: Rows per batch at most; larger requests are split and reassembled.
        max_delay_ms: How long the oldest waiting request may wait for a fuller batch (not
            at all when it came while a batch ran, or when every client that sends has as
            many requests waiting as it has ever had at once).
        adaptive_delay: Wait for a fuller batch only while another request is expected
            within one batch's compute time, judged from the recent gaps between arrivals
            (at low load a batch closes at once). False: always wait up to ``max_delay_ms``.
        max_queue: Accepted requests waiting at most; beyond, callers wait (up to
            ``busy_timeout_s``) and then get :class:`ServerBusyError`; 0 s fails at once.
        request_timeout_s: Default bound on one ``predict`` call.
        start_timeout_s: Bound on loading and warming the model.
        start_method: ``"spawn"`` (default) or ``"forkserver"``.
        backend: ``"local"`` (default) or ``"ray"``: the server is a Ray actor on a Ray
            slot, with the same batching and client semantics; its clients work in any
            process that can reach the cluster. Or a configured backend, e.g.
            ``RayBackend(address=..., reserve=False)`` (:class:`~pytest_kerasmp.RayBackend`).
        ray_address: Deprecated: ``backend=RayBackend(address=...)``.
        ray_reserve: Deprecated: ``backend=RayBackend(reserve=...)``.
        ray_timeout_s: Deprecated: ``backend=RayBackend(timeout_s=...)``.
    """

    def __init__(
        self,
        model_ref: ModelRef,
        slot: DeviceSlot | None = None,
        *,
        max_batch_size: int = 64,
        max_delay_ms: float = 2.0,
        adaptive_delay: bool = True,
        max_queue: int = 1024,
        request_timeout_s: float = 60.0,
        busy_timeout_s: float = 10.0,
        start_timeout_s: float = 120.0,
        start_method: str = "spawn",
        name: str = "server",
        backend: Any = "local",
        ray_address: str | None = None,
        ray_reserve: bool | None = None,
        ray_timeout_s: float | None = None,
    ) -> None:
        check_options(model_ref, max_batch_size, max_queue, max_delay_ms)
        backend = backends.from_ray_keywords(backend, "InferenceServer", ray_address, ray_reserve, ray_timeout_s)
        self.backend: ServerBackend = backends.for_server(backend, start_method)
        self.name, self.model_ref = name, model_ref
        self.slot: DeviceSlot | None = slot  # the backend's default when None
        self.request_timeout_s, self.busy_timeout_s = request_timeout_s, busy_timeout_s
        self.max_queue = max_queue
        self.options = {
            "max_batch_size": max_batch_size, "max_delay_ms": max_delay_ms, "max_queue": max_queue,
            "adaptive_delay": bool(adaptive_delay),
        }
        self._closed = False
        self._process: ServerHandle = self.backend.start(self, start_timeout_s)
        assert self.slot is not None
        self.pid, self.address = self._process.pid, self._process.address
        self.inputs, self.outputs = self._process.inputs, self._process.outputs
        owners.register_owner(self)
        self._client = self.client()

    # ------------------------------------------------------------------------- public

    def client(self, *, request_timeout_s: float | None = None, busy_timeout_s: float | None = None) -> InferenceClient:
        """A picklable client for this server, for this or any other process."""
        return self._process.client(
            self,
            self.request_timeout_s if request_timeout_s is None else request_timeout_s,
            self.busy_timeout_s if busy_timeout_s is None else busy_timeout_s,
        )

    def predict(self, x: Any, *, timeout: float | None = None) -> Any:
        """:meth:`InferenceClient.predict` from this process."""
        __tracebackhide__ = True
        return self._client.predict(x, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        """requests, batches, rows, mean_batch_size, batch_sizes (batches by row count, index
        0 to ``max_batch_size``), queue_wait_s and compute_s (totals), queue_wait_p50_s/p99_s,
        compute_p50_s/p99_s, errors, busy (refused), waiting, traces (of the forward function)."""
        return self._client.stats()

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Answer every accepted request, then stop; terminate and kill past ``timeout``.

        Requests handed to ``client.submit`` in this process are sent and answered first;
        later requests fail with :class:`ServerClosedError`.
        """
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        for client in list(_clients.get(self.address, ())):
            client._drain(deadline)
        self._closed = True
        _closed.add(self.address)
        self._client.close()
        stacks = self._process.stop(max(0.0, deadline - time.monotonic()))
        if stacks is not None:  # past the bound: say where it was stuck
            assert self.slot is not None
            warnings.warn(SERVER_CLOSE_TIMED_OUT.format(
                name=self.name, pid=self.pid, slot=self.slot.describe(), timeout=timeout, stacks=stacks,
            ), KerasMPWarning, stacklevel=2)
        owners.unregister_owner(self)

    def terminate(self, why: str = "terminated") -> None:
        """Stop the server now (Ctrl-C, interpreter exit); pending requests fail at once."""
        if self._closed:
            return
        self._closed = True
        _closed.add(self.address)
        self._process.kill()
        owners.unregister_owner(self)

    def close_after_with(self, failed: bool) -> None:
        self.close()


# ------------------------------------------------------------------ the local backend


class LocalServerBackend:
    """The server as a child process of this one, serving a Unix socket (abstract namespace)."""

    name = "local"

    def __init__(self, start_method: str = "spawn") -> None:
        self.start_method = start_method

    def start(self, server: InferenceServer, start_timeout_s: float) -> LocalServer:
        if server.slot is None:
            from pytest_kerasmp.slots.devices import plan_slots
            from pytest_kerasmp.slots.pinning import current_slot

            server.slot = current_slot() or plan_slots("auto")[0]
        return LocalServer(server, self.start_method, start_timeout_s)


class LocalServer:
    """A started local server process (``runtime.serve.child`` runs in it)."""

    def __init__(self, server: InferenceServer, start_method: str, start_timeout_s: float) -> None:
        assert server.slot is not None
        self.address = b"\0kerasmp-" + f"{os.getpid()}-{secrets.token_hex(8)}".encode()
        self.name, self.slot, self.max_queue = server.name, server.slot, server.max_queue
        self.child = Child(
            "server", f"kerasmp-{server.name}", server.slot, (server.model_ref, server.options, self.address),
            start_method=start_method, who=f"inference server {server.name!r} ({{slot}}, pid {{pid}})", label=server.name,
        )
        try:
            ready = self.child.wait_ready(start_timeout_s, died_error=ServerDiedError)
        except BaseException:
            self.child.stop(grace=0.0)
            raise
        self.pid: int = ready.pid
        self.inputs, self.outputs = ready.info

    def client(self, server: InferenceServer, request_timeout_s: float, busy_timeout_s: float) -> InferenceClient:
        return InferenceClient(
            self.address, self.name, self.pid, self.slot.describe(), self.inputs, self.outputs,
            request_timeout_s, busy_timeout_s, self.max_queue,
        )

    def stop(self, timeout: float) -> str | None:
        if self.child.is_alive():
            self.child.audit_network()  # what it listened on, before it closes its sockets
        try:
            self.child.conn.send(Stop())
        except OSError:
            pass
        stacks = None
        if not self.child.wait(timeout):
            stacks = self.child.dump_stacks() or "(none)"
        self.child.stop(grace=0.0)
        return stacks

    def kill(self) -> None:
        self.child.stop(grace=0.0)

    def is_alive(self) -> bool:
        return self.child.is_alive()
