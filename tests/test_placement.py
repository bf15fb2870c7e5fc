"""One authority for placement (issue 10): slots partitioned among xdist workers, pools and
servers on their owner's part, memory growth or a cap on every GPU process, and a placement
table that lists every process, read from inside each of them."""

from __future__ import annotations

import json
import os
import re

import pytest

from pytest_kerasmp.slots import placement
from pytest_kerasmp.slots.devices import DeviceSlot
from cpu_slots import TWO_CORES

CPU = [DeviceSlot(index=i, kind="CPU", cores=(i,)) for i in range(4)]

#: A test module whose tests start a session pool, a factory pool and (optionally) a server,
#: and write, from inside every process, what that process is placed on.
PLACED = """
import json, os, pathlib
import pytest
from pytest_kerasmp import current_slot, plan_slots, WorkerPool

import probe_tasks

OUT = pathlib.Path(os.environ["PROBE_DIR"])
ME = os.environ.get("PYTEST_XDIST_WORKER", "main")

def test_session_pool(kerasmp_pool, kerasmp_slots):
    for rec in kerasmp_pool.broadcast(probe_tasks.where):
        (OUT / f"{ME}-session-{rec['pid']}.json").write_text(json.dumps(rec))
    (OUT / f"{ME}-self.json").write_text(json.dumps(probe_tasks.where() | {"own": [s.name for s in kerasmp_slots]}))

def test_factory_pool(kerasmp_pool_factory):
    pool = kerasmp_pool_factory(warm_import=False)
    for rec in pool.broadcast(probe_tasks.where):
        (OUT / f"{ME}-factory-{rec['pid']}.json").write_text(json.dumps(rec))

def test_plan_slots_inside(recwarn):
    slots = plan_slots(2)
    with WorkerPool(slots, warm_import=False, name="planned") as pool:
        for rec in pool.broadcast(probe_tasks.where):
            (OUT / f"{ME}-planned-{rec['pid']}.json").write_text(json.dumps(rec))
    (OUT / f"{ME}-plan.json").write_text(json.dumps({"warnings": [str(w.message) for w in recwarn]}))
"""

SERVED = """
import json, os, pathlib
import numpy
from pytest_kerasmp import ModelRef
OUT = pathlib.Path(os.environ["PROBE_DIR"])
ME = os.environ.get("PYTEST_XDIST_WORKER", "main")

def test_server(kerasmp_inference_server):
    server = kerasmp_inference_server(ModelRef.from_builder("probe_tasks:tiny"))
    assert server.predict(numpy.ones(2, "float32")).shape == (1,)
    (OUT / f"{ME}-server-{server.pid}.json").write_text(json.dumps({"pid": server.pid, "slot": server.slot.name}))
"""

TASKS = """
import os

def where():
    return {
        "pid": os.getpid(),
        "owner": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "cores": sorted(os.sched_getaffinity(0)),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "growth": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH"),
    }

def tiny():
    import keras
    inputs = keras.Input((2,))
    return keras.Model(inputs, keras.layers.Dense(1)(inputs))
"""


@pytest.fixture
def placed(pytester, monkeypatch):
    """Writes the test modules; returns (run, records) where records() reads what every
    process wrote about itself, and the report's placement section."""
    pytester.makepyfile(probe_tasks=TASKS, test_placed=PLACED)
    out = pytester.mkdir("probe-out")
    monkeypatch.setenv("PROBE_DIR", str(out))
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))

    def run(*args):
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", f"--kerasmp-report={pytester.path / 'report'}", *args, timeout=180
        )
        procs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
        report = pytester.path / "report" / "kerasmp-report.json"
        table = json.loads(report.read_text())["placement"] if report.exists() else []
        return result, procs, table

    return run


def _check_no_cross_worker_sharing(table):
    for rec in table:
        assert not rec["competed_with"], f"{rec['owner']}/{rec['label']} shared with {rec['competed_with']}"
        if rec["slot"]["kind"] == "GPU":  # never TensorFlow's whole-GPU default
            assert rec["memory_growth"] or rec["memory_limit_mb"], rec


def _owned_resources(table):
    by_owner: dict[str, set[str]] = {}
    for rec in table:
        by_owner.setdefault(rec["owner"], set()).update(placement.resources(rec))
    return by_owner


# ------------------------------------------------------------------------------- unit


