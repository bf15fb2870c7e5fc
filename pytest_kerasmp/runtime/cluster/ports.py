"""Ports for local clusters on 127.0.0.1: picked free, claimed machine-wide, released.

A port is picked below the kernel's ephemeral range (``ip_local_port_range``), so that no
outgoing connection (another cluster's gRPC clients, say) and no ``bind(("", 0))`` is handed
it between the pick and TensorFlow's bind; it must bind now; and it is claimed with a file
named after it in :data:`PORTS_DIR` that holds the owner's pid, made atomically (written,
then hard-linked into place), so that no other cluster of any process of this user picks it
until it is released. A claim whose owner is gone is taken over; claims are made under a
lock on the directory (``flock``), so that two processes taking over the same stale claim
cannot both win (the second would remove the first's fresh claim).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import tempfile
from pathlib import Path

from pytest_kerasmp.slots import placement

HOST = "127.0.0.1"
PORTS_DIR = Path(tempfile.gettempdir()) / f"pytest-kerasmp-ports-{os.getuid()}"
TRIES = 200


def port_range() -> tuple[int, int]:
    """Where ports are picked: from half the ephemeral range's start up to it (exclusive)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(1024, low // 2), max(1025, low)


def claim_free_port(directory: Path | None = None) -> int | None:
    """A port free on 127.0.0.1 now and claimed for this process; None after TRIES tries."""
    directory = directory or PORTS_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    low, high = port_range()
    for _ in range(TRIES):
        port = random.randrange(low, high)
        if bindable(port) and claim(directory, port):
            return port
    return None


def claim(directory: Path, port: int) -> bool:
    """Claim ``port`` for this process; False if a live process holds it."""
    path = directory / str(port)
    draft = directory / f".{port}.{os.getpid()}.{random.getrandbits(32):08x}"
    draft.write_text(str(os.getpid()))
    try:
        with open(directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
            try:
                os.link(draft, path)  # atomic: the claim appears with its owner already in it
                return True
            except FileExistsError:
                if claim_alive(path):
                    return False
                path.unlink(missing_ok=True)  # its owner is gone: stale (and no one else links now)
                os.link(draft, path)
                return True
    finally:
        draft.unlink(missing_ok=True)


def release(port: int, directory: Path | None = None) -> None:
    """Give ``port`` back, if this process holds it."""
    path = (directory or PORTS_DIR) / str(port)
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text()) == os.getpid():
            path.unlink()


def claim_alive(path: Path) -> bool:
    """Whether the process that wrote the claim ``path`` still runs."""
    try:
        return placement.process_alive(int(path.read_text()))
    except (OSError, ValueError):
        return False


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def holder(port: int) -> str | None:
    """None if ``port`` can be bound on 127.0.0.1 now; else who holds it, in words ("" when
    that cannot be told: another user's process, say)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return None
        except OSError:
            pass
    try:
        import psutil

        for conn in psutil.net_connections("tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f" (process {conn.pid}, {psutil.Process(conn.pid).name()}, listens on it)"
    except (psutil.Error, OSError):
        pass
    return ""
