"""A pool worker's loop, in the child (after ``_child`` pinned it and imported TensorFlow).

It runs the pool's initializer, says ``Ready``, then runs one ``Task`` at a time until
``Stop`` (messages in ``_wire``). A task's array arguments are views of the worker's inbox
arena; its result's arrays go through one of its outbox arenas, the one the pool names in the
task (the pool hands results over as views of them: see transport.ResultArenas).
"""

from __future__ import annotations

import collections
import os
import traceback
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from typing import Any

from pytest_kerasmp.runtime.process.bootstrap import exit_with_group, send_startup_error
from pytest_kerasmp.runtime.wire.messages import Done, Failed, Ready, Stop, Task


def main(conn: Connection, initializer: bytes | None) -> None:
    """Entry point of a pool worker."""
    try:
        from pytest_kerasmp.runtime.wire.transport import loads_call

        if initializer is not None:
            fn, args, kwargs = loads_call(initializer)
            fn(*args, **kwargs)
    except BaseException:
        send_startup_error(conn)
        return
    conn.send(Ready(os.getpid()))
    _serve(conn)


def _serve(conn: Connection) -> None:
    from pytest_kerasmp.errors import pack_exception
    from pytest_kerasmp.runtime.wire.transport import Arena, dumps, loads_call

    inbox = Arena(header=True)
    outboxes: collections.defaultdict[int, Arena] = collections.defaultdict(Arena)
    shared: Any = None  # runtime.wire.shared.MappedRegions, from the first map(into=...) task on
    while True:
        try:
            msg = conn.recv()
            if isinstance(msg, Stop):
                conn.close()
                return
            assert isinstance(msg, Task), f"unexpected message {type(msg).__name__}"
            if msg.grew:
                inbox.receive(conn)
            unmapped: BaseException | None = None  # a region that could not be mapped fails the task
            if msg.regions or msg.drop:
                fds = [(rid, recv_handle(conn)) for rid in msg.regions]
                try:
                    if shared is None:
                        from pytest_kerasmp.runtime.wire.shared import MappedRegions

                        shared = MappedRegions()
                    shared.update(msg.drop, fds)
                except Exception as exc:
                    unmapped = exc
            outbox = outboxes[msg.out]  # the pool still reads results in the others
            if msg.fresh_out:  # the pool left this one to results still in use: a new file
                outbox.close()
            inbox.mark(msg.id + 1)  # before the task runs: the pool knows what a death interrupts
        except (EOFError, OSError):
            exit_with_group()  # the pool went away
        reply: Done | Failed
        try:
            if unmapped is not None:
                raise OSError(f"the worker could not map the shared array of task {msg.id}: {unmapped}") from unmapped
            fn, args, kwargs = loads_call(msg.call, inbox.views(msg.layout))
            result: Any = fn(*args, **kwargs)
            del args, kwargs
            buffers: list[Any] = []
            if msg.into is not None:  # straight into the caller's shared array
                shared.write(msg.into, result, f"task {msg.id} ({getattr(fn, '__qualname__', fn)})")
                data, result = b"", None
            else:
                data = dumps(result, f"the result of task {msg.id}", buffers)
            del result
            reply = Done(msg.id, data, outbox.write(buffers), outbox.fresh, False)
        except BaseException as exc:  # the task's failure (SystemExit too), reported to its caller
            reply = Failed(msg.id, pack_exception(exc), traceback.format_exc())
        fn = args = kwargs = result = buffers = None  # type: ignore[assignment]
        del msg
        # The arguments are views of the inbox: if the task kept one, the inbox is its now.
        retired = inbox.in_use()
        if retired:
            inbox.abandon()
        reply = reply._replace(retired=retired)
        try:
            conn.send(reply)
            if isinstance(reply, Done):
                outbox.hand_over(conn)
        except OSError:
            exit_with_group()  # the pool went away mid-reply
