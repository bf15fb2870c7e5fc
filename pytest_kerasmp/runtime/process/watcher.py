"""What a local dispatcher waits on: one epoll set of its wake-up pipe and its workers'
connections and exits, kept across waits (no selector is rebuilt per wake-up).

A thread that reads a worker's connection itself (a caller waiting for its own short task)
mutes that connection first, so the dispatcher's wait never wakes for a message that another
thread is reading; unmuting re-arms it (level-triggered: an unread message wakes it at once).
"""

from __future__ import annotations

import math
import os
import select
import threading
from typing import Any


def readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` has something to read (a message, or EOF) within ``timeout`` seconds.

    ``Connection.poll`` and ``multiprocessing.connection.wait`` build a selector per call;
    on the path of every task that cost more than the poll itself.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(timeout * 1e3))))


class Watcher:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._lock = threading.Lock()
        #: fd -> (worker, "message" | "exit")
        self._fds: dict[int, tuple[Any, str]] = {}
        self._by_worker: dict[int, tuple[int, int]] = {}  # id(worker) -> (conn fd, exit fd)

    def add(self, w: Any) -> None:
        """Watch worker ``w``'s connection and exit (its ``child.conn`` and ``child.sentinel``)."""
        fds = (w.child.conn.fileno(), w.child.sentinel)
        with self._lock:
            for fd, kind in zip(fds, ("message", "exit"), strict=True):
                self._epoll.register(fd, select.EPOLLIN)
                self._fds[fd] = (w, kind)
            self._by_worker[id(w)] = fds

    def remove(self, w: Any) -> None:
        """Stop watching ``w`` (before its descriptors are closed)."""
        with self._lock:
            for fd in self._by_worker.pop(id(w), ()):
                if self._fds.get(fd, (None,))[0] is w:
                    del self._fds[fd]
                    try:
                        self._epoll.unregister(fd)
                    except (OSError, ValueError):
                        pass

    def mute(self, w: Any, muted: bool) -> bool:
        """Stop (or resume) waking for ``w``'s messages; False when ``w`` is not watched."""
        with self._lock:
            fds = self._by_worker.get(id(w))
            if fds is None:
                return False
            try:
                self._epoll.modify(fds[0], 0 if muted else select.EPOLLIN)
            except (OSError, ValueError):
                return False
            return True

    def wake(self) -> None:
        with self._lock:
            if self._wake_w < 0:
                return  # closed: nothing to wake
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # already awake

    def wait(self, timeout: float) -> tuple[list[Any], list[Any]]:
        """Wait up to ``timeout``; the workers with a message, and those that exited."""
        events = self._epoll.poll(timeout)
        messages: list[Any] = []
        exits: list[Any] = []
        with self._lock:
            for fd, _ in events:
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                w, kind = self._fds.get(fd, (None, ""))
                if w is not None:
                    (messages if kind == "message" else exits).append(w)
        return messages, exits

    def close(self) -> None:
        with self._lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
            self._fds.clear()
            self._by_worker.clear()
            self._epoll.close()
        for fd in fds:
            if fd >= 0:
                os.close(fd)
