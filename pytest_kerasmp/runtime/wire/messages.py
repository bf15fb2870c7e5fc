"""The messages that cross between the plugin's processes: named, plain, picklable tuples.

Every connection carries these and nothing else, so each side matches on a type instead of a
position (``msg[4]``). Arrays never travel in a message: a ``layout`` places them in the
sender's shared-memory arena (see transport), and ``grew`` says that the sender made a bigger
arena whose descriptor follows the message at once.

Child start-up (any child, over its control connection):
    child -> parent: Ready | StartupError
Pool worker:
    parent -> child: Task | Stop
    child -> parent: Done | Failed (it marks a task started in its arena, see transport.Arena.mark)
Inference server, per client connection:
    client -> server: Predict | StatsRequest
    server -> client: Answer | Failed | Busy | Closed | Stats
"""

from __future__ import annotations

from typing import Any, NamedTuple

#: Where each buffer of a message lies in the sender's arena: (offset, size).
Layout = list[tuple[int, int]]


class Ready(NamedTuple):
    """The child is pinned, warm and serving; ``info`` is what its role reports (a server's
    input and output specs)."""

    pid: int
    info: Any = None


class StartupError(NamedTuple):
    """The child could not start; ``text`` is its traceback."""

    text: str


class Stop(NamedTuple):
    """Finish what was accepted, then exit."""


class Task(NamedTuple):
    id: int
    call: bytes
    layout: Layout
    grew: bool
    #: Which of the worker's result arenas the result goes to (the pool's reader still holds
    #: views of the others); ``fresh_out``: that arena was left to its views, make a new file.
    out: int = 0
    fresh_out: bool = False
    #: ``map(into=...)``: where the worker writes the result instead (runtime.wire.shared), the
    #: regions it unmaps first, and the ids of those whose files follow this message.
    into: Any = None
    drop: tuple[int, ...] = ()
    regions: tuple[int, ...] = ()


class Done(NamedTuple):
    """A task's result (or a request's answer, for ``Answer``)."""

    id: int
    data: bytes
    layout: Layout
    grew: bool
    #: The task kept a view of its arguments' arena: the next call needs a new arena.
    retired: bool


class Failed(NamedTuple):
    """A task or request raised: the pickled exception and its traceback text."""

    id: int
    exc: bytes
    text: str
    retired: bool = False


class Predict(NamedTuple):
    """Rows to predict; ``specs`` are (offset, size, shape, dtype) per input."""

    id: int
    specs: list[tuple[int, int, tuple[int, ...], str]]
    grew: bool


class Answer(NamedTuple):
    """The rows of request ``id``; ``specs`` as in :class:`Predict`, one per output."""

    id: int
    specs: list[tuple[int, int, tuple[int, ...], str]]
    grew: bool


class PredictInline(NamedTuple):
    """Rows to predict, the arrays inside the message as (bytes, shape, dtype) (small requests
    of ``client.submit``, several in flight on one connection: see ``runtime.serve.client``)."""

    id: int
    arrays: list[tuple[bytes, tuple[int, ...], str]]


class AnswerInline(NamedTuple):
    """The rows of request ``id`` of a :class:`PredictInline`, inside the message, packed alike."""

    id: int
    arrays: list[tuple[bytes, tuple[int, ...], str]]


class Busy(NamedTuple):
    """The server's queue is full; retry later."""

    id: int


class Closed(NamedTuple):
    """The server is closing and accepts no new request."""

    id: int


class StatsRequest(NamedTuple):
    id: int


class Stats(NamedTuple):
    id: int
    data: dict[str, Any]


def pack(arrays: list[Any]) -> list[tuple[bytes, tuple[int, ...], str]]:
    """Arrays as (bytes, shape, dtype): pickled some 10 us faster each than numpy's own pickle."""
    return [(a.tobytes(), a.shape, a.dtype.str) for a in arrays]


def unpack(packed: list[tuple[bytes, tuple[int, ...], str]], writable: bool = False) -> list[Any]:
    """Arrays of :func:`pack`: read-only views of the received bytes, or writable copies."""
    import numpy as np

    return [
        np.frombuffer(bytearray(data) if writable else data, dtype).reshape(shape) for data, shape, dtype in packed
    ]
