"""``InferenceClient.submit`` without a thread switch per request: a pipeline per process.

``submit`` ran ``predict`` in a thread pool: the caller woke a pool thread, which woke the
caller again with the answer. With 8 client processes sending single samples to the tiny
model, that cost 105-145 us of CPU per request in each client, against 45 us for a plain
``predict`` loop (``/tmp/perf/srvprof.py`` in the CHANGELOG's measurement). A pipeline is one
connection per client per process: the caller's thread writes its request and returns a
Future; one reader thread matches answers to futures by id, several per wake-up.

Several requests are in flight on the connection at once, so their arrays travel inside the
messages (``PredictInline``, ``AnswerInline``), which is only done when the request and its
answer are both smaller than ``transport.SHM_MIN_BYTES``: larger ones go through the thread
pool and the arenas, as the transport sends every buffer of that size. A request the server
refuses as busy is handed to the thread pool too, which retries it as ``predict`` does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any

from pytest_kerasmp.errors import (
    CLIENT_CLOSED,
    SEND_INTERRUPTED,
    SERVER_CLOSED,
    SERVER_DIED,
    ServerClosedError,
    ServerDiedError,
    unpack_exception,
)
from pytest_kerasmp.runtime.process.watcher import readable
from pytest_kerasmp.runtime.wire.messages import AnswerInline, Busy, Closed, Failed, PredictInline, pack, unpack

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from pytest_kerasmp.runtime.serve.client import InferenceClient

#: An idle reader thread waits this long for the next request before it ends.
LINGER_S = 1.0
#: The reader looks at the deadlines at least this often while requests wait.
POLL_S = 0.1


def answer_row_bytes(outputs: list[tuple[tuple[Any, ...], str]]) -> int:
    """Bytes of one row of the model's outputs (1 TB when a dimension is unknown)."""
    import numpy as np

    if any(d is None for shape, _ in outputs for d in shape):
        return 1 << 40
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in outputs)


class _Entry:
    __slots__ = ("future", "packed", "single", "deadline", "timeout", "what")

    def __init__(self, future: Future[Any], packed: list[Any], single: bool, timeout: float, what: str) -> None:
        self.future, self.packed, self.single, self.timeout, self.what = future, packed, single, timeout, what
        self.deadline = time.monotonic() + timeout


