"""InferenceServer: one process owns a Keras model on one slot; any process calls it.

Requests from every client are batched dynamically (up to ``max_batch_size`` rows, or
``max_delay_ms`` after the oldest waiting request arrived) and each is answered exactly
once, with its rows or an error. Arrays cross through the same shared-memory arenas as the
worker pool; the socket carries only small control tuples.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from multiprocessing.connection import Connection
from typing import Any, Self

from pytest_kerasmp.errors import (
    SERVER_BUSY,
    SERVER_CLOSE_TIMED_OUT,
    SERVER_CLOSED,
    SERVER_DIED,
    SERVER_NO_ANSWER,
    KerasMPWarning,
    ServerBusyError,
    ServerClosedError,
    ServerDiedError,
    unpack_exception,
)
from pytest_kerasmp.modelref import ModelRef
from pytest_kerasmp.ray.connect import CONNECT_TIMEOUT_S
from pytest_kerasmp.runtime import lifecycle
from pytest_kerasmp.runtime.lifecycle import Child
from pytest_kerasmp.runtime.serving import InputSpec, input_problem
from pytest_kerasmp.runtime.transport import Arena
from pytest_kerasmp.runtime.wire import Answer, Busy, Closed, Failed, Predict, Stats, StatsRequest, Stop
from pytest_kerasmp.slots.devices import DeviceSlot

_ids = itertools.count()
#: The clients of each server address in this process, so that close() can wait for the
#: requests they were handed (client.submit) before it stops the server.
_clients: dict[bytes, weakref.WeakSet[InferenceClient]] = {}
#: Addresses of servers this process closed on purpose (their errors say so).
_closed: set[bytes] = set()


class InferenceClient:
    """A picklable handle on an :class:`InferenceServer`; works in any process.

    Each thread of each process gets its own connection, made on first use, so one
    client can be shared by a pool's workers, by ``multiprocessing`` children and by
    threads. Arrays are checked against the model's inputs before they are sent. Every
    answer is matched to its request by id; a call that is interrupted (a timeout, Ctrl-C)
    drops its connection and arenas, so a late answer can never reach the next call and the
    server never reads an input that is being overwritten.
    """

    def __init__(
        self,
        address: bytes,
        name: str,
        pid: int,
        slot: str,
        inputs: Sequence[tuple[tuple[Any, ...], str, str]],
        outputs: Sequence[tuple[tuple[Any, ...], str]],
        request_timeout_s: float,
        busy_timeout_s: float,
        max_queue: int,
    ) -> None:
        self.address, self.name, self.pid, self.slot = address, name, pid, slot
        self.max_queue = max_queue
        self.inputs: list[InputSpec] = [(tuple(shape), dtype, name) for shape, dtype, name in inputs]
        self.outputs: list[tuple[tuple[Any, ...], str]] = [(tuple(shape), dtype) for shape, dtype in outputs]
        self.request_timeout_s = request_timeout_s
        self.busy_timeout_s = busy_timeout_s
        self._setup()

    def _setup(self) -> None:
        self._local = threading.local()
        self._executor: ThreadPoolExecutor | None = None
        self._outstanding: set[Future[Any]] = set()
        self._lock = threading.Lock()
        _clients.setdefault(self.address, weakref.WeakSet()).add(self)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_local", "_executor", "_outstanding", "_lock"):
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    # ------------------------------------------------------------------------- public

    def predict(self, x: Any, *, timeout: float | None = None) -> Any:
        """Predict one sample (no batch axis) or a batch; a numpy array (a list if many outputs).

        ``x`` is an array, or a list (or dict by input name) of arrays for a multi-input
        model; a batch of 0 rows gives 0 rows. Raises ValueError for an array that does
        not fit the model, :class:`ServerBusyError`, :class:`ServerDiedError`,
        :class:`ServerClosedError`, or ``TimeoutError`` after ``timeout`` (default
        ``request_timeout_s``).
        """
        __tracebackhide__ = True
        import numpy as np

        arrays, single = self._prepare(x)
        if arrays[0].shape[0] == 0:
            empty = [np.empty((0, *shape), dtype) for shape, dtype in self.outputs]
            return empty[0] if len(empty) == 1 else empty
        req_id = next(_ids)
        what = f"#{req_id} of process {os.getpid()}"
        timeout = self.request_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        busy_until = time.monotonic() + self.busy_timeout_s
        pause = 0.001
        while True:
            msg, outputs = self._round_trip(req_id, arrays, what, deadline, timeout)
            if not isinstance(msg, Busy):
                break
            if time.monotonic() + pause > deadline:
                raise TimeoutError(self._no_answer(what, timeout) + " (its queue stayed full)")
            if time.monotonic() + pause > busy_until:
                raise ServerBusyError(
                    SERVER_BUSY.format(name=self.name, queue=self.max_queue, waited=self.busy_timeout_s, what=what)
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        if isinstance(msg, Failed):
            raise unpack_exception(msg.exc, msg.text)
        if isinstance(msg, Closed):
            raise ServerClosedError(self._message(SERVER_CLOSED, what))
        results = [np.frombuffer(b, dtype).reshape(shape) for b, (_, _, shape, dtype) in zip(outputs, msg.specs, strict=True)]
        if single:
            results = [r[0] for r in results]
        return results[0] if len(results) == 1 else results

    def submit(self, x: Any, *, timeout: float | None = None) -> Future[Any]:
        """:meth:`predict` in a background thread of this process; a Future of its result.

        The input is copied at once, so the caller may reuse it; the server's ``close()``
        in this process waits for the requests handed over this way.
        """
        import numpy as np

        x = {k: np.array(v) for k, v in x.items()} if isinstance(x, dict) else (
            [np.array(a) for a in x] if isinstance(x, (list, tuple)) else np.array(x)
        )
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kerasmp-client")
            future = self._executor.submit(self.predict, x, timeout=timeout)
            self._outstanding.add(future)
        future.add_done_callback(self._outstanding.discard)
        return future

    def close(self) -> None:
        """Close this thread's connection and the background threads (optional)."""
        self._forget()
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    # ------------------------------------------------------------------------ private

    def _drain(self, deadline: float) -> None:
        """Wait (until ``deadline``) for the requests handed to :meth:`submit`."""
        pending = list(self._outstanding)
        if pending:
            wait_futures(pending, max(0.0, deadline - time.monotonic()))

    def _prepare(self, x: Any) -> tuple[list[Any], bool]:
        import numpy as np

        if isinstance(x, dict):
            missing = [name for _, _, name in self.inputs if name not in x]
            if missing:
                from pytest_kerasmp.slots.devices import plural

                raise ValueError(
                    f"request lacks {plural(len(missing), 'input')} {missing}; "
                    f"the model's inputs are {[n for *_, n in self.inputs]}"
                )
            x = [x[name] for _, _, name in self.inputs]
        arrays = [np.asarray(a) for a in (x if isinstance(x, (list, tuple)) else [x])]
        single = len(arrays) == len(self.inputs) and all(
            a.ndim == len(i[0]) for a, i in zip(arrays, self.inputs, strict=True)
        )
        batch = [a[None] for a in arrays] if single else arrays
        if input_problem(batch, self.inputs, "") is not None:  # described as the caller sent it
            raise ValueError(input_problem(arrays, self.inputs, "the request", batch_axis=not single))
        return [np.ascontiguousarray(a, dtype) for a, (_, dtype, _) in zip(batch, self.inputs, strict=True)], single

    def _connection(self, what: str) -> tuple[Connection, Arena, Arena]:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():  # first use here, or a forked copy
            local.__dict__.clear()
            local.pid = os.getpid()
        if getattr(local, "conn", None) is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.address)
            except OSError as exc:
                sock.close()
                if self.address in _closed:
                    raise ServerClosedError(self._message(SERVER_CLOSED, what)) from None
                raise ServerDiedError(self._message(SERVER_DIED, what, f" (connecting failed: {exc.strerror})")) from None
            local.conn = Connection(sock.detach())
            local.outbox, local.inbox = Arena(), Arena()
        return local.conn, local.outbox, local.inbox

    def _forget(self) -> None:
        local = self._local
        for key in ("conn", "outbox", "inbox"):
            obj = getattr(local, key, None)
            if obj is not None:
                obj.close()
            setattr(local, key, None)

    def _message(self, template: str, what: str, how: str = "") -> str:
        return template.format(name=self.name, pid=self.pid, slot=self.slot, how=how, what=what)

    def _no_answer(self, what: str, timeout: float) -> str:
        return SERVER_NO_ANSWER.format(name=self.name, pid=self.pid, slot=self.slot, what=what, timeout=timeout)

    def _ask(self, msg: Any, what: str, deadline: float, timeout: float, outbox: Arena | None = None) -> Any:
        """Send ``msg`` and wait until ``deadline`` for the answer with its id (stale answers
        are skipped). Any failure, an interrupt included, drops the connection and arenas."""
        conn, _, inbox = self._connection(what)
        try:
            reply = self._exchange(conn, inbox, msg, deadline, outbox)
        except BaseException as exc:
            self._forget()  # interrupted or broken: no late answer can reach the next request
            if not isinstance(exc, (EOFError, OSError)):
                raise
            if self.address in _closed:
                raise ServerClosedError(self._message(SERVER_CLOSED, what)) from None
            raise ServerDiedError(self._message(SERVER_DIED, what)) from None
        if reply is None:
            self._forget()
            raise TimeoutError(self._no_answer(what, timeout))
        return reply

    @staticmethod
    def _exchange(conn: Connection, inbox: Arena, msg: Any, deadline: float, outbox: Arena | None) -> Any:
        conn.send(msg)
        if outbox is not None:
            outbox.hand_over(conn)
        while conn.poll(max(0.0, deadline - time.monotonic())):
            reply = conn.recv()
            if isinstance(reply, Answer) and reply.grew:
                inbox.receive(conn)
            if getattr(reply, "id", None) == msg.id:
                return reply
        return None

    def _round_trip(
        self, req_id: int, arrays: list[Any], what: str, deadline: float, timeout: float
    ) -> tuple[Any, list[bytearray]]:
        conn, outbox, inbox = self._connection(what)
        try:
            layout = outbox.write(arrays)
        except BaseException:
            self._forget()
            raise
        specs = [(o, s, a.shape, a.dtype.str) for (o, s), a in zip(layout, arrays, strict=True)]
        msg = self._ask(Predict(req_id, specs, outbox.fresh), what, deadline, timeout, outbox)
        outputs = inbox.read([(o, s) for o, s, _, _ in msg.specs]) if isinstance(msg, Answer) else []
        return msg, outputs


