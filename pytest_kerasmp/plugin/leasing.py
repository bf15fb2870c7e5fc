"""Slots leased per test, the pytest side (the table itself: ``slots.leases``).

Under ``--kerasmp-gpus`` every test leases slots from one table for the session, from its
setup to its teardown: a test leases the slot its process is pinned to (plus, when it uses
the session's ``kerasmp_pool``, the slots that pool runs on), and a test marked
``@pytest.mark.kerasmp_slots(n)`` leases n (its own first). ``kerasmp_slots`` returns them,
the fixtures that start processes place them there, and ``plan_slots`` plans over them. A
test that asks for more slots than the session has is skipped at collection (failed under
``--kerasmp-require-gpu``), never left waiting.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from pytest_kerasmp.errors import LeaseTimeoutError
from pytest_kerasmp.plugin import config as cfg
from pytest_kerasmp.slots import leases, placement
from pytest_kerasmp.slots.devices import DeviceSlot, current_scope, plural, set_scope

MARKER_HELP = (
    "kerasmp_slots(n): the test needs n device slots ('all': every slot of the session), "
    "leased to it from its setup to its teardown; kerasmp_slots returns them and the "
    "fixtures start their processes on them"
)
MARKER_BAD = "@pytest.mark.kerasmp_slots needs one positive integer or 'all', e.g. kerasmp_slots(2); got {args!r}"
TOO_MANY = (
    "needs {wanted} (kerasmp_slots marker) but the session has {have}; pass --kerasmp-gpus={n} "
    "or more (a CPU slot per core: the machine has to have them), or --kerasmp-require-gpu to fail instead of skipping"
)
TOO_MANY_REQUIRED = (
    "needs {wanted} (kerasmp_slots marker) but the session has {have} and --kerasmp-require-gpu "
    "is set (from {source}); pass --kerasmp-gpus={n} or more"
)
HEADER = (
    "kerasmp: slots leased per test ({mode}): a test leases its process's slot, "
    "@pytest.mark.kerasmp_slots(n) n of them; waits are bounded by {option}={timeout:g} s"
)
TAKE_TURNS = (
    "{workers} xdist workers on {slots} slots: workers pinned to one slot take turns on it "
    "(each test leases it), so no two tests computed on one slot at once; -n {slots} avoids the waits"
)
AUTO_WORKERS = "kerasmp: -n auto -> {n} xdist workers, one per slot ({option})"

LEASE_KEY = pytest.StashKey[leases.Lease]()
SCOPE_KEY = pytest.StashKey[Any]()


def marked_count(item: pytest.Item, total: int) -> int | None:
    """The slots a ``kerasmp_slots`` marker asks for (None: no marker); -1 if malformed."""
    marker = item.get_closest_marker("kerasmp_slots")
    if marker is None:
        return None
    args = marker.args
    if len(args) == 1 and args[0] == "all":
        return total
    if len(args) != 1 or not isinstance(args[0], int) or isinstance(args[0], bool) or args[0] < 1:
        return -1
    return int(args[0])


def active(config: pytest.Config) -> bool:
    """Whether this pytest process leases slots per test."""
    settings = cfg.session_settings(config)
    plan = config.stash.get(cfg.PLAN_KEY, None)
    return (settings.requested and settings.leases == "per-test" and plan is not None and plan.pinned is not None
            and not config.getoption("kerasmp_ray", None) and placement.session_dir() is not None)


def skip_too_many(config: pytest.Config, items: list[pytest.Item]) -> None:
    """At collection: a test that asks for more slots than the session has is skipped now."""
    if not cfg.session_settings(config).requested or cfg.session_settings(config).require_gpu:
        return  # without slots nothing is leased; under --kerasmp-require-gpu they fail in setup
    total = len(cfg.session_plan(config).slots)
    for item in items:
        n = marked_count(item, total)
        if n is not None and n > total:
            item.add_marker(pytest.mark.skip(reason=TOO_MANY.format(
                wanted=plural(n, "slot"), have=plural(total, "slot"), n=n)))


def check(item: pytest.Item) -> bool:
    """At setup: a malformed marker fails the test; too many slots under --kerasmp-require-gpu
    too. Whether the test can lease what it asks for (else it is skipped: marked at collection)."""
    plan = cfg.session_plan(item.config)
    n = marked_count(item, len(plan.slots))
    if n is None:
        return True
    if n < 1:
        marker = item.get_closest_marker("kerasmp_slots")
        pytest.fail(MARKER_BAD.format(args=marker.args if marker else ()), pytrace=False)
    settings = cfg.session_settings(item.config)
    if settings.requested and n > len(plan.slots):
        if not settings.require_gpu:
            return False
        pytest.fail(TOO_MANY_REQUIRED.format(wanted=plural(n, "slot"), have=plural(len(plan.slots), "slot"),
                                             source=settings.require_source, n=n), pytrace=False)
    return True


def request_of(item: pytest.Item) -> tuple[list[int], int]:
    """What a test leases: the slots it must have (its process's; the session pool's if it
    uses it; those of every pool, server and cluster of this process still open, which a
    fixture of a broader scope keeps from an earlier test) and how many more of any kind."""
    plan = cfg.session_plan(item.config)
    assert plan.pinned is not None
    want = [plan.slots.index(plan.pinned)]
    if "kerasmp_pool" in getattr(item, "fixturenames", ()):
        want += [plan.slots.index(s) for s in plan.own_slots if plan.slots.index(s) not in want]
    kept = placement.resources_of(_slots_of_live_owners())
    want += [i for i, s in enumerate(plan.slots) if i not in want and placement.resources_of([s]) & kept]
    n = marked_count(item, len(plan.slots)) or 1
    return want, max(0, n - len(want))


def _slots_of_live_owners() -> list[DeviceSlot]:
    from pytest_kerasmp.runtime.process import owners

    found: list[DeviceSlot] = []
    for owner in owners.live():
        slots = getattr(owner, "slots", None) or [getattr(owner, "slot", None)]
        found += [s for s in slots if isinstance(s, DeviceSlot) and not s.node]
    return found


def slots_of(item: pytest.Item) -> tuple[DeviceSlot, ...] | None:
    """The slots leased to this test (None when it leased none)."""
    lease = item.stash.get(LEASE_KEY, None)
    if lease is None:
        return None
    slots = cfg.session_plan(item.config).slots
    return tuple(slots[i] for i in lease.slots)


class Leasing:
    """Registered in every pytest process that leases: takes and ends each test's lease."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        directory = placement.session_dir()
        assert directory is not None
        self.directory: Path = directory
        plan = cfg.session_plan(config)
        self.names = [s.name for s in plan.slots]
        self.owner = plan.worker_id or "main"

    # Not tryfirst: after pytest's skip and xfail(run=False) handling (a skipped test leases
    # nothing), before the fixtures are set up (they start processes on the leased slots).
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if not check(item):  # a bad marker fails before it waits; too many slots: skipped (marked)
            return
        want, extra = request_of(item)
        settings = cfg.session_settings(self.config)
        try:
            lease = leases.acquire(
                self.directory, len(self.names), want=want, extra=extra, owner=self.owner, test=item.nodeid,
                timeout=settings.lease_timeout_s, names=self.names,
            )
        except LeaseTimeoutError as exc:
            pytest.fail(str(exc), pytrace=False)
        item.stash[LEASE_KEY] = lease
        item.stash[SCOPE_KEY] = current_scope()
        held = slots_of(item) or ()
        set_scope(held, f"the {plural(len(held), 'slot')} leased to {item.nodeid} ({', '.join(s.name for s in held)})")

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
        try:
            return (yield)
        finally:
            lease = item.stash.get(LEASE_KEY, None)
            if lease is not None:
                try:
                    leases.release(self.directory, lease, self.names)
                finally:
                    scope = item.stash.get(SCOPE_KEY, None)
                    if scope is not None:
                        set_scope(scope.slots, scope.description)

    def pytest_sessionfinish(self) -> None:
        leases.release_all(self.directory, os.getpid())
        leases.close(self.directory)