class Pipeline:
    """One connection of ``client`` in this process for submitted requests.

    Two locks: ``sending`` keeps messages whole, ``lock`` guards ``pending``, ``reader`` and
    ``broken`` and is never held while sending, reading or completing a future, so the
    reader keeps reading (and the server keeps sending) while a caller waits for room to
    send. Only the reader closes the connection while it runs; others shut the socket down,
    which wakes it (a descriptor closed under a reading thread could be reused meanwhile).
    """

    def __init__(self, client: InferenceClient, conn: Connection) -> None:
        self.client, self.conn = client, conn
        self.sending = threading.Lock()
        self.lock = threading.Lock()
        self.pending: dict[int, _Entry] = {}
        self.reader: threading.Thread | None = None
        self.broken = False

    def submit(self, req_id: int, arrays: list[Any], single: bool, timeout: float, what: str) -> Future[Any]:
        """Send the request now; its Future is completed by the reader thread."""
        packed = pack(arrays)  # a copy: the caller may reuse its arrays at once
        entry = _Entry(Future(), packed, single, timeout, what)
        with self.lock:
            if self.broken:
                raise ConnectionError("pipeline closed")  # the client makes a new one
            self.pending[req_id] = entry
            if self.reader is None:
                reader = threading.Thread(target=self._read, name="kerasmp-client-reader", daemon=True)
                reader.start()
                self.reader = reader
        try:
            with self.sending:
                self.conn.send(PredictInline(req_id, packed))
        except BaseException as exc:
            # A send cut short (Ctrl-C, a dead or stuck server) leaves the stream unusable:
            # every request on it fails, each saying where and why.
            self._break(exc)
            if not isinstance(exc, OSError):
                raise
        return entry.future

    def close(self) -> None:
        """Wait for the requests in flight (each up to its own deadline), then hang up;
        a request that slipped in meanwhile fails, saying so."""
        with self.lock:
            entries = list(self.pending.values())
        if entries:
            latest = max(e.deadline for e in entries)
            wait_futures([e.future for e in entries], max(0.0, latest - time.monotonic()) + 1.0)
        self._break(None, closing=True)

    # ------------------------------------------------------------------------ the reader

    def _read(self) -> None:
        try:
            self._read_until_idle()
        except BaseException as exc:  # never leave futures that nothing will complete
            self._break(exc)
            raise
        finally:
            with self.lock:
                self.reader = None
                if self.broken:
                    self.conn.close()

    def _read_until_idle(self) -> None:
        conn, idle_since = self.conn, time.monotonic()
        while True:
            with self.lock:
                if self.broken:
                    return
                now = time.monotonic()
                if self.pending:  # woken at least every POLL_S: a shorter timeout than the others' is kept
                    idle_since = now
                    wait_s = min(min(e.deadline for e in self.pending.values()) - now, POLL_S)
                elif now - idle_since >= LINGER_S:
                    self.broken = True  # idle: the next request opens a new pipeline
                    return
                else:
                    wait_s = LINGER_S - (now - idle_since)
            try:
                while readable(conn.fileno(), max(0.0, wait_s)):
                    self._settle(conn.recv())
                    wait_s = 0.0  # every answer already here, then look at the deadlines again
            except (EOFError, OSError) as exc:
                self._break(exc)
                return
            self._expire()

    def _settle(self, msg: Any) -> None:
        with self.lock:
            entry = self.pending.pop(msg.id, None)
        if entry is None:  # timed out already: its late answer goes nowhere
            return
        client = self.client
        if isinstance(msg, AnswerInline):
            _complete(entry.future, client._as_returned(unpack(msg.arrays, writable=True), entry.single))
        elif isinstance(msg, Failed):
            _fail(entry.future, unpack_exception(msg.exc, msg.text))
        elif isinstance(msg, Closed):
            _fail(entry.future, ServerClosedError(client._message(SERVER_CLOSED, entry.what)))
        elif isinstance(msg, Busy):  # the thread pool retries it, as predict does, until busy_timeout_s
            remaining = max(0.0, entry.deadline - time.monotonic())
            retry = client._in_thread(unpack(entry.packed), entry.single, remaining)
            retry.add_done_callback(lambda done: _chain(done, entry.future))

    def _expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            late = [(i, e) for i, e in self.pending.items() if e.deadline <= now]
            for i, _ in late:
                del self.pending[i]
        for _, entry in late:
            _fail(entry.future, TimeoutError(self.client._no_answer(entry.what, entry.timeout)))

    def _break(self, exc: BaseException | None, closing: bool = False) -> None:
        """The connection is unusable (or closed): fail what waits on it, saying why."""
        wake = -1
        with self.lock:
            self.broken = True
            entries, self.pending = list(self.pending.values()), {}
            if self.reader is None:
                self.conn.close()
            elif self.reader is not threading.current_thread() and not self.conn.closed:
                wake = os.dup(self.conn.fileno())  # the reader wakes, and closes the connection
        if wake >= 0:
            with socket.socket(fileno=wake) as sock, contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        client = self.client
        for entry in entries:
            error: BaseException
            if client._closed_by_owner():
                error = ServerClosedError(client._message(SERVER_CLOSED, entry.what))
            elif closing:
                error = ConnectionError(client._message(CLIENT_CLOSED, entry.what))
            elif isinstance(exc, BlockingIOError):  # SO_SNDTIMEO: the server read nothing for a whole timeout
                error = TimeoutError(client._no_answer(entry.what, entry.timeout) + " (it stopped reading requests)")
            elif isinstance(exc, (EOFError, OSError)):
                error = ServerDiedError(client._message(SERVER_DIED, entry.what))
            else:
                error = ConnectionError(client._message(SEND_INTERRUPTED, entry.what, f" ({type(exc).__name__})"))
            _fail(entry.future, error)


def _complete(future: Future[Any], value: Any) -> None:
    with contextlib.suppress(InvalidStateError):  # cancelled by its caller meanwhile
        future.set_result(value)


def _fail(future: Future[Any], exc: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        future.set_exception(exc)


def _chain(done: Future[Any], future: Future[Any]) -> None:
    exc = done.exception()
    if exc is not None:
        _fail(future, exc)
    else:
        _complete(future, done.result())
