"""What CI does to a session, survived: SIGTERM, a crashed xdist worker, a pool a test broke.

- **SIGTERM** (how CI cancels a job): every pytest process of the session (a lone pytest, the
  xdist controller, each xdist worker) kills the processes the plugin started at once
  (``owners.install_sigterm_handler``) and ends its session as after Ctrl-C; the controller
  forwards the signal to its workers first. A SIGTERM handler of the suite's own is chained.
- **A crashed xdist worker** (``os._exit``, a segfault, pytest-timeout's thread method): the
  controller records its end when xdist reports it, so the placement table shows its real
  lifetime and its replacement on the same slot is not taken for a competitor.
- **A pool a test broke.** The session pool (``kerasmp_pool``) is never handed out closed or
  broken: if a test closed it, or it broke, the next test that asks for it gets it restarted
  (same object, fresh workers), and the summary says which test broke it and why.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Generator
from typing import Any

import pytest

from pytest_kerasmp.runtime.process import owners
from pytest_kerasmp.slots import placement

#: The session pool, once the kerasmp_pool fixture made it (fixtures.py stores it here).
SESSION_POOL_KEY = pytest.StashKey[Any]()
#: Why the session pool stopped, and during which test (set at that test's teardown).
BROKEN_KEY = pytest.StashKey[tuple[str, str]]()
#: Lines for the summary, collected on the process that prints it (report attribute below).
EVENTS_KEY = pytest.StashKey[list[str]]()
ITEM_EVENTS_KEY = pytest.StashKey[list[str]]()
REPORT_ATTR = "kerasmp_events"

POOL_RESTARTED = (
    "the session pool (kerasmp_pool) was restarted for {test}{where}: {why} during {culprit}"
)


def who_am_i(config: pytest.Config) -> str:
    """How the SIGTERM line names this pytest process."""
    if hasattr(config, "workerinput"):
        return f"xdist worker {os.environ.get('PYTEST_XDIST_WORKER', '?')}"
    if config.getoption("numprocesses", None) or config.getoption("tx", None):
        return "the pytest controller"
    return "pytest"


class SessionGuard:
    """Registered on every pytest process of the session (see the module docstring)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.worker_pids: dict[str, int] = {}
        owners.install_sigterm_handler(interrupt=who_am_i(config))
        owners.on_sigterm.append(self.forward_sigterm)

    def unconfigure(self) -> None:
        if self.forward_sigterm in owners.on_sigterm:
            owners.on_sigterm.remove(self.forward_sigterm)
        owners.uninstall_sigterm_handler()

    # ------------------------------------------------------------ the xdist controller

    def forward_sigterm(self) -> None:
        """From the SIGTERM handler: the xdist workers end their sessions (and their pools) now."""
        for pid in self.worker_pids.values():
            try:
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodeready(self, node: Any) -> None:
        try:  # xdist reads the worker's remote info when it sets the worker up (cached here)
            self.worker_pids[node.gateway.id] = int(node.gateway._rinfo().pid)
        except Exception:
            pass

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        pid = self.worker_pids.pop(node.gateway.id, None)
        if error is not None and pid is not None:
            placement.release(pid)  # it could not record its own end

    # ------------------------------------------------------------- the session pool

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        pool = self.config.stash.get(SESSION_POOL_KEY, None)
        if pool is None or "kerasmp_pool" not in getattr(item, "fixturenames", ()):
            return
        why = pool.health()
        if why is None:
            return
        culprit_test, culprit_why = self.config.stash.get(BROKEN_KEY, ("an earlier test", why))
        self.config.stash[BROKEN_KEY] = ("", "")
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        item.stash.setdefault(ITEM_EVENTS_KEY, []).append(POOL_RESTARTED.format(
            test=item.nodeid, where=f" [{worker}]" if worker else "", why=culprit_why, culprit=culprit_test,
        ))
        pool.restart()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            pool = self.config.stash.get(SESSION_POOL_KEY, None)
            why = pool.health() if pool is not None else None
            if why is not None and not self.config.stash.get(BROKEN_KEY, ("", ""))[0]:
                self.config.stash[BROKEN_KEY] = (item.nodeid, why)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
        report = yield
        events = item.stash.get(ITEM_EVENTS_KEY, [])
        if call.when == "setup" and events:
            setattr(report, REPORT_ATTR, list(events))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if hasattr(self.config, "workerinput"):
            return  # the controller collects them
        for line in getattr(report, REPORT_ATTR, None) or []:
            self.config.stash.setdefault(EVENTS_KEY, []).append(line)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        for line in self.config.stash.get(EVENTS_KEY, []):
            terminalreporter.write_line(f"kerasmp: {line}", yellow=True)
