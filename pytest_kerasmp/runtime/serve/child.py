"""The inference server process: owns one model on one slot and batches every client's requests.

Runs in a spawned child. It pins its slot, imports the framework under Keras, loads the
ModelRef, compiles one forward function with the framework's adapter (``frameworks``) with a
``None`` batch axis (one trace for every batch size: no padding and no retracing), then serves a Unix socket in the abstract namespace (no file to clean up).

The messages are ``wire``'s (arrays in the connection's arenas, see transport, or inside
the message for the small requests of ``client.submit``, see pipeline); every
answer carries its request's id. The owner's control connection gets ``Ready`` (with the
model's input and output specs, which the owner hands to its clients so that they check
requests with :func:`input_problem` before sending; the server checks again) and sends
``Stop``: from then on the server answers what it accepted, tells new requests ``Closed``,
and exits.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import time
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any

STATS_WINDOW = 100_000
#: Seconds a client may stall the loop mid-message (a read or a send) before it is dropped.
STALL_S = 10
#: At most this many messages of one client are taken per look (the others' turn comes).
DRAIN = 64
#: Weight of the newest gap between arrivals, and of the newest batch's compute time, in the
#: running means that decide whether another request is expected soon (adaptive delay).
EWMA = 0.1

#: A model input: per-sample shape (None for any size), dtype string, name.
InputSpec = tuple[tuple[Any, ...], str, str]


def input_problem(arrays: list[Any], inputs: list[InputSpec], what: str, batch_axis: bool = True) -> str | None:
    """Why ``arrays`` cannot be a batch (or, without ``batch_axis``, one sample) for a model
    taking ``inputs``, described as ``what`` (``"the request"``, ``"request 17"``) sent them.

    None when they can; same-kind casts (float64 to float32) are allowed.
    """
    import numpy as np

    from pytest_kerasmp.errors import BAD_REQUEST

    if len(arrays) != len(inputs):
        from pytest_kerasmp.slots.devices import plural

        return f"the model takes {plural(len(inputs), 'input')}, {what} has {len(arrays)}"
    lead = 1 if batch_axis else 0
    for k, (a, (shape, dtype, name)) in enumerate(zip(arrays, inputs, strict=True)):
        if a.ndim != len(shape) + lead or any(d is not None and d != s for d, s in zip(shape, a.shape[lead:], strict=True)):
            problem = f"shape {a.shape}"
        elif not np.can_cast(a.dtype, dtype, "same_kind"):
            problem = f"dtype {a.dtype}"
        elif batch_axis and a.shape[0] != arrays[0].shape[0]:
            problem = "row counts that differ between inputs"
        else:
            continue
        batch = "(n" + "".join(f", {'?' if d is None else d}" for d in shape) + ")"
        return BAD_REQUEST.format(
            what=what, problem=problem, index=k, name=name, shape=tuple(shape), batch=batch, dtype=np.dtype(dtype),
        )
    return None


@dataclasses.dataclass(eq=False)
class _Request:
    id: int
    client: _Client
    inputs: list[Any]
    rows: int
    arrived: float
    #: It waited for a running batch: due at once (max_delay is for a server that was idle).
    waited: bool = False
    #: Its arrays came inside the message, and its answer goes back that way.
    inline: bool = False
    outputs: list[Any] | None = None
    done_rows: int = 0
    failed: bool = False


@dataclasses.dataclass(eq=False)
class _Client:
    conn: Connection
    inbox: Any
    outbox: Any
    alive: bool = True
    #: Its requests accepted and not yet answered, and the most it has had at once.
    open: int = 0
    window: int = 0


class _Server:
    def __init__(self, model: Any, options: dict[str, Any]) -> None:
        import numpy as np

        from pytest_kerasmp import frameworks

        self.np = np
        self.model = model
        self.max_batch = int(options["max_batch_size"])
        self.max_delay = float(options["max_delay_ms"]) / 1e3
        self.max_queue = int(options["max_queue"])
        self.adaptive = bool(options.get("adaptive_delay", True))
        self.inputs = [(tuple(t.shape[1:]), np.dtype(t.dtype).str, t.name) for t in model.inputs]
        self.forward = frameworks.active().forward(model, self.inputs)  # compiled once, any batch size
        warm = [np.zeros((1, *shape), dtype) for shape, dtype, _ in self.inputs]
        outs = self.forward(*warm)
        self.outputs = [(tuple(o.shape[1:]), o.dtype.str) for o in outs]
        self.pending: collections.deque[tuple[_Request, int, int]] = collections.deque()
        self.batch_ran = False  # since the last look for requests
        #: What had a message (or a connection) ready when the last batch ended, before any
        #: answer went out: those were sent while it ran, not in reply to its answers.
        self.came_during: set[Any] = set()
        self.waiting = 0  # accepted requests not yet answered
        self.clients: dict[Any, _Client] = {}  # by connection
        self.stats: dict[str, Any] = {
            "requests": 0, "batches": 0, "rows": 0, "errors": 0, "busy": 0,
            # Telemetry a load generator reads before and after a load point (the difference):
            # batches by their row count (index = rows, up to max_batch_size), and the seconds
            # requests spent waiting for their first batch and batches spent computing.
            "batch_sizes": [0] * (self.max_batch + 1), "queue_wait_s": 0.0, "compute_s": 0.0,
        }
        #: Running means of the gap between arrivals and of one batch's compute time; the
        #: last arrival's time (adaptive delay: ``due``).
        self.mean_gap, self.mean_compute = float("inf"), 0.0
        self.last_arrival: float | None = None
        self.queue_wait: collections.deque[float] = collections.deque(maxlen=STATS_WINDOW)
        self.compute: collections.deque[float] = collections.deque(maxlen=STATS_WINDOW)

    # --------------------------------------------------------------------------- requests

    def on_message(self, client: _Client, closing: bool, waited: bool = False) -> None:
        """Take one message of ``client``; ``waited``: it came while a batch ran."""
        from pytest_kerasmp.runtime.wire.messages import Busy, Closed, Predict, PredictInline, Stats, StatsRequest, unpack

        msg = client.conn.recv()
        if isinstance(msg, StatsRequest):
            self.reply(client, Stats(msg.id, self.snapshot()))
            return
        inline = isinstance(msg, PredictInline)
        assert inline or isinstance(msg, Predict), f"unexpected message {type(msg).__name__}"
        if not inline and msg.grew:
            client.inbox.receive(client.conn)
        if closing:
            self.reply(client, Closed(msg.id))
            return
        if self.waiting >= self.max_queue:
            self.stats["busy"] += 1
            self.reply(client, Busy(msg.id))
            return
        if inline:
            arrays = unpack(msg.arrays)
        else:
            views = client.inbox.views([(offset, size) for offset, size, _, _ in msg.specs])
            arrays = [
                self.np.ndarray(shape, dtype, buffer=view)
                for view, (_, _, shape, dtype) in zip(views, msg.specs, strict=True)
            ]
        problem = input_problem(arrays, self.inputs, f"request {msg.id}")
        if problem is not None:
            self.fail_one(client, msg.id, ValueError(problem))
            return
        req = _Request(msg.id, client, arrays, arrays[0].shape[0], time.perf_counter(), waited, inline)
        if self.last_arrival is not None:
            gap = req.arrived - self.last_arrival
            self.mean_gap = gap if self.mean_gap == float("inf") else self.mean_gap + EWMA * (gap - self.mean_gap)
        self.last_arrival = req.arrived
        self.waiting += 1
        client.open += 1
        client.window = max(client.window, client.open)
        self.stats["requests"] += 1
        if req.rows == 0:  # nothing to compute: answered at once, with 0 rows
            req.outputs = [self.np.empty((0, *shape), dtype) for shape, dtype in self.outputs]
            self.settle(req)
            self.answer(req)
            return
        for start in range(0, req.rows, self.max_batch):  # oversize requests are split
            self.pending.append((req, start, min(start + self.max_batch, req.rows)))

    def due(self, closing: bool) -> float | None:
        """Seconds until the next batch must run (0: now), or None when nothing waits."""
        if not self.pending:
            return None
        rows = 0
        for _, start, stop in self.pending:
            rows += stop - start
            if rows >= self.max_batch:
                return 0.0
        oldest = self.pending[0][0]
        if closing or oldest.waited or self.nothing_more_expected():
            return 0.0
        until = oldest.arrived + self.max_delay
        if self.adaptive and self.last_arrival is not None:
            # Wait only for a request expected within one batch's compute time: later than
            # that, waiting costs the waiting requests more than a second batch would (at 10%
            # load a 2 ms delay doubled the served CNN's p50). Arrivals slower than expected
            # end the wait one compute time after the next one was due.
            until = min(until, self.last_arrival + self.mean_gap + self.mean_compute)
            if self.mean_gap > self.mean_compute:
                return 0.0
        return max(0.0, until - time.perf_counter())

    def nothing_more_expected(self) -> bool:
        """Every client that sends has as many requests waiting as it has ever had at once:
        until some are answered, none is expected to send more, and waiting ``max_delay``
        would only add latency (one client with 4 in flight: 2 ms on every 3 ms batch of the
        served CNN). Clients that have not sent a request yet do not count."""
        return all(c.open >= c.window for c in self.clients.values())

    def settle(self, req: _Request) -> None:
        """``req`` was answered or failed: it no longer waits."""
        self.waiting -= 1
        req.client.open -= 1

    def run_batch(self, watch: list[Any]) -> None:
        """Run one batch from the front of the line and answer what it completes; ``watch``:
        the connections (and listener) to look at when it ends, before any answer goes out."""
        np = self.np
        taken: list[tuple[_Request, int, int]] = []
        rows = 0
        while self.pending and rows < self.max_batch:
            req, start, stop = self.pending.popleft()
            if req.failed or not req.client.alive:
                continue
            if rows + stop - start > self.max_batch:  # take what fits, leave the rest first in line
                cut = start + self.max_batch - rows
                self.pending.appendleft((req, cut, stop))
                stop = cut
            taken.append((req, start, stop))
            rows += stop - start
        if not taken:
            return
        now = time.perf_counter()
        self.batch_ran = True
        for req, start, _ in taken:
            if start == 0:
                self.queue_wait.append(now - req.arrived)
                self.stats["queue_wait_s"] += now - req.arrived
        try:
            batch = [
                np.concatenate([req.inputs[k][a:b] for req, a, b in taken]).astype(dtype, copy=False)
                for k, (_, dtype, _) in enumerate(self.inputs)
            ]
            outs, failure = self.forward(*batch), None
        except Exception as exc:
            outs, failure = [], exc
        # Looked at before answering: a request sent in reply to an answer of this batch is
        # a new one to an idle server, and waits max_delay like any other.
        self.came_during = set(wait(watch, timeout=0))
        if failure is not None:  # the model failed: every request in this batch gets the error
            self.stats["errors"] += 1
            for req in {id(r): r for r, _, _ in taken}.values():
                req.failed = True
                self.settle(req)
                self.fail_one(req.client, req.id, failure)
            return
        took = time.perf_counter() - now
        self.compute.append(took)
        self.mean_compute = took if not self.stats["batches"] else self.mean_compute + EWMA * (took - self.mean_compute)
        self.stats["batches"] += 1
        self.stats["rows"] += rows
        self.stats["compute_s"] += took
        self.stats["batch_sizes"][rows] += 1
        offset = 0
        for req, a, b in taken:
            if req.outputs is None:
                req.outputs = [np.empty((req.rows, *o.shape[1:]), o.dtype) for o in outs]
            for k, o in enumerate(outs):
                req.outputs[k][a:b] = o[offset : offset + b - a]
            offset += b - a
            req.done_rows += b - a
            if req.done_rows == req.rows:
                self.settle(req)
                self.answer(req)

    def answer(self, req: _Request) -> None:
        from pytest_kerasmp.runtime.wire.messages import Answer, AnswerInline, pack

        client = req.client
        assert req.outputs is not None
        req.inputs = []  # the client may reuse its arena once answered
        if req.inline:
            self.reply(client, AnswerInline(req.id, pack(req.outputs)))
            return
        try:
            layout = client.outbox.write(req.outputs)
        except OSError as exc:
            self.fail_one(client, req.id, exc)
            return
        specs = [(o, s, a.shape, a.dtype.str) for (o, s), a in zip(layout, req.outputs, strict=True)]
        self.reply(client, Answer(req.id, specs, client.outbox.fresh))
        if client.alive:
            try:
                client.outbox.hand_over(client.conn)
            except OSError:
                client.alive = False

    def fail_one(self, client: _Client, req_id: int, exc: BaseException) -> None:
        from pytest_kerasmp.errors import pack_exception
        from pytest_kerasmp.runtime.wire.messages import Failed

        text = "".join(traceback.format_exception(exc))
        self.reply(client, Failed(req_id, pack_exception(exc), text))

    def reply(self, client: _Client, msg: Any) -> None:
        if not client.alive:
            return
        try:
            client.conn.send(msg)
        except OSError:  # the client died or stalled: its answers go nowhere, the others are unaffected
            client.alive = False

    def snapshot(self) -> dict[str, Any]:
        np = self.np

        def pct(values: collections.deque[float], q: float) -> float | None:
            return float(np.percentile(values, q)) if values else None

        stats = dict(self.stats)
        stats["batch_sizes"] = list(self.stats["batch_sizes"])
        stats["mean_batch_size"] = stats["rows"] / stats["batches"] if stats["batches"] else 0.0
        stats["queue_wait_p50_s"], stats["queue_wait_p99_s"] = pct(self.queue_wait, 50), pct(self.queue_wait, 99)
        stats["compute_p50_s"], stats["compute_p99_s"] = pct(self.compute, 50), pct(self.compute, 99)
        stats["waiting"] = self.waiting
        stats["traces"] = self.forward.traces()
        return stats


def main(control: Connection, ref: Any, options: dict[str, Any], address: bytes) -> None:
    """Entry point of the server process (after ``_child`` pinned it)."""
    from pytest_kerasmp.runtime.process.bootstrap import send_startup_error
    from pytest_kerasmp.runtime.wire.messages import Ready

    try:
        server = _Server(ref.load(), options)
        listener = listen(address)
    except BaseException:
        send_startup_error(control)
        return
    control.send(Ready(os.getpid(), (server.inputs, server.outputs)))
    serve(server, control, listener)


def listen(address: bytes) -> socket.socket:
    """A non-blocking Unix socket listening on ``address`` (abstract namespace: no file)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address)
        listener.listen(256)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


