"""Code that runs in worker processes. Import-light: pins the slot first, imports TF after.

Wire protocol (tuples over one duplex socket pair per worker, plain picklable types):
    parent -> child: ("task", task_id, call_bytes, layout, grew) | ("stop",)
    child -> parent: ("ready", pid) | ("startup-error", text)
                     | ("ok", task_id, result_bytes, layout, grew, retired)
                     | ("error", task_id, exc_bytes, traceback_text, retired)
``layout`` places the pickle's out-of-band buffers in the sender's arena (see transport);
when ``grew`` is true the sender made a bigger arena and its descriptor follows at once
(``multiprocessing.reduction.send_handle``). The task's array arguments are views of the
worker's inbox arena; ``retired`` says the task kept one, so the parent must write the next
call into a new arena.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

PARENT_POLL_S = 0.5


def _watch_parent(parent_pid: int) -> None:
    """Exit when the process that owns the pool is gone (no orphan keeps a GPU)."""
    ppid = os.getppid()
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != ppid or not _alive(parent_pid):
            _exit_with_group()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _exit_with_group() -> None:
    """The owner is gone: exit, and take along what the tasks started (a fork pool, say)."""
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(3)


def start_child(slot_json: str, parent_pid: int) -> None:
    """What every process the plugin starts does first: lead a process group of its own (so
    that what its tasks start ends with it), leave Ctrl-C to its owner, exit with the owner,
    and pin itself to its slot before anything imports TensorFlow."""
    import json

    from pytest_kerasmp import placement
    from pytest_kerasmp.devices import DeviceSlot
    from pytest_kerasmp.pinning import pin_process

    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner decides what Ctrl-C ends
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="kerasmp-watch").start()
    pin_process(DeviceSlot.from_json(json.loads(slot_json)))
    placement.record_child()  # issue 10: the session's placement table, seen from inside


def main(
    conn: Connection,
    slot_json: str,
    parent_pid: int,
    import_tensorflow: bool,
    initializer: bytes | None,
) -> None:
    """Entry point of a worker process."""
    try:
        from pytest_kerasmp.transport import loads_call

        start_child(slot_json, parent_pid)
        if import_tensorflow:
            import tensorflow  # noqa: F401  (warm: pay the import once, before any task)
        if initializer is not None:
            fn, args, kwargs = loads_call(initializer)
            fn(*args, **kwargs)
    except BaseException:
        conn.send(("startup-error", traceback.format_exc()))
        conn.close()
        return
    conn.send(("ready", os.getpid()))
    _serve(conn)


def _serve(conn: Connection) -> None:
    from pytest_kerasmp.errors import pack_exception
    from pytest_kerasmp.transport import Arena, dumps, loads_call

    inbox, outbox = Arena(), Arena()
    while True:
        try:
            msg = conn.recv()
            if msg[0] == "stop":
                conn.close()
                return
            _, task_id, call, layout, grew = msg
            if grew:
                inbox.receive(conn)
        except (EOFError, OSError):
            _exit_with_group()  # the pool went away
        try:
            fn, args, kwargs = loads_call(call, inbox.views(layout))
            del call
            result: Any = fn(*args, **kwargs)
            del args, kwargs
            buffers: list[Any] = []
            data = dumps(result, f"the result of task {task_id}", buffers)
            del result
            out_layout = outbox.write(buffers)
            reply: list[Any] = ["ok", task_id, data, out_layout, outbox.fresh]
        except BaseException as exc:  # the task's failure (SystemExit too), reported to its caller
            reply = ["error", task_id, pack_exception(exc), traceback.format_exc()]
        fn = args = kwargs = result = buffers = None
        # The arguments are views of the inbox: if the task kept one, the inbox is its now.
        retired = inbox.in_use()
        if retired:
            inbox.abandon()
        reply.append(retired)
        try:
            conn.send(tuple(reply))
            if reply[0] == "ok":
                outbox.hand_over(conn)
        except OSError:
            _exit_with_group()  # the pool went away mid-reply