def test_partition_is_disjoint_up_to_one_worker_per_slot_then_wraps():
    assert placement.partition(CPU, 2) == [tuple(CPU[:2]), tuple(CPU[2:])]
    assert placement.partition(CPU[:3], 2) == [tuple(CPU[:2]), (CPU[2],)]
    assert placement.partition(CPU[:2], 3) == [(CPU[0],), (CPU[1],), (CPU[0],)]
    assert placement.part_of(CPU, None, 0) == tuple(CPU)
    assert placement.part_of(CPU, "gw5", 2) == tuple(CPU[2:])  # a restarted worker: K mod W
    assert placement.oversubscription(CPU[:2], 2) is None
    text = placement.oversubscription(CPU[:2], 3)
    assert text == placement.OVERSUBSCRIBED.format(
        workers="3 xdist workers", slots="2 slots", pairs="gw0 and gw2 share slot0", n_slots=2, n_workers=3
    )


def test_competitors_are_other_owners_alive_on_the_same_resources():
    def rec(owner, cores, start, end):
        return {"owner": owner, "role": "pool worker", "label": "p w0", "start": start, "end": end,
                "slot": {"kind": "CPU", "index": 0}, "cores": cores, "cuda_visible_devices": "-1"}

    records = [rec("gw0", [0], 0, None), rec("gw1", [1], 0, None), rec("gw2", [0], 5, 8), rec("gw2", [0], 20, None)]
    assert placement.competitors(records, "gw0", {"core 0"}, 1, 4) == []
    assert placement.competitors(records, "gw0", {"core 0"}, 6, 7) == ["gw2/p w0"]
    assert placement.competitors(records, "gw1", {"core 1"}, 0, 100) == []
    annotated = placement.annotate(records)
    assert annotated[0]["competed_with"] == ["gw2/p w0", "gw2/p w0"] and annotated[1]["competed_with"] == []


def test_the_placement_at_a_glance_is_one_line_per_slot_naming_what_needs_a_look():
    def rec(owner, role, cores, start, end, **extra):
        return {"owner": owner, "role": role, "label": f"{role} {start}", "start": start, "end": end, "pid": 100 + start,
                "slot": {"kind": "CPU", "index": cores[0]}, "cores": cores, "cuda_visible_devices": "-1", **extra}

    records = [rec("gw0", "pytest", [0], 0, None)]
    records += [rec("gw0", "pool worker", [0], t, t + 1) for t in range(1, 30)]  # 29, one at a time
    records += [rec("gw1", "pytest", [1], 0, None), rec("gw1", "server", [1], 3, 9, exposed=["[::]:1234"])]
    records += [rec("gw1", "pool worker", [0], 40, 41)]  # on gw0's slot: another worker's process
    lines = placement.slot_lines(records, session_slots=CPU[:2])
    assert len(lines) == 2
    assert lines[0].startswith("slot0 (cores {0}): 31 processes (pool worker 30, pytest 1), at most 2 at once; OTHER WORKER: ")
    assert "gw1/pool worker 40" in lines[0]
    assert lines[1] == "slot1 (cores {1}): 2 processes (pytest 1, server 1), at most 2 at once; EXPOSED: 1 listened beyond loopback"
    quiet = placement.slot_lines(records[:3], session_slots=CPU[:2])
    assert quiet == ["slot0 (cores {0}): 3 processes (pool worker 2, pytest 1), at most 2 at once; no other worker's process on it"]


# -------------------------------------------------------------------------- sessions


