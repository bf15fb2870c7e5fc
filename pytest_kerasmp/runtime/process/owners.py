"""The owners of child processes (pools, servers, clusters, local Ray clusters), and how they all end.

Every owner registers here. Ctrl-C (the plugin's ``pytest_keyboard_interrupt``) and the
interpreter's exit call :func:`terminate_all`; SIGTERM runs :func:`kill_now` first (lock-free:
every child's process group is SIGKILLed within milliseconds), then chains to the handler that
was there, and under pytest ends the session as after Ctrl-C (:class:`Terminated`).
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import weakref
from typing import Any, Protocol, Self

from pytest_kerasmp.errors import TERMINATED, Terminated
from pytest_kerasmp.runtime.process import lifecycle


class Owner(Protocol):
    def terminate(self, why: str) -> None: ...


_owners: weakref.WeakSet[Any] = weakref.WeakSet()
_killers: set[Any] = set()


class Owned:
    """The ``with`` statement of an owner (pool, server, cluster): on Ctrl-C or SystemExit in
    the block it is terminated now; otherwise closed by ``close_after_with``."""

    def terminate(self, why: str = "terminated") -> None:
        raise NotImplementedError

    def close_after_with(self, failed: bool) -> None:
        """Close after the block; ``failed``: the block raised an ordinary exception."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            self.terminate(f"{exc_type.__name__} in the with block")
        else:
            self.close_after_with(exc_type is not None)


def register_owner(owner: Owner) -> None:
    _owners.add(owner)
    install_sigterm_handler()  # a script that owns processes: SIGTERM ends them too


def live() -> list[Any]:
    """The pools, servers and clusters of this process that are not closed."""
    return list(_owners)


def add_killer(kill: Any) -> None:
    """Have ``kill()`` (lock-free, quick) run when the process is terminated: for processes
    started outside ``Child`` (a local Ray cluster's daemons)."""
    _killers.add(kill)


def remove_killer(kill: Any) -> None:
    _killers.discard(kill)


def kill_now(why: str) -> None:
    """SIGKILL every child's process group now, without taking any lock (from a signal
    handler): the owners' orderly ``terminate`` may run later; no child starts after this."""
    lifecycle.terminating = why
    lifecycle.kill_children()
    for kill in list(_killers):
        try:
            kill()
        except Exception:
            pass


# ------------------------------------------------------------------------------ SIGTERM

#: The installed SIGTERM handler's state: the handler it replaced, and what to do after.
_sigterm: dict[str, Any] = {}
#: Called by the SIGTERM handler after the kill (the xdist controller forwards it to its workers).
on_sigterm: list[Any] = []


def install_sigterm_handler(*, interrupt: str | None = None) -> None:
    """End this process's children within milliseconds when it gets SIGTERM, then chain to the
    handler that was there: a Python handler is called; the default then ends the process as
    SIGTERM does. With ``interrupt`` (a pytest process: who it is), raise :class:`Terminated`
    after the chain instead, so the session ends as after Ctrl-C. Main thread only; a SIGTERM
    that is ignored stays ignored; a second SIGTERM ends the process at once."""
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_sigterm:
        if interrupt is not None:
            _sigterm["interrupt"] = interrupt
        return
    if current == signal.SIG_IGN or current is None:
        return
    _sigterm.update(previous=current, interrupt=interrupt, received=0)
    signal.signal(signal.SIGTERM, _on_sigterm)


def uninstall_sigterm_handler() -> None:
    """Put back the handler :func:`install_sigterm_handler` replaced."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, _sigterm.get("previous", signal.SIG_DFL))


def _on_sigterm(signum: int, frame: Any) -> None:
    _sigterm["received"] += 1
    kill_now(f"SIGTERM to pid {os.getpid()}")
    previous, interrupt = _sigterm["previous"], _sigterm["interrupt"]
    if _sigterm["received"] > 1:  # asked twice: end now, as SIGTERM does by default
        previous = signal.SIG_DFL
        interrupt = None
    else:
        for hook in list(on_sigterm):
            hook()
    if callable(previous):
        previous(signum, frame)
    if interrupt is not None:
        raise Terminated(TERMINATED.format(who=interrupt, pid=os.getpid()))
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def unregister_owner(owner: Owner) -> None:
    _owners.discard(owner)


def terminate_all(why: str) -> None:
    """End every pool and server of this process now (Ctrl-C, interpreter exit): pending
    work fails with the reason, running work is killed. Returns within seconds."""
    for owner in list(_owners):
        try:
            owner.terminate(why)
        except Exception:  # one owner's failure must not keep the others alive
            pass
    lifecycle.kill_children()


atexit.register(terminate_all, "the interpreter exited")