def serve(server: _Server, control: Connection, listener: socket.socket | None) -> None:
    """The server's loop: take connections and requests, run batches when due, answer; after
    ``control`` says stop (or closes), answer what was accepted and return."""
    from pytest_kerasmp.runtime.process.watcher import readable
    from pytest_kerasmp.runtime.wire.transport import Arena, bound_blocking

    clients = server.clients
    closing = False
    while True:
        # What a batch left, and what was ready when it ended (before its answers went out:
        # run_batch looks), came while it ran: it has waited a whole batch already, so the next
        # batch takes it without waiting for more (the delay is for a server that was idle).
        waited, server.batch_ran = server.batch_ran, False
        came, server.came_during = server.came_during, set()
        if waited:
            for req, _, _ in server.pending:
                req.waited = True
        delay = server.due(closing)
        if closing and delay is None and server.waiting == 0:
            break
        waitables: list[Any] = [*clients, *([control] if not closing else [])]
        if listener is not None:
            waitables.append(listener)
        ready = wait(waitables, timeout=0 if came else (1.0 if delay is None else delay))
        if listener is not None and listener in ready:  # take every waiting connection now
            ready.remove(listener)
            while True:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    break
                sock.setblocking(True)
                # Reads start when a message is there and sends fit unless the client stopped
                # reading: a client stalled mid-message, or leaving its answers unread, for
                # STALL_S is dropped (an OSError below) instead of stalling every other client.
                bound_blocking(sock, recv_s=STALL_S, send_s=STALL_S)
                conn = Connection(sock.detach())
                clients[conn] = _Client(conn, Arena(), Arena())
                if conn.poll(0):
                    ready.append(conn)
                    if listener in came:
                        came.add(conn)
        for obj in ready:
            if obj is control:
                try:
                    control.recv()
                except (EOFError, OSError):
                    pass
                closing = True  # stop taking connections; answer every accepted request
                if listener is not None:
                    listener.close()
                    listener = None
            else:
                client = clients[obj]
                try:
                    for _ in range(DRAIN):  # every request it has sent so far, not one per look
                        server.on_message(client, closing, obj in came)
                        if not client.alive or not readable(client.conn.fileno(), 0):
                            break
                except (EOFError, OSError):
                    client.alive = False
                if not client.alive:
                    del clients[obj]
                    _drop(client, server)
        if server.due(closing) == 0.0:
            server.run_batch([*clients, *([listener] if listener is not None else [])])
        for client in [c for c in clients.values() if not c.alive]:  # found gone while answering
            del clients[client.conn]
            _drop(client, server)
    for client in clients.values():
        _drop(client, server)


def _drop(client: _Client, server: _Server) -> None:
    """Forget a client that went away; its queued rows are skipped, the others unaffected."""
    client.alive = False
    for req in {id(r): r for r, _, _ in server.pending if r.client is client}.values():
        if not req.failed:
            req.failed = True
            server.settle(req)
    client.conn.close()
    client.inbox.close()
    client.outbox.close()
