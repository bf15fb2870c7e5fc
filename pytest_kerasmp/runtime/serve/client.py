"""InferenceClient: calls an :class:`~pytest_kerasmp.InferenceServer` from any process.

A client is picklable; each thread of each process that uses it gets its own connection to
the server's socket, made on first use. Arrays cross through the same shared-memory arenas as
the worker pool; the socket carries only small control tuples. Every answer is matched to
its request by id.

Submitted requests travel without a thread switch each, through a pipeline per process.
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
import itertools
import os
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from multiprocessing.connection import Connection
from typing import Any

from pytest_kerasmp.errors import (
    CLIENT_CLOSED,
    SEND_INTERRUPTED,
    SERVER_BUSY,
    SERVER_CLOSED,
    SERVER_DIED,
    SERVER_NO_ANSWER,
    ServerBusyError,
    ServerClosedError,
    ServerDiedError,
    unpack_exception,
)
from pytest_kerasmp.runtime.process.watcher import readable
from pytest_kerasmp.runtime.serve.child import InputSpec, input_problem
from pytest_kerasmp.runtime.wire.messages import (
    Answer,
    AnswerInline,
    Busy,
    Closed,
    Failed,
    Predict,
    PredictInline,
    Stats,
    StatsRequest,
    pack,
    unpack,
)
from pytest_kerasmp.runtime.wire.transport import SHM_MIN_BYTES, Arena, bound_blocking

_ids = itertools.count()
#: The clients of each server address in this process, so that close() can wait for the
#: requests they were handed (client.submit) before it stops the server.
_clients: dict[bytes, weakref.WeakSet[InferenceClient]] = {}
#: Addresses of servers this process closed on purpose (their errors say so).
_closed: set[bytes] = set()


def machine() -> str:
    """This machine and network namespace, as seen from inside (``boot_id`` and the netns
    inode): where two processes agree, a Unix socket in the abstract namespace and shared
    memory reach from one to the other."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return f"unknown:{os.getpid()}"  # never equal to another process's


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
        #: Where the server's socket listens (a Ray server's differs from its key, ``address``).
        self.socket_address = address
        self._setup()

    def _setup(self) -> None:
        self._local = threading.local()
        self._executor: tuple[int, ThreadPoolExecutor] | None = None  # (pid, its threads)
        self._outstanding: set[Future[Any]] = set()
        self._pipe: tuple[int, Pipeline] | None = None  # (pid, this process's pipeline)
        self._answer_row_bytes = answer_row_bytes(self.outputs)  # inside a message if small enough
        self._lock = threading.Lock()
        _clients.setdefault(self.address, weakref.WeakSet()).add(self)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_local", "_executor", "_outstanding", "_pipe", "_answer_row_bytes", "_lock"):
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
        arrays, single = self._prepare(x)
        return self._call(arrays, single, timeout)

    def _call(self, arrays: list[Any], single: bool, timeout: float | None) -> Any:
        """:meth:`predict` of arrays checked by :meth:`_prepare`, in this thread."""
        __tracebackhide__ = True
        import numpy as np

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
        return self._as_returned(
            [np.frombuffer(b, dtype).reshape(shape) for b, (_, _, shape, dtype) in zip(outputs, msg.specs, strict=True)],
            single,
        )

    @staticmethod
    def _as_returned(results: list[Any], single: bool) -> Any:
        """The model's outputs as :meth:`predict` returns them: without the batch axis for one
        sample, an array for a single output (else a list)."""
        if single:
            results = [r[0] for r in results]
        return results[0] if len(results) == 1 else results

    def submit(self, x: Any, *, timeout: float | None = None) -> Future[Any]:
        """:meth:`predict` in a background thread of this process; a Future of its result.

        The input is copied at once, so the caller may reuse it; the server's ``close()``
        in this process waits for the requests handed over this way.
        """
        timeout = self.request_timeout_s if timeout is None else timeout
        try:
            arrays, single = self._prepare(x)
        except ValueError as exc:
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            return failed
        # Large, or the server is not on this machine: predict in a thread, on a copy.
        future = self._pipelined(arrays, single, timeout) or self._in_thread([a.copy() for a in arrays], single, timeout)
        with self._lock:
            self._outstanding.add(future)
        future.add_done_callback(self._outstanding.discard)
        return future

    def stats(self) -> dict[str, Any]:
        """The server's stats (see :meth:`InferenceServer.stats`)."""
        req = StatsRequest(next(_ids))
        reply = self._ask(req, "stats", time.monotonic() + self.request_timeout_s, self.request_timeout_s)
        assert isinstance(reply, Stats)
        data: dict[str, Any] = reply.data
        return data

    def close(self) -> None:
        """Close this thread's connection and the background threads (optional), after the
        requests handed to :meth:`submit` in this process are answered or timed out."""
        self._forget()
        with self._lock:
            pipe, self._pipe = self._pipe, None
        if pipe is not None and pipe[0] == os.getpid():
            pipe[1].close()  # first: a request refused as busy meanwhile is retried by a thread
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None and executor[0] == os.getpid():
            executor[1].shutdown(wait=True)

    # ------------------------------------------------------------------------ private

    def _in_thread(self, arrays: list[Any], single: bool, timeout: float) -> Future[Any]:
        with self._lock:
            if self._executor is None or self._executor[0] != os.getpid():  # none yet, or a forked copy's
                self._executor = (os.getpid(), ThreadPoolExecutor(max_workers=8, thread_name_prefix="kerasmp-client"))
            return self._executor[1].submit(self._call, arrays, single, timeout)

    def _talks_directly(self) -> bool:
        """Whether this process talks to the server's loop over its socket (a Ray client
        elsewhere calls the actor instead)."""
        return True

    def _pipelined(self, arrays: list[Any], single: bool, timeout: float) -> Future[Any] | None:
        """The request sent on this process's pipeline; None when it goes by the thread pool
        (its arrays or its answer too large to travel inside a message, or 0 rows)."""
        rows = arrays[0].shape[0]
        answer = rows * self._answer_row_bytes  # the answer's size, 1 TB when unknown
        if rows == 0 or answer >= SHM_MIN_BYTES or sum(a.nbytes for a in arrays) >= SHM_MIN_BYTES:
            return None
        if not self._talks_directly():
            return None
        req_id = next(_ids)
        what = f"#{req_id} of process {os.getpid()}"
        for _ in range(2):  # a pipeline that broke since the last request is replaced once
            try:
                with self._lock:
                    pipe = self._pipe
                    if pipe is None or pipe[0] != os.getpid() or pipe[1].broken:
                        # a send waits for room at most one request timeout; then the pipeline breaks
                        pipe = self._pipe = (os.getpid(), Pipeline(self, self._connect(what, send_s=self.request_timeout_s)))
                return pipe[1].submit(req_id, arrays, single, timeout, what)
            except (ServerClosedError, ServerDiedError) as exc:
                future: Future[Any] = Future()
                future.set_exception(exc)
                return future
            except ConnectionError:
                continue
        return None

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
            local.conn = self._connect(what)
            local.outbox, local.inbox = Arena(), Arena()
        return local.conn, local.outbox, local.inbox

    def _connect(self, what: str, send_s: float | None = None) -> Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            bound_blocking(sock, send_s=send_s)
            sock.connect(self.socket_address)
        except OSError as exc:
            sock.close()
            if self.address in _closed:
                raise ServerClosedError(self._message(SERVER_CLOSED, what)) from None
            raise ServerDiedError(self._message(SERVER_DIED, what, f" (connecting failed: {exc.strerror})")) from None
        return Connection(sock.detach())

    def _forget(self) -> None:
        local = self._local
        for key in ("conn", "outbox", "inbox"):
            obj = getattr(local, key, None)
            if obj is not None:
                obj.close()
            setattr(local, key, None)

    def _closed_by_owner(self) -> bool:
        """Whether this process closed the server on purpose (its errors say so)."""
        return self.address in _closed

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
        while readable(conn.fileno(), max(0.0, deadline - time.monotonic())):
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


# ------------------------------------------------------------------------ submitted requests

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