@pytest.mark.skipif(not TWO_CORES, reason="needs 2 usable cores")
def test_xdist_workers_pools_and_servers_stay_on_their_own_part(placed, pytester):
    pytester.makepyfile(test_served=SERVED)
    # The session-long split (--kerasmp-leases=off): each worker's part for the whole session
    # (tests/test_leases.py covers the per-test leases).
    result, procs, table = placed("-n", "2", "--dist", "each", "--kerasmp-gpus=2", "--kerasmp-leases=off")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["kerasmp: --kerasmp-gpus=2 *; xdist workers gw0->slot0, gw1->slot1"])
    # From inside every process: gwK and everything it started sit on slot K's core.
    for name, rec in procs.items():
        owner = name.split("-")[0]
        if "cores" in rec:
            assert rec["cores"] == [sorted(os.sched_getaffinity(0))[int(owner[2:])]], (name, rec)
        if name.endswith("-self"):
            assert rec["own"] == [f"slot{owner[2:]}"]
    for name in ("gw0-plan", "gw1-plan"):  # plan_slots(2) inside a worker owning one core says so
        assert any("xdist worker gw" in w and "part of the session" in w for w in procs[name]["warnings"])
    _check_no_cross_worker_sharing(table)
    owned = _owned_resources(table)
    assert not owned["gw0"] & owned["gw1"], owned
    # The placement table lists every process the plugin started, by pid.
    started = {rec["pid"] for name, rec in procs.items() if "pid" in rec and not name.endswith("-self")}
    listed = {r["pid"]: r for r in table}
    assert started <= set(listed), started - set(listed)
    assert {r["role"] for r in table} == {"pytest", "pool worker", "server"}
    assert sum(r["role"] == "pytest" for r in table) == 2
    assert all(r["end"] for r in table if r["role"] != "pytest"), "every pool and server ended"
    for pid in started:
        assert re.search(rf"\b{pid}\b", result.stdout.str()), f"pid {pid} not in the printed table"
    result.stdout.fnmatch_lines(["*kerasmp: placement of the * processes pinned in this session*"])
    # Each row names the session slot its process sits on, also for a pool planned in a worker.
    rows = [line.split() for line in result.stdout.lines if re.match(r"gw\d/planned w\d ", line)]
    assert len(rows) == 4 and all(r[5] == f"slot{r[0][2]}" for r in rows), rows  # process, role (2 words), backend, slot


@pytest.mark.parametrize("memory", [None, "1024"], ids=["growth", "cap"])
def test_faked_gpus_one_per_worker_with_growth_or_cap(placed, monkeypatch, memory):
    monkeypatch.setenv("PYTEST_KERASMP_FAKE_GPUS", "2")
    args = ["-n", "2", "--dist", "each", "--kerasmp-gpus=2", "-k", "factory or plan_slots"]
    if memory:
        args.append(f"--kerasmp-gpu-memory={memory}")
    result, procs, table = placed(*args)
    result.assert_outcomes(passed=4)
    _check_no_cross_worker_sharing(table)
    for name, rec in procs.items():
        if "cuda" in rec:
            assert rec["cuda"] == name.split("-")[0][2:], (name, rec)  # gwK's processes on GPU K
            assert rec["growth"] == (None if memory else "true"), rec
    assert {r["memory_limit_mb"] for r in table} == {int(memory) if memory else None}
    header = "1024 MB cap per process, no memory growth" if memory else "memory growth on in every process"
    result.stdout.fnmatch_lines([f"kerasmp: --kerasmp-gpus=2 * -> 2 GPU slots on 2 GPUs ({header}): *"])


