"""What a child process prints, and its Python stacks when it is stuck.

A child's output is relayed line by line (``read_lines``) with a prefix that says who printed
it; the framework's start-up chatter is kept out of it (:func:`is_chatter`) unless
``PYTEST_KERASMP_TF_LOGS=1``. A stuck child is asked for the stacks of all its threads
(faulthandler on SIGUSR1, written to a pipe of its own) before it is killed.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from pytest_kerasmp import frameworks
from pytest_kerasmp.frameworks.base import LOGS_ENV

#: Brings the framework's start-up messages back in the plugin's processes ("1").
TF_LOGS_ENV = LOGS_ENV
STACK_DUMP_S = 1.0


class StackSource(Protocol):
    """A child that can be asked for its stacks (``lifecycle.Child``)."""

    pid: int

    @property
    def stack_fd(self) -> int: ...

    def is_alive(self) -> bool: ...


def quiet_logs() -> bool:
    """Whether the framework's start-up chatter is kept out of the plugin's processes' output."""
    return os.environ.get(TF_LOGS_ENV, "") in ("", "0")


def is_chatter(line: str, slot_kind: str) -> bool:
    """The framework's start-up chatter (kept in the output tail for errors, not printed); on a
    CPU slot also its failed probe for a GPU (on a GPU slot that line says why none was found)."""
    return frameworks.active().is_chatter(line, slot_kind)


def read_lines(fd: int, emit: Callable[[str], None]) -> None:
    """Read ``fd`` to its end, calling ``emit`` with each line (decoded, newline removed)."""
    pending = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            emit(line.decode(errors="replace"))
    if pending:
        emit(pending.decode(errors="replace"))


def dump_stacks_of(children: Sequence[StackSource], timeout: float = STACK_DUMP_S) -> dict[int, str | None]:
    """The Python stacks of every thread of each (stuck) child, by pid: all are asked at
    once (faulthandler on SIGUSR1), then all answers read within one ``timeout``."""
    asked = []
    for child in children:
        if child.is_alive():
            try:
                os.kill(child.pid, signal.SIGUSR1)
                asked.append(child)
            except ProcessLookupError:
                pass
    chunks: dict[int, list[bytes]] = {c.stack_fd: [] for c in asked}
    by_fd = {c.stack_fd: c for c in asked}
    deadline, quiet = time.monotonic() + timeout, 0.15
    open_fds = set(by_fd)
    while open_fds and time.monotonic() < deadline:
        waiting = [fd for fd in open_fds if not chunks[fd]]
        pause = deadline - time.monotonic() if waiting else quiet
        ready, _, _ = select.select(list(open_fds), [], [], max(0.0, pause))
        if not ready:
            if not waiting:
                break  # every child answered and has been quiet for a moment
            continue
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if data:
                chunks[fd].append(data)
            else:
                open_fds.discard(fd)
    return {by_fd[fd].pid: (b"".join(parts).decode(errors="replace") or None) for fd, parts in chunks.items()}
