"""InferenceServer: one process owns a Keras model on one slot; any process calls it.

Requests from every client are batched dynamically (up to ``max_batch_size`` rows, or
``max_delay_ms`` after the oldest waiting request arrived) and each is answered exactly
once, with its rows or an error. Arrays cross through the same shared-memory arenas as the
worker pool; the socket carries only small control tuples.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from typing import Any

from pytest_kerasmp import _server, placement
from pytest_kerasmp._server import input_problem
from pytest_kerasmp.devices import DeviceSlot
from pytest_kerasmp.errors import (
    SERVER_BUSY,
    SERVER_DIED,
    SERVER_DIED_STARTING,
    SERVER_NO_ANSWER,
    SERVER_STARTUP_FAILED,
    WORKER_START_TIMEOUT,
    RemoteTraceback,
    ServerBusyError,
    ServerDiedError,
    WorkerStartupError,
    unpack_exception,
)
from pytest_kerasmp.modelref import ModelRef
from pytest_kerasmp.pool import end_process, how_it_died
from pytest_kerasmp.transport import Arena

_live_servers: weakref.WeakSet[InferenceServer] = weakref.WeakSet()
_ids = itertools.count()


class InferenceClient:
    """A picklable handle on an :class:`InferenceServer`; works in any process.

    Each thread of each process gets its own connection, made on first use, so one
    client can be shared by a pool's workers, by ``multiprocessing`` children and by
    threads. Arrays are checked against the model's inputs before they are sent.
    """

    def __init__(
        self,
        address: bytes,
        name: str,
        pid: int,
        slot: str,
        inputs: Sequence[tuple[tuple[Any, ...], str, str]],
        request_timeout_s: float,
        busy_timeout_s: float,
        max_queue: int,
    ) -> None:
        self.address, self.name, self.pid, self.slot = address, name, pid, slot
        self.max_queue = max_queue
        self.inputs = [tuple(i) for i in inputs]
        self.request_timeout_s = request_timeout_s
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._executor: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_local"], state["_executor"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._executor = None

    # ------------------------------------------------------------------------- public

    def predict(self, x: Any, *, timeout: float | None = None) -> Any:
        """Predict one sample (no batch axis) or a batch; a numpy array (a list if many outputs).

        ``x`` is an array, or a list (or dict by input name) of arrays for a multi-input
        model. Raises ValueError for an array that does not fit the model,
        :class:`ServerBusyError`, :class:`ServerDiedError`, or ``TimeoutError`` after
        ``timeout`` (default ``request_timeout_s``).
        """
        import numpy as np

        arrays, single = self._prepare(x)
        what = f"#{next(_ids)} of process {os.getpid()}"
        deadline = time.monotonic() + (self.request_timeout_s if timeout is None else timeout)
        busy_until = time.monotonic() + self.busy_timeout_s
        pause = 0.001
        while True:
            msg, outputs = self._round_trip(arrays, what, deadline)
            if msg[0] != "busy":
                break
            if time.monotonic() + pause > min(busy_until, deadline):
                raise ServerBusyError(
                    SERVER_BUSY.format(name=self.name, queue=self.max_queue, waited=self.busy_timeout_s, what=what)
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        if msg[0] == "error":
            raise unpack_exception(msg[2], msg[3])
        results = [np.frombuffer(b, dtype).reshape(shape) for b, (_, _, shape, dtype) in zip(outputs, msg[2], strict=True)]
        if single:
            results = [r[0] for r in results]
        return results[0] if len(results) == 1 else results

    def submit(self, x: Any, *, timeout: float | None = None) -> Future[Any]:
        """:meth:`predict` in a background thread of this process; a Future of its result."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kerasmp-client")
        return self._executor.submit(self.predict, x, timeout=timeout)

    def close(self) -> None:
        """Close this thread's connection and the background threads (optional)."""
        self._forget()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------------ private

    def _prepare(self, x: Any) -> tuple[list[Any], bool]:
        import numpy as np

        if isinstance(x, dict):
            missing = [name for _, _, name in self.inputs if name not in x]
            if missing:
                raise ValueError(f"request lacks input(s) {missing}; the model's inputs are {[n for *_, n in self.inputs]}")
            x = [x[name] for _, _, name in self.inputs]
        arrays = [np.asarray(a) for a in (x if isinstance(x, (list, tuple)) else [x])]
        single = len(arrays) == len(self.inputs) and arrays[0].ndim == len(self.inputs[0][0])
        if single:  # one sample without its batch axis
            arrays = [a[None] for a in arrays]
        problem = input_problem(arrays, self.inputs, "of this process")
        if problem is not None:
            raise ValueError(problem)
        return [np.ascontiguousarray(a, dtype) for a, (_, dtype, _) in zip(arrays, self.inputs, strict=True)], single

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
                raise ServerDiedError(self._died(what, f" (connecting failed: {exc.strerror})")) from None
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

    def _died(self, what: str, how: str = "") -> str:
        return SERVER_DIED.format(name=self.name, pid=self.pid, slot=self.slot, how=how, what=what)

    def _ask(
        self, conn: Connection, msg: tuple[Any, ...], what: str, deadline: float, outbox: Arena | None = None
    ) -> tuple[Any, ...]:
        """Send ``msg`` and wait for the answer until ``deadline``: ServerDiedError or TimeoutError."""
        try:
            conn.send(msg)
            if outbox is not None:
                outbox.hand_over(conn)
            answered = conn.poll(max(0.0, deadline - time.monotonic()))
            reply = conn.recv() if answered else None
        except (EOFError, OSError):
            self._forget()
            raise ServerDiedError(self._died(what)) from None
        if reply is None:
            self._forget()  # its late answer must not reach the next request
            raise TimeoutError(SERVER_NO_ANSWER.format(name=self.name, what=what, timeout=self.request_timeout_s))
        return reply

    def _round_trip(self, arrays: list[Any], what: str, deadline: float) -> tuple[tuple[Any, ...], list[bytearray]]:
        conn, outbox, inbox = self._connection(what)
        layout = outbox.write(arrays)
        specs = [(o, s, a.shape, a.dtype.str) for (o, s), a in zip(layout, arrays, strict=True)]
        msg = self._ask(conn, ("predict", 0, specs, outbox.fresh), what, deadline, outbox)
        if msg[0] == "ok" and msg[3]:
            inbox.receive(conn)
        outputs = inbox.read([(o, s) for o, s, _, _ in msg[2]]) if msg[0] == "ok" else []
        return msg, outputs


