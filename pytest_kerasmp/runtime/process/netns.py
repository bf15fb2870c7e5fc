"""A private network for a cluster's tasks: one network namespace with only loopback, up.

TensorFlow's gRPC server listens on every interface whatever address ``TF_CONFIG`` names
(tensorflow/tensorflow#2925, #11689), and runs what reaches it without authentication. The
tasks of a cluster therefore join one network namespace whose only interface is ``lo``:
their every-interface listen reaches nothing outside it, and they still reach each other on
127.0.0.1. Where this process is not root the namespace lives in a user namespace of its own
(no privilege needed where the kernel allows unprivileged user namespaces).

The namespace is made and held by a small process (the holder, started here; it runs no
framework and is pinned to nothing, so it is not a ``lifecycle.Child``): it makes the
namespace, brings ``lo`` up, prints ``ready`` and waits; it exits when its standard input
closes (:meth:`PrivateNetwork.close`, or its owner's death closes the pipe), and is killed
when the thread that started it ends (``PR_SET_PDEATHSIG``; a cluster restarted later makes a
new one if so). A task joins the namespace first thing in its
bootstrap, while it has one thread (``setns`` refuses a threaded process a user namespace).
The plugin's channels to a task (socket pairs and pipes) cross namespaces; TCP does not.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import time
from multiprocessing.connection import wait

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
#: Refusals that do not pass while the process runs (a limit reached, ENOSPC, may pass).
LASTING = tuple(os.strerror(e) for e in (errno.EPERM, errno.EACCES, errno.EINVAL))
#: Bound on the holder's start (a Python interpreter and four system calls).
START_TIMEOUT_S = 10.0

# Runs in the holder: standard library only, every step worded when it fails.
_HOLDER = r"""
import ctypes, fcntl, os, signal, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def fail(step):
    e = ctypes.get_errno()
    print("refused: " + step + ": " + os.strerror(e), flush=True)
    sys.exit(1)
libc.prctl(1, signal.SIGKILL, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
uid, gid = os.getuid(), os.getgid()
user = os.geteuid() != 0
if libc.unshare(0x40000000 | (0x10000000 if user else 0)) != 0:
    fail("unshare(CLONE_NEW%sNET)" % ("USER|CLONE_NEW" if user else ""))
step = "writing /proc/self/uid_map"
try:
    if user:
        for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)), ("gid_map", "%d %d 1" % (gid, gid))):
            step = "writing /proc/self/" + name
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
    step = "bringing up lo in the new namespace"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flags = struct.unpack("16sh14x", fcntl.ioctl(s, 0x8913, struct.pack("16sh14x", b"lo", 0)))[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sh14x", b"lo", flags | 1))
except OSError as exc:
    print("refused: " + step + ": " + exc.strerror, flush=True)
    sys.exit(1)
print("ready", flush=True)
sys.stdin.buffer.read()
"""


class PrivateNetworkRefused(OSError):
    """The kernel refused the namespace; ``str()`` says which step and why."""


_refused: str | None = None


def refused() -> str | None:
    """Why the kernel refused this process a private network, once it has (asked once:
    a refusal does not change while the process runs)."""
    return _refused


class PrivateNetwork:
    """A held network namespace with only loopback (see the module docstring).

    Raises:
        PrivateNetworkRefused: The kernel refused it (no user namespaces for this user,
            a container without the capability, an LSM that forbids it).
    """

    def __init__(self, timeout: float = START_TIMEOUT_S) -> None:
        started = time.monotonic()
        self._holder = subprocess.Popen(
            [sys.executable, "-S", "-c", _HOLDER, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=0,
        )
        #: The holder's pid: a task joins ``/proc/PID/ns/*``.
        self.pid = self._holder.pid
        assert self._holder.stdout is not None
        try:
            ready = wait([self._holder.stdout.fileno()], timeout)
            line = self._holder.stdout.readline().decode(errors="replace").strip() if ready else ""
        except BaseException:  # an interrupt: no holder left behind
            self.close()
            raise
        if line != "ready":
            global _refused
            self.close()
            why = line.removeprefix("refused: ") or (
                f"its holder did not answer within {timeout:g} s" if not ready else "its holder exited")
            if line.startswith("refused: ") and why.endswith(LASTING):  # a lasting refusal, not a passing limit
                _refused = why
            raise PrivateNetworkRefused(why)
        #: Seconds the holder took to make the namespace.
        self.start_s = time.monotonic() - started

    def alive(self) -> bool:
        return self._holder.poll() is None

    def close(self) -> None:
        """End the holder; the namespace goes with the last task in it."""
        holder = self._holder
        if holder.stdin is not None and not holder.stdin.closed:
            try:
                holder.stdin.close()
            except OSError:
                pass
        try:
            holder.wait(1.0)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def join(holder_pid: int) -> None:
    """Enter the holder's namespaces (its user namespace first, where it made one); call
    while this process has one thread, before anything listens."""
    libc = ctypes.CDLL(None, use_errno=True)
    fds: list[tuple[int, int, str]] = []
    try:
        for kind, flag in (("user", CLONE_NEWUSER), ("net", CLONE_NEWNET)):
            path = f"/proc/{holder_pid}/ns/{kind}"
            try:
                if os.stat(path).st_ino != os.stat(f"/proc/self/ns/{kind}").st_ino:
                    fds.append((os.open(path, os.O_RDONLY), flag, path))
            except FileNotFoundError:
                raise OSError(errno.ESRCH, f"joining the cluster's private network: its holder (pid {holder_pid}) is gone") from None
        for fd, flag, path in fds:
            if libc.setns(fd, flag) != 0:
                error = ctypes.get_errno()
                hint = " (this process already runs threads: join first thing)" if error == errno.EINVAL else ""
                raise OSError(error, f"joining the cluster's private network: setns({path}): {os.strerror(error)}{hint}")
    finally:
        for fd, _, _ in fds:
            os.close(fd)


__all__ = ["PrivateNetwork", "PrivateNetworkRefused", "join"]
