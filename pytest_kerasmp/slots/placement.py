"""Who runs where in a session: the one authority for placement.

Two parts, both import-light (no pytest, no TensorFlow), so children can use them:

- **Partition.** The session's slots are split among its pytest processes: without xdist
  the pytest process owns them all; under ``-n W`` xdist worker ``gwK`` owns part ``K mod W``
  (contiguous, near-equal), is pinned to the first slot of its part, and its pools, servers
  and fixtures default to its part. With more workers than slots each worker gets one slot
  (``K mod N``) and workers share slots: the user asked for it, and the header says so.
- **Registry.** The session's controller (or the lone pytest process) makes a directory and
  names it in ``PYTEST_KERASMP_SESSION_DIR``; every process the plugin pins writes one JSON
  record there, observed from inside itself (affinity, ``CUDA_VISIBLE_DEVICES``, memory
  growth or cap), and its owner writes its end. The controller reads them at the end for
  the placement table and the report; a worker reads them to tell whether a comparison was
  measured while a process of another worker competed for its slots.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pytest_kerasmp import frameworks
from pytest_kerasmp.slots.devices import DeviceSlot, plural, split_evenly

SESSION_ENV = "PYTEST_KERASMP_SESSION_DIR"

OVERSUBSCRIBED = (
    "{workers} on {slots}: {pairs}; processes of different workers share those slots and "
    "time each other; use -n {n_slots} or --kerasmp-gpus={n_workers}"
)
COMPETED_NOTE = (
    "* measured while another process of the session competed for its slots (see the "
    "placement table); its speedup is not what this machine gives one test"
)
SHARED_ACROSS_WORKERS = (
    "processes of different xdist workers shared a GPU or cores ({who}): the session has more "
    "slots than GPUs, or -n exceeds the slots (see the header); their comparisons are marked *"
)
UNPINNED_COMPETED = "xdist workers unpinned (no --kerasmp-gpus): every worker shared every core"



# ---------------------------------------------------------------------------- partition


def worker_index(worker_id: str) -> int:
    """``"gw3"`` -> 3."""
    return int(worker_id.removeprefix("gw"))


def partition(slots: Sequence[DeviceSlot], workers: int) -> list[tuple[DeviceSlot, ...]]:
    """One part of ``slots`` per xdist worker: disjoint when ``workers <= len(slots)``
    (contiguous, the first parts one larger), else slot ``K mod N`` for worker K."""
    return split_evenly(slots, workers) if workers > 0 else [tuple(slots)]


def part_of(slots: Sequence[DeviceSlot], worker_id: str | None, workers: int) -> tuple[DeviceSlot, ...]:
    """The slots that xdist worker ``worker_id`` owns (all of them without xdist)."""
    if not worker_id or workers <= 0:
        return tuple(slots)
    parts = partition(slots, workers)
    return parts[worker_index(worker_id) % len(parts)]


def describe_part(part: Sequence[DeviceSlot]) -> str:
    return ", ".join(s.name for s in part)


def oversubscription(slots: Sequence[DeviceSlot], workers: int) -> str | None:
    """The header's sentence when there are more xdist workers than slots, else None."""
    if workers <= len(slots):
        return None
    by_slot: dict[str, list[str]] = {}
    for k, part in enumerate(partition(slots, workers)):
        by_slot.setdefault(part[0].name, []).append(f"gw{k}")
    pairs = "; ".join(
        f"{' and '.join(ws)} share {name}" for name, ws in by_slot.items() if len(ws) > 1
    )
    return OVERSUBSCRIBED.format(
        workers=plural(workers, "xdist worker"), slots=plural(len(slots), "slot"), pairs=pairs,
        n_slots=len(slots), n_workers=workers,
    )


def resources_of(slots: Iterable[DeviceSlot]) -> set[str]:
    """What slots occupy: ``"GPU 1"`` for a GPU slot, ``"core 3"`` per core of a CPU slot."""
    found: set[str] = set()
    for s in slots:
        if s.kind == "GPU":
            found.add(f"GPU {s.gpu}")
        else:
            found.update(f"core {c}" for c in s.cores)
    return found


# ----------------------------------------------------------------------------- registry


SESSION_PREFIX = "pytest-kerasmp-session-"
#: "PID START_TIME HOST PID_NAMESPACE" of the process that made the directory.
OWNER_FILE = "owner"
#: A directory without an owner file (made by a version before owner files) this old is left over.
UNOWNED_MAX_AGE_S = 7 * 24 * 3600


