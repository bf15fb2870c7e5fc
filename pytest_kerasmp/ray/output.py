"""What the Ray actors of pools and servers print, shown as local children's output is.

Ray copies what its workers print to the process that started them, each line prefixed
``(ClassName pid=N)`` in colour, with repeats folded into "[repeated Nx across cluster]". For
this package's actors the driver prints instead what a local child's relay prints
(``lifecycle``): ``[kerasmp-pool-w0 slot0 pid 4242] line`` into ``sys.stderr`` (so, under
pytest, into the running test's captured output), without TensorFlow's start-up chatter nor,
on a CPU slot, its failed CUDA probe (``childio.is_chatter``; ``PYTEST_KERASMP_TF_LOGS=1``
brings them back). An actor names itself to Ray's log monitor as its first act
(:func:`announce`), so what it prints while it starts carries its name too. Other actors'
and tasks' lines are left to Ray. Uses Ray's log protocol (``LOG_PREFIX_ACTOR_NAME``) and
its driver-side dispatcher; if either is missing, Ray's own printing stays.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from pytest_kerasmp.runtime.process.childio import is_chatter, quiet_logs
from pytest_kerasmp.slots.devices import DeviceSlot

PREFIX = "kerasmp-"
RAY_HANDLER = "ray_print_logs"  # Ray's handler of its workers' lines in the driver
#: The slot kind of each actor this process started, by label (a CUDA probe is chatter on CPU).
_kinds: dict[str, str] = {}


def label(name: str, slot: DeviceSlot) -> str:
    """How an actor's lines are prefixed, e.g. ``kerasmp-pool-w0 slot0`` (before ``pid N``)."""
    return f"{PREFIX}{name.replace(' ', '-')} {slot.name}"


def announce(name: str, slot: DeviceSlot) -> None:
    """In the actor: name it in Ray's log files, so its lines reach the driver under that name."""
    try:
        from ray._private.ray_constants import LOG_PREFIX_ACTOR_NAME
    except ImportError:
        return
    for stream in (sys.stdout, sys.stderr):
        print(LOG_PREFIX_ACTOR_NAME + label(name, slot), file=stream, flush=True)


def register(name: str, slot: DeviceSlot) -> None:
    """In the driver: an actor on ``slot`` is being started under ``name``."""
    _kinds[label(name, slot)] = slot.kind


def install() -> None:
    """In the driver, once connected: print this package's actors' lines as local ones."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        handlers: list[tuple[str, Callable[[dict[str, Any]], None]]] = dispatcher.handlers
        for i, (name, handle) in enumerate(handlers):
            if name == RAY_HANDLER and not isinstance(handle, _Printer):
                handlers[i] = (name, _Printer(handle))


class _Printer:
    """Ray's printing, but for this package's actors."""

    def __init__(self, ray_print: Callable[[dict[str, Any]], None]) -> None:
        self.ray_print = ray_print

    def __call__(self, data: dict[str, Any]) -> None:
        name = data.get("actor_name") or ""
        if not name.startswith(PREFIX):
            self.ray_print(data)
            return
        quiet, kind = quiet_logs(), _kinds.get(name, "GPU")
        prefix = f"[{name} pid {data.get('pid')}] "
        try:
            for line in data.get("lines", []):
                if not (quiet and is_chatter(line, kind)):
                    sys.stderr.write(prefix + line + "\n")
        except (ValueError, OSError):
            pass  # this process's stderr is closed (interpreter exit)
