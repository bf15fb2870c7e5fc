"""Slots leased per test: one table for the session, shared by every pytest process.

The table is a JSON file in the session's directory (``placement.session_dir()``), read
under a shared ``flock`` and changed under an exclusive one, in place, through a descriptor
each process opens once; each process appends its ended leases to a history file of its own. Each entry is one test of
one pytest process (an xdist worker, or the lone pytest process):

- a **request** names the slots it must have (``want``: the slot its process is pinned to,
  and the slots of the session pool when the test uses it) and how many more of any kind
  (``extra``: a ``kerasmp_slots(n)`` test's other n-1);
- it waits in one **queue**, first come, first served, holding nothing (no hold-and-wait, so
  no deadlock): a request is granted all its slots at once, when they are free and no
  earlier request waits for one of them (an earlier request reserves what it waits for, so
  a 2-slot test is not starved by a stream of 1-slot tests, while a later request that
  needs only other slots goes ahead);
- a **lease** ends at the test's teardown, or when its process is gone (a holder or waiter
  whose pid no longer runs holds and wants nothing: a worker killed by ``os._exit``, a
  timeout, the OOM killer).

Every pass over the table (each waiter polls it) grants whatever can be granted, so a lease
does not depend on its own process waking up first. Import-light: standard library and
``placement`` only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pytest_kerasmp.errors import LEASE_TIMED_OUT, LeaseTimeoutError
from pytest_kerasmp.slots import placement

TABLE = "leases.json"
#: A wait longer than this is shown on the terminal (and named in the error if it times out).
NOTICE_S = 5.0
#: Between two looks at the table while waiting: short at first, then at most this.
POLL_MAX_S = 0.1


@dataclasses.dataclass(frozen=True)
class Lease:
    """Slots held by one test: indices into the session's slots, the pinned one first."""

    id: str
    owner: str
    test: str
    slots: tuple[int, ...]
    requested: float
    granted: float


#: Per process, the table's descriptor, opened once: creating and renaming files costs
#: about 0.2 ms each on an overlay file system (measured here), a read and a write in place
#: a few microseconds.
_fds: dict[Path, int] = {}
#: Per process, its history file (one JSON line per ended lease), opened once for appending.
_history_fds: dict[Path, int] = {}


_fds_pid = 0