class InferenceServer:
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
    """

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
        name: str = "server",
    ) -> None:
        if not isinstance(model_ref, ModelRef):
            raise TypeError(f"model_ref must be a pytest_kerasmp.ModelRef (ModelRef.save(model, dir)), got {type(model_ref).__name__}")
        if max_batch_size < 1 or max_queue < 1 or max_delay_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_delay_ms >= 0")
        if slot is None:
            from pytest_kerasmp.devices import plan_slots
            from pytest_kerasmp.pinning import current_slot

            slot = current_slot() or plan_slots("auto")[0]
        self.name, self.slot, self.model_ref = name, slot, model_ref
        self.request_timeout_s, self.busy_timeout_s = request_timeout_s, busy_timeout_s
        self.max_queue = max_queue
        self.address = b"\0kerasmp-" + f"{os.getpid()}-{secrets.token_hex(8)}".encode()
        options = {"max_batch_size": max_batch_size, "max_delay_ms": max_delay_ms, "max_queue": max_queue}
        ctx = multiprocessing.get_context("spawn")
        self._control, child = ctx.Pipe(duplex=True)
        self._process = ctx.Process(
            target=_server.main,
            args=(child, slot.to_json_text(), os.getpid(), model_ref, options, self.address),
            name=f"kerasmp-{name}",
        )
        self._closed = False
        self._process.start()
        child.close()
        _live_servers.add(self)
        try:
            self.pid, self.inputs, self.outputs = self._wait_ready(start_timeout_s)
        except BaseException:
            self._stop(timeout=2.0)
            raise
        self._client = self.client()

    # ------------------------------------------------------------------------- public

    def client(self, *, request_timeout_s: float | None = None, busy_timeout_s: float | None = None) -> InferenceClient:
        """A picklable client for this server, for this or any other process."""
        return InferenceClient(
            self.address, self.name, self.pid, self.slot.describe(), self.inputs,
            self.request_timeout_s if request_timeout_s is None else request_timeout_s,
            self.busy_timeout_s if busy_timeout_s is None else busy_timeout_s,
            self.max_queue,
        )

    def predict(self, x: Any, *, timeout: float | None = None) -> Any:
        """:meth:`InferenceClient.predict` from this process."""
        return self._client.predict(x, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        """requests, batches, mean_batch_size, queue_wait_p50_s/p99_s, compute_p50_s/p99_s,
        errors, busy (refused), waiting, traces (of the forward function)."""
        client = self._client
        conn, _, _ = client._connection("stats")
        return client._ask(conn, ("stats",), "stats", time.monotonic() + self.request_timeout_s)[1]

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Answer every accepted request, then stop; terminate and kill past ``timeout``."""
        if self._closed:
            return
        self._client.close()
        self._stop(timeout)

    def __enter__(self) -> InferenceServer:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------ private

    def _wait_ready(self, timeout: float) -> tuple[int, list[Any], list[Any]]:
        ready = wait([self._control, self._process.sentinel], timeout=timeout)
        msg = None
        if self._control in ready:
            try:
                msg = self._control.recv()
            except (EOFError, OSError):
                msg = None
        if msg is not None and msg[0] == "ready":
            return msg[1], msg[2], msg[3]
        slot = self.slot.describe()
        if msg is not None:
            reason = msg[1].strip().splitlines()[-1]
            error = WorkerStartupError(SERVER_STARTUP_FAILED.format(name=self.name, slot=slot, reason=reason))
            error.__cause__ = RemoteTraceback(msg[1])
            raise error
        if not ready:
            raise WorkerStartupError(WORKER_START_TIMEOUT.format(index=0, slot=slot, pool=self.name, timeout=timeout))
        self._process.join(1.0)
        how = how_it_died(self._process.exitcode)[0]
        raise ServerDiedError(SERVER_DIED_STARTING.format(name=self.name, slot=slot, how=how))

    def _stop(self, timeout: float) -> None:
        self._closed = True
        try:
            self._control.send(("stop",))
        except OSError:
            pass
        self._process.join(timeout)
        end_process(self._process)
        placement.release(self._process.pid)  # issue 10: its end, for the placement table
        self._control.close()
        _live_servers.discard(self)


def _close_all_at_exit() -> None:
    for server in list(_live_servers):
        server.close(timeout=2.0)


atexit.register(_close_all_at_exit)