class WaitNotices:
    """On the xdist controller: one terminal line for each wait longer than ``leases.NOTICE_S``."""

    def __init__(self, config: pytest.Config, directory: Path, names: list[str]) -> None:
        self.config, self.directory, self.names = config, directory, names
        self._stop = threading.Event()
        self._said: set[str] = set()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="kerasmp-lease-notices")
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            # Looked up here: the terminal reporter registers itself after this plugin's configure.
            reporter = self.config.pluginmanager.getplugin("terminalreporter")
            for key, line in leases.waits(leases.read(self.directory), self.names, leases.NOTICE_S):
                if key not in self._said and reporter is not None:
                    self._said.add(key)
                    reporter.ensure_newline()
                    reporter.write_line(f"kerasmp: {line}", yellow=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


def windows(config: pytest.Config) -> placement.Windows | None:
    """Under leases: when each pytest process held which resources (None without leases)."""
    directory = placement.session_dir()
    settings = cfg.session_settings(config)
    if directory is None or not settings.requested or settings.leases != "per-test" or config.getoption("kerasmp_ray", None):
        return None
    return leases.windows(directory, cfg.session_plan(config).slots)


def session_summary(directory: Path, slot_count: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every lease of the session and its summary (slot use, longest wait), for the report."""
    history = leases.history(directory)
    leases.close(directory)
    return history, leases.summary(history, slot_count)


def summary_line(summary: dict[str, Any], slot_count: int) -> str:
    if not summary["leases"]:
        return ""
    return (f"kerasmp: {plural(summary['leases'], 'lease')} on {plural(slot_count, 'slot')} over "
            f"{summary['span_s']:.1f} s: slot use {summary['slot_use']:.0%} (busy slot-seconds / "
            f"(slots x span)); longest wait {summary['longest_wait_s']:.1f} s ({summary['longest_wait']})")