def _fd(directory: Path, name: str = TABLE, flags: int = os.O_RDWR) -> int:
    global _fds_pid
    if _fds_pid != os.getpid():  # a forked child opens its own (a lock is per open file)
        _fds.clear()
        _history_fds.clear()
        _fds_pid = os.getpid()
    cache = _fds if name == TABLE else _history_fds
    fd = cache.get(directory)
    if fd is None:
        fd = cache[directory] = os.open(directory / name, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return fd


def close(directory: Path) -> None:
    """Close this process's descriptors of ``directory``'s table and history (its session ended)."""
    for cache in (_fds, _history_fds):
        fd = cache.pop(directory, None)
        if fd is not None and _fds_pid == os.getpid():
            os.close(fd)


def _load(fd: int) -> dict[str, Any]:
    raw = os.pread(fd, 1 << 24, 0)
    try:
        state: dict[str, Any] = json.loads(raw) if raw else {}
    except ValueError:
        state = {}
    state.setdefault("holders", [])
    state.setdefault("queue", [])
    return state


@contextlib.contextmanager
def _table(directory: Path) -> Iterator[dict[str, Any]]:
    """The table, under an exclusive lock, for reading and changing; written back in place."""
    fd = _fd(directory)
    fcntl.flock(fd, fcntl.LOCK_EX)  # released below, or when its process dies
    try:
        state = _load(fd)
        yield state
        data = json.dumps(state).encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def read(directory: Path) -> dict[str, Any]:
    """The table as it is now (under a shared lock: it is written in place)."""
    if not (directory / TABLE).exists():
        return _load_empty()
    fd = _fd(directory)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        return _load(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _load_empty() -> dict[str, Any]:
    return {"holders": [], "queue": []}


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie does not (a crashed xdist worker stays one until the
    controller reaps it)."""
    if not placement.process_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except (OSError, IndexError):  # unreadable (hidepid): alive, as process_alive said
        return True


def _grant(state: dict[str, Any], total: int, now: float) -> None:
    """Grant in queue order (see the module docstring): a request is granted when its slots
    are free and unreserved; one that cannot be reserves what it waits for. Where one waits,
    the entries of processes that are gone are dropped first (the uncontended path reads
    no ``/proc``)."""
    _grant_pass(state, total, now)
    if state["queue"]:
        state["holders"] = [h for h in state["holders"] if _alive(h["pid"])]
        state["queue"] = [w for w in state["queue"] if _alive(w["pid"])]
        _grant_pass(state, total, now)


def _grant_pass(state: dict[str, Any], total: int, now: float) -> None:
    busy = {i for h in state["holders"] for i in h["slots"]}
    reserved: set[int] = set()
    waiting = []
    for w in state["queue"]:
        free = [i for i in range(total) if i not in busy and i not in reserved]
        want = list(dict.fromkeys(w["want"]))
        if all(i in free for i in want):
            others = [i for i in free if i not in want][: w["extra"]]
            if len(others) == w["extra"]:
                slots = want + others
                state["holders"].append({**w, "slots": slots, "granted": now})
                busy.update(slots)
                continue
        candidates = sorted((i for i in range(total) if i not in want and i not in reserved), key=lambda i: (i in busy, i))
        reserved.update(want + candidates[: w["extra"]])
        waiting.append(w)
    state["queue"] = waiting


def acquire(
    directory: Path,
    total: int,
    *,
    want: Sequence[int],
    extra: int,
    owner: str,
    test: str,
    timeout: float,
    names: Sequence[str],
    notice: Callable[[str], None] | None = None,
) -> Lease:
    """Wait until ``want`` and ``extra`` more slots are leased to this test; at most
    ``timeout`` seconds, then :class:`LeaseTimeoutError` names who holds what."""
    me = f"{os.getpid()}-{time.monotonic_ns()}"
    requested = time.time()
    entry = {"id": me, "pid": os.getpid(), "owner": owner, "test": test, "want": list(want), "extra": extra,
             "since": requested}
    deadline = time.monotonic() + timeout
    pause, noticed = 0.002, False
    try:
        with _table(directory) as state:
            # A process runs one test at a time: anything it still holds or waits for was lost
            # to an interrupt between a grant and its teardown (it would wait for itself).
            state["holders"] = [h for h in state["holders"] if h["pid"] != entry["pid"]]
            state["queue"] = [w for w in state["queue"] if w["pid"] != entry["pid"]]
            state["queue"].append(entry)
            _grant(state, total, time.time())
            mine = _mine(state, me)
        while mine is None:
            if time.monotonic() >= deadline:
                raise LeaseTimeoutError(timed_out(read(directory), entry, names, timeout))
            if notice is not None and not noticed and time.time() - requested >= NOTICE_S:
                noticed = True
                notice(waiting_line(read(directory), entry, names))
            time.sleep(pause)
            pause = min(pause * 2, POLL_MAX_S)
            with _table(directory) as state:
                _grant(state, total, time.time())
                mine = _mine(state, me)
    except BaseException:  # a timeout or an interrupt: want nothing any more, hold nothing
        with _table(directory) as state:
            state["queue"] = [w for w in state["queue"] if w["id"] != me]
            state["holders"] = [h for h in state["holders"] if h["id"] != me]
        raise
    return Lease(me, owner, test, tuple(mine["slots"]), requested, mine["granted"])


def _mine(state: dict[str, Any], me: str) -> dict[str, Any] | None:
    return next((h for h in state["holders"] if h["id"] == me), None)


def release(directory: Path, lease: Lease, names: Sequence[str]) -> None:
    """End ``lease`` and record it for the report (``lease-*.json`` beside the table)."""
    with _table(directory) as state:
        released = time.time()  # under the lock: before any grant of these slots to another
        state["holders"] = [h for h in state["holders"] if h["id"] != lease.id]
    record = {"test": lease.test, "owner": lease.owner, "slots": [names[i] for i in lease.slots],
              "requested": lease.requested, "granted": lease.granted, "released": released}
    fd = _fd(directory, f"history-{os.getpid()}.jsonl", os.O_WRONLY | os.O_APPEND)
    os.write(fd, (json.dumps(record) + "\n").encode())  # one write of a line: whole or absent


def release_all(directory: Path, pid: int) -> None:
    """End every lease and request of process ``pid`` (its session is ending)."""
    if not (directory / TABLE).exists():
        return
    with _table(directory) as state:
        state["holders"] = [h for h in state["holders"] if h["pid"] != pid]
        state["queue"] = [w for w in state["queue"] if w["pid"] != pid]


def history(directory: Path) -> list[dict[str, Any]]:
    """Every ended lease of the session, in the order they were granted."""
    found = []
    for path in directory.glob("history-*.jsonl"):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return sorted(found, key=lambda r: r["granted"])


def windows(directory: Path, slots: Sequence[Any]) -> placement.Windows:
    """When each owner held which resources (``placement.Windows``): every ended lease and
    every lease held now (until now and on)."""
    of = [placement.resources_of([s]) for s in slots]
    by_name = {s.name: r for s, r in zip(slots, of, strict=True)}
    found: placement.Windows = {}
    for r in history(directory):
        found.setdefault(r["owner"], []).append((r["granted"], r["released"], set().union(*(by_name[n] for n in r["slots"]))))
    for h in read(directory)["holders"]:
        found.setdefault(h["owner"], []).append((h["granted"], float("inf"), set().union(*(of[i] for i in h["slots"]))))
    return found


def _held_by(state: dict[str, Any], slots: set[int], names: Sequence[str], now: float, me: str = "") -> str:
    held = [
        f"{names[i]} by {h['owner']} ({h['test']}) for {now - h['granted']:.0f} s"
        for h in state["holders"] for i in h["slots"] if i in slots
    ]
    ahead = []
    for w in state["queue"]:
        if w["id"] == me:
            break
        ahead.append(f"{w['owner']} ({w['test']}) queued first, for {', '.join(names[i] for i in w['want'])}"
                     + (f" and {w['extra']} more" if w["extra"] else ""))
    return "; ".join(held + ahead) or "nothing now (it was being granted)"


def waiting_line(state: dict[str, Any], entry: dict[str, Any], names: Sequence[str]) -> str:
    """``gw0 waits for slot1, held by gw1 (tests/test_x.py::test_y) for 12 s``."""
    now = time.time()
    wanted = ", ".join(names[i] for i in entry["want"]) + (f" and {entry['extra']} more" if entry["extra"] else "")
    held = _held_by(state, set(range(len(names))) if entry["extra"] else set(entry["want"]), names, now, entry["id"])
    return f"{entry['owner']} waits for {wanted} ({entry['test']}, {now - entry['since']:.0f} s so far): held: {held}"


def timed_out(state: dict[str, Any], entry: dict[str, Any], names: Sequence[str], timeout: float) -> str:
    wanted = ", ".join(names[i] for i in entry["want"]) + (f" and {entry['extra']} more" if entry["extra"] else "")
    held = _held_by(state, set(range(len(names))) if entry["extra"] else set(entry["want"]), names, time.time(), entry["id"])
    return LEASE_TIMED_OUT.format(owner=entry["owner"], test=entry["test"], wanted=wanted, timeout=timeout, held=held)


def waits(state: dict[str, Any], names: Sequence[str], longer_than: float) -> list[tuple[str, str]]:
    """``(id, line)`` of every request that has waited longer than ``longer_than`` seconds."""
    now = time.time()
    return [(w["id"], waiting_line(state, w, names)) for w in state["queue"] if now - w["since"] >= longer_than]


def summary(leases: Sequence[dict[str, Any]], slot_count: int) -> dict[str, Any]:
    """Slot use (busy slot-seconds / (slots x the span from the first grant to the last
    release)), the longest wait and who waited it."""
    if not leases or slot_count < 1:
        return {"leases": 0, "slot_use": None, "span_s": 0.0, "longest_wait_s": 0.0, "longest_wait": None}
    start = min(r["granted"] for r in leases)
    end = max(r["released"] for r in leases)
    busy = sum((r["released"] - r["granted"]) * len(r["slots"]) for r in leases)
    longest = max(leases, key=lambda r: r["granted"] - r["requested"])
    span = max(end - start, 1e-9)
    return {
        "leases": len(leases), "slot_use": busy / (slot_count * span), "span_s": end - start,
        "longest_wait_s": longest["granted"] - longest["requested"],
        "longest_wait": f"{longest['owner']} {longest['test']}",
    }


__all__ = ["Lease", "acquire", "close", "history", "read", "release", "release_all", "summary", "waiting_line", "waits", "windows"]