def test_more_workers_than_slots_is_said_and_comparisons_are_marked(pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_KERASMP_FAKE_GPUS", "4")
    pytester.makepyfile(
        test_cmp="""
        import time
        def test_cmp(kerasmp_speedup, kerasmp_slots):
            time.sleep(0.5)  # every worker alive and pinned before measuring
            kerasmp_speedup(lambda: time.sleep(0.01), lambda: time.sleep(0.005), workers=1, rounds=2)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "3", "--dist", "each", "--kerasmp-gpus=2",
                                           "--kerasmp-leases=off", timeout=120)
    result.assert_outcomes(passed=3)
    crowded = placement.oversubscription(CPU[:2], 3)
    result.stdout.fnmatch_lines([f"*xdist workers gw0->slot0, gw1->slot1, gw2->slot0; OVERSUBSCRIBED: {crowded}"])
    result.stdout.fnmatch_lines([placement.COMPETED_NOTE, "*OTHER WORKER: gw*", f"kerasmp: OVERSUBSCRIBED: {crowded}"])
    rows = [line for line in result.stdout.lines if line.startswith("cmp ")]
    assert len(rows) == 3 and sum(("]*" in r or "x*" in r) for r in rows) == 2, rows  # gw0 and gw2 competed, gw1 not


def test_more_slots_than_gpus_is_said_in_header_and_summary(placed, monkeypatch):
    monkeypatch.setenv("PYTEST_KERASMP_FAKE_GPUS", "1")
    result, procs, table = placed("-n", "2", "--dist", "each", "--kerasmp-gpus=2", "-k", "factory")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*-> 2 GPU slots on 1 GPU (slot0 and slot1 share GPU 0; memory growth on in every process)*"])
    assert all(r["growth"] == "true" and r["cuda"] == "0" for r in procs.values())
    assert all(r["competed_with"] for r in table if r["role"] == "pytest")
    # Who overlapped whom depends on timing; both workers always do (and each on its own slot).
    result.stdout.fnmatch_lines(["kerasmp: processes of different xdist workers shared a GPU or cores (gw0, *gw1*"])
    assert {r["owner"]: r["slot"]["index"] for r in table if r["role"] == "pytest"} == {"gw0": 0, "gw1": 1}
    for worker, slot in (("gw0", "slot0"), ("gw1", "slot1")):  # the table names the slot it was told
        result.stdout.re_match_lines([rf"{worker} +pytest +\S+ +{slot} "])


@pytest.mark.skipif(not TWO_CORES, reason="needs 2 usable cores")
def test_without_xdist_plan_slots_uses_the_session_not_this_process(placed):
    result, procs, table = placed("--kerasmp-gpus=2", "-k", "plan_slots", "--kerasmp-leases=off")
    result.assert_outcomes(passed=1)
    planned = [r for n, r in procs.items() if "-planned-" in n]
    assert sorted(tuple(r["cores"]) for r in planned) == [(c,) for c in sorted(os.sched_getaffinity(0))[:2]]
    assert procs["main-plan"]["warnings"] == []
    assert [r["role"] for r in table] == ["pytest", "pool worker", "pool worker"]


def test_without_xdist_plan_slots_spreads_over_the_sessions_gpus(placed, monkeypatch):
    monkeypatch.setenv("PYTEST_KERASMP_FAKE_GPUS", "4")
    result, procs, table = placed("--kerasmp-gpus=4", "-k", "plan_slots or factory", "--kerasmp-leases=off")
    result.assert_outcomes(passed=2)
    planned = sorted(r["cuda"] for n, r in procs.items() if "-planned-" in n)
    assert planned == ["0", "1"]  # not both on this process's GPU 0
    assert sorted(r["cuda"] for n, r in procs.items() if "-factory-" in n) == ["0", "1", "2", "3"]
    assert all(r["growth"] == "true" for r in procs.values() if "growth" in r)
    _check_no_cross_worker_sharing(table)


def test_a_killed_sessions_registry_is_removed_by_the_next_session_and_a_live_ones_kept(pytester, monkeypatch, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    pytester.makepyfile(test_long="import time\n\ndef test_long():\n    time.sleep(120)\n", test_quick="def test_quick():\n    pass\n")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--kerasmp-gpus=1"]
    proc = subprocess.Popen([*cmd, "test_long.py"], cwd=pytester.path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp.glob(f"{placement.SESSION_PREFIX}*/{placement.OWNER_FILE}")):  # written whole
            assert time.monotonic() < deadline and proc.poll() is None, "the session did not make its registry"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)  # as the OOM killer does: nothing of ours runs after it
        proc.wait()
    (orphan,) = tmp.glob(f"{placement.SESSION_PREFIX}*")
    live = tmp / f"{placement.SESSION_PREFIX}live"  # another session, still running (this one)
    live.mkdir()
    (live / placement.OWNER_FILE).write_text(f"{os.getpid()} {placement._start_time(os.getpid())} {' '.join(placement._machine())}")
    elsewhere = tmp / f"{placement.SESSION_PREFIX}elsewhere"  # a dead pid, but another host's
    elsewhere.mkdir()
    (elsewhere / placement.OWNER_FILE).write_text(f"{proc.pid} 1.0 another-host 1")
    garbled = tmp / f"{placement.SESSION_PREFIX}garbled"
    garbled.mkdir()
    (garbled / placement.OWNER_FILE).write_text("not-a-pid x")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--kerasmp-gpus=1", "test_quick.py")
    result.assert_outcomes(passed=1)
    assert not orphan.exists(), "the killed session's registry was left in the temporary directory"
    assert live.exists(), "a running session's registry was removed"
    left = sorted(p.name for p in tmp.glob(f"{placement.SESSION_PREFIX}*"))
    assert left == sorted([live.name, elsewhere.name, garbled.name])  # and the new session's own is gone too
