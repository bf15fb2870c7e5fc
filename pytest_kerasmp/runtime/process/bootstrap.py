"""The first code every process the plugin starts runs: set up, pin, then hand over to its role.

Import-light on purpose: before the process is pinned it imports only the standard library
and ``devices``/``pinning``/``errors`` of this package (never pytest, never TensorFlow).
In order, a child: joins its cluster's private network if it has one, leads a process group of its own (what its tasks start ends with it),
leaves Ctrl-C to its owner, exits when its owner is gone, names itself, registers
faulthandler (SIGUSR1 dumps every thread's stack to the stack pipe; a native crash prints
one), applies its environment, pins itself to its slot, imports the owner's ``__main__``
script if it has one (so task functions defined there resolve), imports TensorFlow when
asked, and calls its role's entry point, which sends ``Ready`` when it serves.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

PARENT_POLL_S = 0.5
#: The role's entry point, as "module:function"; it gets the control connection first.
ENTRY_POINTS = {
    "pool-worker": "pytest_kerasmp.runtime.pool.child:main",
    "server": "pytest_kerasmp.runtime.serve.child:main",
    "cluster-task": "pytest_kerasmp.runtime.pool.child:main",  # a pool worker with TF_CONFIG (cluster.py)
}

#: Set while this child imports its owner's ``__main__`` script (a script without a
#: ``__main__`` guard would start processes again: lifecycle refuses, naming the script).
importing_main: str | None = None
_stack_file: Any = None  # kept open: faulthandler writes to it from a signal handler
#: What this child had imported, and how long its set-up took, when it pinned itself.
at_pin: dict[str, Any] = {}
_t0 = time.perf_counter()


def spawned_main() -> None:
    """Entry of a spawned child: ``python -c '...' CONTROL_FD STACK_FD``."""
    from multiprocessing.connection import Connection

    conn = Connection(int(sys.argv[1]))
    boot = conn.recv()
    run(conn, boot, int(sys.argv[2]))


def forked_main(conn: Any, output: Any, stacks: Any, boot: dict[str, Any]) -> None:
    """Entry of a child of the forkserver (which imported, never ran, TensorFlow)."""
    import multiprocessing

    os.setpgid(0, 0)
    for fd in (1, 2):
        os.dup2(output.fileno(), fd)
    output.close()
    multiprocessing.current_process().daemon = False  # its tasks may start processes
    run(conn, boot, os.dup(stacks.fileno()))


def run(conn: Any, boot: dict[str, Any], stack_fd: int) -> None:
    try:
        _prepare(boot, stack_fd)
        import importlib
        import pickle

        module, _, name = ENTRY_POINTS[boot["role"]].partition(":")
        entry = getattr(importlib.import_module(module), name)
        args = pickle.loads(boot["args"])
    except BaseException:
        send_startup_error(conn)
        return
    entry(conn, *args)
    quick_exit()


def quick_exit() -> None:
    """End as multiprocessing's forked children do: the atexit handlers run and the standard
    streams are flushed, the interpreter's teardown is skipped (0.4 s with TensorFlow
    loaded, measured here: it would make every close() that much slower)."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(0)


def send_startup_error(conn: Any) -> None:
    from pytest_kerasmp.runtime.wire.messages import StartupError

    try:
        conn.send(StartupError(traceback.format_exc()))
        conn.close()
    except OSError:
        pass


def _prepare(boot: dict[str, Any], stack_fd: int) -> None:
    global _stack_file
    import faulthandler

    if boot.get("netns"):  # first: setns wants one thread, and nothing may listen before it
        from pytest_kerasmp.runtime.process.netns import join

        join(boot["netns"])
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner decides what Ctrl-C ends
    threading.Thread(target=_watch_owner, args=(boot["owner_pid"],), daemon=True, name="kerasmp-watch").start()
    _set_name(boot["name"])
    _stack_file = os.fdopen(stack_fd, "w", buffering=1)
    faulthandler.register(signal.SIGUSR1, file=_stack_file, all_threads=True)
    faulthandler.enable(file=2)  # a native crash prints the Python stacks to the output pipe
    os.environ.update(boot["env"])
    sys.path[:] = [p for p in boot["sys_path"]]
    from pytest_kerasmp.slots.devices import DeviceSlot
    from pytest_kerasmp.slots.pinning import pin_process

    at_pin.update(modules=sorted(sys.modules), seconds=time.perf_counter() - _t0)
    slot = DeviceSlot.from_json(boot["slot"])
    pin_process(slot)
    from pytest_kerasmp.slots import placement

    placement.record(boot["role"].replace("-", " "), slot, label=boot["label"])  # as seen from inside
    if boot.get("main_path"):
        _import_main(boot["main_path"])
    if boot["warm_import"]:  # warm: pay the framework's import once, before any task
        from pytest_kerasmp import frameworks

        frameworks.active().warm_import()


def _import_main(path: str) -> None:
    """Import the owner's script as ``__mp_main__`` (as multiprocessing's spawn does), so
    that functions defined in it and pickled as ``__main__.fn`` resolve here."""
    global importing_main
    import runpy
    import types

    importing_main = path
    try:
        namespace = runpy.run_path(path, run_name="__mp_main__")
    finally:
        importing_main = None
    module = types.ModuleType("__mp_main__")
    module.__dict__.update(namespace)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


def _set_name(name: str) -> None:
    """The name ``ps``, ``top`` and psutil show (Linux keeps 15 bytes of it)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _watch_owner(owner_pid: int) -> None:
    """Exit, with everything this child's tasks started, when the owner is gone."""
    from pytest_kerasmp.slots.placement import process_alive

    ppid = os.getppid()
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != ppid or not process_alive(owner_pid):
            exit_with_group()


def exit_with_group() -> None:
    """The owner is gone: record this process's end (its owner cannot), exit, and take along
    what the tasks started (a fork pool, say)."""
    try:
        from pytest_kerasmp.slots import placement

        placement.release(os.getpid())
    except Exception:
        pass
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(3)