def check_options(model_ref: ModelRef, max_batch_size: int, max_queue: int, max_delay_ms: float) -> None:
    """A server's model and batching options, or the error that says what is wrong."""
    if not isinstance(model_ref, ModelRef):
        raise TypeError(f"model_ref must be a pytest_kerasmp.ModelRef (ModelRef.save(model, dir)), got {type(model_ref).__name__}")
    if max_batch_size < 1 or max_queue < 1 or max_delay_ms < 0:
        raise ValueError("max_batch_size and max_queue must be >= 1 and max_delay_ms >= 0")


class InferenceServer(lifecycle.Owned):
    """One process that owns a Keras model on one slot and serves batched predictions.

    Args:
        model_ref: The model, as a :class:`ModelRef` (loaded in the server process).
        slot: The slot to pin the server to; default: the session's slot 0 (or the first
            planned slot outside pytest).
        max_batch_size: Rows per batch at most; larger requests are split and reassembled.
        max_delay_ms: How long the oldest waiting request may wait for a fuller batch.
        max_queue: Accepted requests waiting at most; beyond, callers wait (up to
            ``busy_timeout_s``) and then get :class:`ServerBusyError`; 0 s fails at once.
        request_timeout_s: Default bound on one ``predict`` call.
        start_timeout_s: Bound on loading and warming the model.
        start_method: ``"spawn"`` (default) or ``"forkserver"``.
        backend: ``"local"`` (default) or ``"ray"``: the server is a Ray actor on a Ray
            slot (default: the cluster's first), with the same batching and client
            semantics; its clients work in any process that can reach the cluster.
        ray_address: With ``backend="ray"``: the cluster (default: the one this process is
            connected to, else a new local one).
        ray_reserve: With ``backend="ray"``: reserve the slot's CPUs in Ray (default), or
            share them with pools and servers on the same slot.
        ray_timeout_s: With ``backend="ray"`` and an address: the bound on connecting to it.
    """

    def __new__(cls, *args: Any, backend: str = "local", **kwargs: Any) -> Self:
        from pytest_kerasmp.errors import BACKEND_UNKNOWN

        if backend not in ("local", "ray"):
            raise ValueError(BACKEND_UNKNOWN.format(backend=backend))
        if backend == "ray" and cls is InferenceServer:
            from pytest_kerasmp.ray.server import RayInferenceServer

            return super().__new__(RayInferenceServer)  # type: ignore[return-value]
        return super().__new__(cls)

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
        backend: str = "local",
        ray_address: str | None = None,
        ray_reserve: bool = True,
        ray_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        check_options(model_ref, max_batch_size, max_queue, max_delay_ms)
        if slot is None:
            from pytest_kerasmp.slots.devices import plan_slots
            from pytest_kerasmp.slots.pinning import current_slot

            slot = current_slot() or plan_slots("auto")[0]
        self.name, self.slot, self.model_ref = name, slot, model_ref
        self.request_timeout_s, self.busy_timeout_s = request_timeout_s, busy_timeout_s
        self.max_queue = max_queue
        self.address = b"\0kerasmp-" + f"{os.getpid()}-{secrets.token_hex(8)}".encode()
        options = {"max_batch_size": max_batch_size, "max_delay_ms": max_delay_ms, "max_queue": max_queue}
        self._closed = False
        self._child = Child(
            "server", f"kerasmp-{name}", slot, (model_ref, options, self.address),
            start_method=start_method, who=f"inference server {name!r} ({{slot}}, pid {{pid}})", label=name,
        )
        try:
            ready = self._child.wait_ready(start_timeout_s, died_error=ServerDiedError)
        except BaseException:
            self._child.stop(grace=0.0)
            raise
        self.pid = ready.pid
        self.inputs, self.outputs = ready.info
        lifecycle.register_owner(self)
        self._client = self.client()

    # ------------------------------------------------------------------------- public

    def client(self, *, request_timeout_s: float | None = None, busy_timeout_s: float | None = None) -> InferenceClient:
        """A picklable client for this server, for this or any other process."""
        return InferenceClient(
            self.address, self.name, self.pid, self.slot.describe(), self.inputs, self.outputs,
            self.request_timeout_s if request_timeout_s is None else request_timeout_s,
            self.busy_timeout_s if busy_timeout_s is None else busy_timeout_s,
            self.max_queue,
        )

    def predict(self, x: Any, *, timeout: float | None = None) -> Any:
        """:meth:`InferenceClient.predict` from this process."""
        __tracebackhide__ = True
        return self._client.predict(x, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        """requests, batches, mean_batch_size, queue_wait_p50_s/p99_s, compute_p50_s/p99_s,
        errors, busy (refused), waiting, traces (of the forward function)."""
        req = StatsRequest(next(_ids))
        reply = self._client._ask(req, "stats", time.monotonic() + self.request_timeout_s, self.request_timeout_s)
        assert isinstance(reply, Stats)
        return reply.data

    def is_alive(self) -> bool:
        return self._child.is_alive()

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
        try:
            self._child.conn.send(Stop())
        except OSError:
            pass
        if not self._child.wait(max(0.0, deadline - time.monotonic())):  # past the bound: say where it was stuck
            stacks = self._child.dump_stacks()
            warnings.warn(SERVER_CLOSE_TIMED_OUT.format(
                name=self.name, pid=self.pid, slot=self.slot.describe(), timeout=timeout, stacks=stacks or "(none)",
            ), KerasMPWarning, stacklevel=2)
        self._child.stop(grace=0.0)
        lifecycle.unregister_owner(self)

    def terminate(self, why: str = "terminated") -> None:
        """Stop the server now (Ctrl-C, interpreter exit); pending requests fail at once."""
        if self._closed:
            return
        self._closed = True
        _closed.add(self.address)
        self._child.stop(grace=0.0)
        lifecycle.unregister_owner(self)

    def close_after_with(self, failed: bool) -> None:
        self.close()
