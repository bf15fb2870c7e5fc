"""Connecting to a running Ray cluster within a bound, with an error that says what was tried.

``ray.init(address=...)`` retries for good on an address where no cluster answers (a typo, a
port nothing listens on, a host that does not resolve), and ignores Ctrl-C meanwhile. So a
connection is made in steps, each bounded by one deadline: the host name is resolved, the
GCS port is tried with a TCP connection (refused or unresolvable: at once; no answer: until
the deadline), and only then does ``ray.init`` run, in a helper thread that this one waits
for in short steps (Ctrl-C ends the wait at once; a connect still running at the deadline is
abandoned, and the next :func:`connect_bounded` waits for it rather than start a second).
Ray is imported by the caller; this module imports none of it (``auto`` excepted).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pytest_kerasmp.errors import RayConnectError

#: Default bound on connecting to a cluster (``--kerasmp-ray-timeout``, ``ray_timeout_s``).
CONNECT_TIMEOUT_S = 30.0
#: How often a wait for a helper thread looks up (so that Ctrl-C ends it within this).
STEP_S = 0.1
#: One TCP connection attempt at most this long; attempts repeat until the deadline.
TCP_TRY_S = 2.0

T = TypeVar("T")
_abandoned: threading.Thread | None = None  # a ray.init still running past its deadline


class _Overdue(Exception):
    """A helper thread still ran at its deadline (it is left running, as ``thread``)."""

    def __init__(self, thread: threading.Thread) -> None:
        super().__init__(thread.name)
        self.thread = thread


def _in_thread(fn: Callable[[], T], deadline: float, name: str) -> T:
    """``fn()`` run in a daemon thread and waited for in steps of STEP_S until ``deadline``
    (then :class:`_Overdue`); its exception is raised here."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    while not done.wait(STEP_S):
        if time.monotonic() >= deadline:
            raise _Overdue(thread)
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result


def split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``"host:port"``, ``"[v6]:port"`` or ``"ray://host:port"``."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("it is not host:port (e.g. 10.0.0.5:6379), 'ray://host:port', 'auto' or 'local'")
    return host, int(port)


def probe(address: str, timeout_s: float = CONNECT_TIMEOUT_S, deadline: float | None = None) -> str:
    """Check, within ``timeout_s`` (or by ``deadline``, a ``time.monotonic()``, when given),
    that something accepts TCP connections at ``address``; return the ``host:port`` that was
    tried. Raises :class:`RayConnectError` saying what was tried."""
    deadline = time.monotonic() + timeout_s if deadline is None else deadline
    if address == "auto":
        address = _auto_address(address, deadline, timeout_s)
    try:
        host, port = split_address(address)
    except ValueError as exc:
        raise RayConnectError(address, str(exc), timeout_s) from None
    try:
        infos = _in_thread(lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), deadline, "kerasmp-resolve")
    except socket.gaierror as exc:
        raise RayConnectError(address, f"the host name {host!r} does not resolve ({exc.strerror})", timeout_s) from None
    except _Overdue:
        raise RayConnectError(address, f"the host name {host!r} did not resolve within {timeout_s:g} s", timeout_s) from None
    family, kind, proto, _, sockaddr = infos[0]
    ip = str(sockaddr[0])
    where = f"{ip} port {port}" + (f" ({host})" if host != ip else "")
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RayConnectError(address, f"a TCP connection to {where} got no answer within {timeout_s:g} s (is the host up, and the port open to this machine?)", timeout_s)
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(min(TCP_TRY_S, left))
            try:
                sock.connect(sockaddr)
                return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            except TimeoutError:
                continue
            except ConnectionRefusedError:
                raise RayConnectError(address, f"a TCP connection to {where} was refused: nothing listens on that port", timeout_s) from None
            except OSError as exc:
                raise RayConnectError(address, f"a TCP connection to {where} failed ({exc.strerror or exc})", timeout_s) from None


def _auto_address(address: str, deadline: float, timeout_s: float) -> str:
    """The address ``auto`` stands for (``RAY_ADDRESS``, else the cluster ``ray start`` recorded)."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        found = _in_thread(lambda: canonicalize_bootstrap_address_or_die(address), deadline, "kerasmp-ray-auto")
    except (ConnectionError, ValueError) as exc:
        raise RayConnectError(address, f"no running Ray cluster was found on this machine ({exc})", timeout_s) from None
    except _Overdue:
        raise RayConnectError(address, f"no running Ray cluster was found on this machine within {timeout_s:g} s", timeout_s) from None
    return str(found)


class _NoSigtermNotice(logging.Filter):
    """Ray says that it set no SIGTERM handler when ``ray.init`` runs outside the main
    thread; that is on purpose here (the process keeps its own handling of SIGTERM)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in str(record.msg)


def connect_bounded(ray: Any, address: str, timeout_s: float = CONNECT_TIMEOUT_S, **init: Any) -> None:
    """``ray.init(address=address, **init)``, bounded by ``timeout_s`` in all (the probe
    included); raises :class:`RayConnectError`, or KeyboardInterrupt at once on Ctrl-C."""
    global _abandoned
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s={timeout_s!r} must be a positive number of seconds: connecting is bounded")
    deadline = time.monotonic() + timeout_s
    if _abandoned is not None and _abandoned.is_alive():
        _abandoned.join(max(0.0, deadline - time.monotonic()))
        if _abandoned.is_alive():
            raise RayConnectError(address, "an earlier connection attempt of this process is still running", timeout_s)
    tried = probe(address, timeout_s, deadline)
    quiet = _NoSigtermNotice()
    logger = logging.getLogger("ray._private.worker")
    logger.addFilter(quiet)
    try:
        _in_thread(lambda: ray.init(address=address, **init), deadline, "kerasmp-ray-init")
    except _Overdue as overdue:
        _abandoned = overdue.thread
        raise RayConnectError(address, (
            f"{tried} accepts TCP connections, but Ray's connect (ray.init) did not finish within {timeout_s:g} s "
            "(is it the cluster's GCS port, or its Ray Client port for ray://?)"
        ), timeout_s) from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RayConnectError(address, f"{tried} accepts TCP connections, but ray.init failed: {type(exc).__name__}: {first}", timeout_s) from exc
    finally:
        logger.removeFilter(quiet)
