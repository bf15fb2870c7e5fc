"""Code that runs in worker processes. Import-light: pins the slot first, imports TF after.

Wire protocol (tuples over one duplex pipe per worker, plain picklable types):
    parent -> child: ("task", task_id, call_bytes) | ("stop",)
    child -> parent: ("ready", pid) | ("startup-error", text)
                     | ("ok", task_id, result_bytes) | ("error", task_id, exc_bytes, traceback_text)
"""

from __future__ import annotations

import os
import pickle
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
        if os.getppid() != ppid:
            os._exit(3)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(3)
        except PermissionError:
            pass


def _pickle_exception(exc: BaseException) -> bytes:
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(exc).__qualname__}: {exc}"))


def main(
    conn: Connection,
    slot_json: str,
    parent_pid: int,
    import_tensorflow: bool,
    initializer: bytes | None,
) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the pool decides
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="kerasmp-watch").start()
    try:
        import json

        from pytest_kerasmp.devices import DeviceSlot
        from pytest_kerasmp.pinning import pin_process
        from pytest_kerasmp.transport import loads_call

        pin_process(DeviceSlot.from_json(json.loads(slot_json)))
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
    from pytest_kerasmp.transport import dumps, loads_call, unlink_segments

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the pool went away
        if msg[0] == "stop":
            conn.close()
            return
        _, task_id, call = msg
        created: list[str] = []
        try:
            fn, args, kwargs = loads_call(call)
            del call
            result: Any = fn(*args, **kwargs)
            del args, kwargs
            reply = ("ok", task_id, dumps(result, f"the result of task {task_id}", created))
        except BaseException as exc:  # the task's failure (SystemExit too), reported to its caller
            reply = ("error", task_id, _pickle_exception(exc), traceback.format_exc())
        try:
            conn.send(reply)
        except OSError:  # the pool went away mid-reply
            unlink_segments(created)
            return