def open_session() -> Path:
    """Make this session's registry directory and name it for every process started later
    (first removing those of sessions whose process was killed before it could: SIGKILL,
    the OOM killer)."""
    remove_orphaned_sessions()
    path = Path(tempfile.mkdtemp(prefix=SESSION_PREFIX))
    tmp = path / f".{OWNER_FILE}.tmp"
    tmp.write_text(" ".join(map(str, (os.getpid(), _start_time(os.getpid()), *_machine()))))
    os.replace(tmp, path / OWNER_FILE)  # whole or absent, never half-written
    os.environ[SESSION_ENV] = str(path)
    return path


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, ValueError):
        return None


def process_alive(pid: int, started: float | None = None) -> bool:
    """Whether process ``pid`` runs (another user's counts) and, given its start time
    ``started``, is still that process (not a later one that got its pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass
    except OSError:
        return False
    if started is None:
        return True
    now = _start_time(pid)
    return now is None or abs(now - started) <= 1.0


def _machine() -> tuple[str, str]:
    """Where pids mean what they say: this host, and this pid namespace (a container's own)."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = "-"
    return socket.gethostname() or "-", namespace


def remove_orphaned_sessions(directory: str | None = None) -> list[Path]:
    """Remove this user's session directories whose owner no longer runs (a pid that runs
    again belongs to another process when its start time differs); returns them. Those
    made on another host or in another pid namespace (a shared temporary directory) are
    left alone: their pids cannot be checked from here."""
    removed = []
    here = _machine()
    for path in Path(directory or tempfile.gettempdir()).glob(SESSION_PREFIX + "*"):
        try:
            if path.stat().st_uid != os.getuid():
                continue
            owner = path / OWNER_FILE
            if not owner.exists():  # still being made, or made before owner files
                if time.time() - path.stat().st_mtime > UNOWNED_MAX_AGE_S:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
                continue
            pid, started, *machine = owner.read_text().split()
            if tuple(machine) != here:
                continue
            if process_alive(int(pid), None if started == "None" else float(started)):
                continue  # its owner still runs
        except (OSError, ValueError):  # unreadable, or not an owner file of ours: left alone
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def close_session(path: Path) -> None:
    if os.environ.get(SESSION_ENV) == str(path):
        del os.environ[SESSION_ENV]
    shutil.rmtree(path, ignore_errors=True)


def session_dir() -> Path | None:
    raw = os.environ.get(SESSION_ENV)
    return Path(raw) if raw and os.path.isdir(raw) else None


def _owner() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER") or "main"


def _write(name: str, data: dict[str, Any]) -> None:
    directory = session_dir()
    if directory is None:
        return
    try:
        tmp = directory / f".{name}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, directory / name)
    except OSError:  # the session ended under us: nothing to record into
        pass


def record(role: str, slot: DeviceSlot, *, label: str, part: Sequence[DeviceSlot] = ()) -> None:
    """Record this process, as it sees itself now (call it right after pinning)."""
    pid = os.getpid()
    cap = slot.memory_limit_mb if slot.kind == "GPU" else None
    _write(
        f"start-{pid}-{time.time_ns()}.json",
        {
            "role": role,
            "owner": _owner(),
            "label": label,
            "pid": pid,
            "ppid": os.getppid(),
            "slot": slot.to_json(),
            "part": [s.name for s in part],
            "cores": sorted(os.sched_getaffinity(0)),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "memory_growth": frameworks.active().memory_growth(dict(os.environ)),
            "keras_backend": frameworks.backend_name()[0],
            "memory_limit_mb": cap,
            "start": time.time(),
            "end": None,
        },
    )


def record_network(pid: int, audit: dict[str, Any], why: str = "") -> None:
    """Record what process ``pid`` listens on now (``network.audit``), and why it may be
    reachable; merged into its record by :func:`read` (every reading kept)."""
    _write(f"net-{pid}-{time.time_ns()}.json", {"pid": pid, "at": time.time(), "why": why, **audit})


def release(pid: int | None) -> None:
    """Record that process ``pid`` (started by this one) has ended; no-op outside a session."""
    if pid is not None and session_dir() is not None:
        _write(f"end-{pid}-{time.time_ns()}.json", {"pid": pid, "end": time.time()})


def read(directory: Path | None = None) -> list[dict[str, Any]]:
    """Every record of the session in start order, each with its ``end`` (None: still alive)."""
    directory = directory or session_dir()
    if directory is None:
        return []
    starts: list[dict[str, Any]] = []
    ends: list[dict[str, Any]] = []
    nets: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        kind = path.name.split("-", 1)[0]
        if kind in ("start", "end", "net"):
            {"start": starts, "end": ends, "net": nets}[kind].append(data)
    starts.sort(key=lambda r: r["start"])
    for rec in starts:
        rec.update(listening=[], exposed=[], private=False, network_why="")
    for end in sorted(ends, key=lambda e: e["end"]):
        match = [r for r in starts if r["pid"] == end["pid"] and r["start"] <= end["end"] and r["end"] is None]
        if match:
            match[-1]["end"] = end["end"]
    for net in sorted(nets, key=lambda n: n["at"]):
        match = [r for r in starts if r["pid"] == net["pid"] and r["start"] <= net["at"]]
        if match:
            rec = match[-1]
            rec["listening"] += [x for x in net["listening"] if x not in rec["listening"]]
            rec["exposed"] += [x for x in net["exposed"] if x not in rec["exposed"]]
            rec["private"] = rec["private"] or net["private"]
            rec["network_why"] = rec["network_why"] or net["why"]
    return starts


def network_cell(rec: dict[str, Any]) -> str:
    """The placement table's network column: what the process listened on, and where."""
    if rec.get("exposed"):
        return "EXPOSED " + " ".join(rec["exposed"])
    if rec.get("private"):
        return "private ns" + (f" ({len(rec['listening'])} listening)" if rec.get("listening") else "")
    return "loopback" if rec.get("listening") else "-"


def exposures(records: Sequence[dict[str, Any]]) -> list[str]:
    """The processes that listened where the network reaches it, one phrase per reason."""
    by_why: dict[str, list[str]] = {}
    for r in records:
        if r.get("exposed"):
            by_why.setdefault(r.get("network_why", ""), []).append(f"{name_of(r)} (pid {r['pid']}) on {' '.join(r['exposed'])}")
    return [", ".join(who) + (f" [{why}]" if why else "") for why, who in by_why.items()]


def resources(rec: dict[str, Any]) -> set[str]:
    """What a recorded process occupied, from what it saw inside itself."""
    if "_resources" in rec:  # a probe for a window of the caller's own
        return set(rec["_resources"])
    if rec["slot"]["kind"] == "GPU":
        return {f"GPU {g}" for g in str(rec["cuda_visible_devices"]).split(",") if g}
    return {f"core {c}" for c in rec["cores"]}


def name_of(rec: dict[str, Any]) -> str:
    return rec["owner"] if rec["role"] == "pytest" else f"{rec['owner']}/{rec['label']}"


def _overlap(a: dict[str, Any], start: float, end: float | None) -> bool:
    a_end = a["end"] if a["end"] is not None else float("inf")
    return a["start"] <= (end if end is not None else float("inf")) and start <= a_end


#: Under slot leases: per owner (xdist worker), the windows in which it held slots, each as
#: (start, end, the resources of its slots). A process computes only inside its owner's.
Windows = dict[str, list[tuple[float, float, set[str]]]]


def _active(rec: dict[str, Any], windows: Windows | None, shared: set[str]) -> list[tuple[float, float]]:
    """When ``rec`` could compute on ``shared``: its lifetime, cut to its owner's leases of it."""
    start, end = rec["start"], rec["end"] if rec["end"] is not None else float("inf")
    if windows is None:
        return [(start, end)]
    return [(max(start, a), min(end, b)) for a, b, held in windows.get(rec["owner"], []) if held & shared and a < end and start < b]


def _compete(a: dict[str, Any], b: dict[str, Any], windows: Windows | None, start: float = 0.0, end: float = float("inf")) -> bool:
    shared = resources(a) & resources(b)
    if not shared:
        return False
    return any(max(s1, s2, start) < min(e1, e2, end)
               for s1, e1 in _active(a, windows, shared) for s2, e2 in _active(b, windows, shared))


def annotate(records: list[dict[str, Any]], windows: Windows | None = None) -> list[dict[str, Any]]:
    """Add ``shared_with`` (same owner) and ``competed_with`` (other owners) to each record:
    the processes alive at the same time on the same GPU or cores (under leases, ``windows``:
    at a time when both their owners held those resources)."""
    for rec in records:
        mine = resources(rec)
        rec["shared_with"], rec["competed_with"] = [], []
        for other in records:
            if other is rec or not mine & resources(other) or not _overlap(other, rec["start"], rec["end"]):
                continue
            if other["owner"] == rec["owner"]:
                rec["shared_with"].append(name_of(other))
            elif _compete(rec, other, windows):
                rec["competed_with"].append(name_of(other))
    return records


def competitors(records: Sequence[dict[str, Any]], owner: str, occupied: set[str], start: float, end: float,
                windows: Windows | None = None) -> list[str]:
    """Processes of other owners alive during [start, end] on any of ``occupied`` (under
    leases, ``windows``: while their owner held those resources)."""
    probe = {"owner": owner, "start": start, "end": end, "slot": {"kind": "CPU"}, "cores": [],
             "_resources": occupied}
    return sorted({
        name_of(r) for r in records
        if r["owner"] != owner and resources(r) & occupied and _overlap(r, start, end)
        and (windows is None or _compete(probe, r, windows, start, end))
    })


def _memory(rec: dict[str, Any]) -> str:
    if rec["slot"]["kind"] != "GPU":
        return "-"
    if rec["memory_limit_mb"]:
        return f"cap {rec['memory_limit_mb']} MB"
    return "growth" if rec["memory_growth"] else "WHOLE GPU"


def _slot_namer(session_slots: Sequence[DeviceSlot]) -> Callable[[dict[str, Any]], str]:
    """The session slot a process occupies, by name (a pool planned with ``plan_slots``
    numbers its own slots; one on part of a slot shows its own plan's index in brackets)."""
    by_resources: dict[frozenset[str], list[DeviceSlot]] = {}
    for s in session_slots:
        by_resources.setdefault(frozenset(resources_of([s])), []).append(s)

    def slot_name(r: dict[str, Any]) -> str:
        # Slots that share a GPU occupy the same resources: the one the process was told wins.
        same = by_resources.get(frozenset(resources(r)), [])
        told = [s for s in same if s.index == r["slot"]["index"]]
        return (told or same)[0].name if same else f"(slot{r['slot']['index']})"

    return slot_name


def table_lines(
    records: list[dict[str, Any]], origin: float | None = None, session_slots: Sequence[DeviceSlot] = (),
    windows: Windows | None = None,
) -> list[str]:
    """The placement table: one row per process, lifetimes in seconds from ``origin``."""
    if not records:
        return []
    slot_name = _slot_namer(session_slots)
    origin = min(r["start"] for r in records) if origin is None else origin
    header = ("process", "role", "backend", "slot", "cores/GPU", "pid", "lifetime", "GPU memory", "network", "shared")
    rows = [header]
    for r in annotate(records, windows):
        where = (
            f"GPU {r['cuda_visible_devices']}" if r["slot"]["kind"] == "GPU"
            else "cores {" + ", ".join(map(str, r["cores"])) + "}"
        )
        end = "end" if r["end"] is None else f"{r['end'] - origin:.1f} s"
        shared = "no"
        if r["competed_with"]:
            shared = "OTHER WORKER: " + ", ".join(r["competed_with"])
        elif r["shared_with"]:
            shared = "own: " + ", ".join(r["shared_with"])
        rows.append(
            (name_of(r), r["role"], r.get("keras_backend", "?"), slot_name(r),
             where, str(r["pid"]),
             f"{r['start'] - origin:.1f} s-{end}", _memory(r), network_cell(r), shared)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def slot_lines(
    records: list[dict[str, Any]], session_slots: Sequence[DeviceSlot] = (), windows: Windows | None = None,
) -> list[str]:
    """The placement at a glance: one line per slot (its processes by role, the most alive at
    once, and what only the full table would show: another worker on it, a process listening
    where the network reaches it, a GPU taken whole)."""
    slot_name = _slot_namer(session_slots)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in annotate(records, windows):
        groups.setdefault(slot_name(r), []).append(r)
    lines = []
    for name in sorted(groups, key=lambda n: (n.startswith("("), n)):
        group = groups[name]
        roles: dict[str, int] = {}
        for r in group:
            roles[r["role"]] = roles.get(r["role"], 0) + 1
        counts = ", ".join(f"{role} {n}" for role, n in sorted(roles.items(), key=lambda kv: (-kv[1], kv[0])))
        events = sorted([(r["start"], 1) for r in group] + [(r["end"], -1) for r in group if r["end"] is not None])
        alive = most = 0
        for _, step in events:
            alive += step
            most = max(most, alive)
        notes = []
        others = sorted({o for r in group for o in r["competed_with"]})
        if others:
            notes.append(f"OTHER WORKER: {len(others)} processes of other workers ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})")
        exposed = [r for r in group if r.get("exposed")]
        if exposed:
            notes.append(f"EXPOSED: {len(exposed)} listened beyond loopback")
        if any(_memory(r) == "WHOLE GPU" for r in group):
            notes.append("WHOLE GPU taken by a process")
        where = group[0]
        place = f"GPU {where['cuda_visible_devices']}" if where["slot"]["kind"] == "GPU" else "cores {" + ", ".join(map(str, where["cores"])) + "}"
        lines.append(f"{name} ({place}): {len(group)} process{'es' if len(group) > 1 else ''} ({counts}), at most {most} at once; "
                     + ("; ".join(notes) if notes else "no other worker's process on it"))
    return lines


def to_json(records: list[dict[str, Any]], windows: Windows | None = None) -> list[dict[str, Any]]:
    """The report's ``placement`` section."""
    return [
        {k: r[k] for k in ("role", "owner", "label", "pid", "slot", "part", "cores", "cuda_visible_devices",
                           "memory_growth", "memory_limit_mb", "start", "end", "shared_with", "competed_with")}
        | {"keras_backend": r.get("keras_backend")}
        | {k: r.get(k) for k in ("listening", "exposed", "private", "network_why")}
        for r in annotate(records, windows)
    ]
