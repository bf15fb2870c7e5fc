"""Slots leased per test: one command line runs one-slot and multi-slot tests together.

The suites run in real pytest processes (pytester, with and without xdist) and record, from
inside each test body, the slots they were given and when they ran; pools and clusters are
real processes. The table's own rules (first come first served, a dead holder, the bound)
are tested on the table itself, with real live and dead processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pytest_kerasmp.errors import LEASE_TIMED_OUT, LeaseTimeoutError
from pytest_kerasmp.plugin import config as cfg
from pytest_kerasmp.plugin import leasing
from pytest_kerasmp.slots import leases

SUITE = """
import json, os, time, pathlib
import pytest
import pytest_kerasmp

LOG = pathlib.Path({log!r})

def record(name, slots, **extra):
    t0 = time.time()
    time.sleep(0.3)
    with open(LOG, "a") as f:
        f.write(json.dumps({{"test": name, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                            "slots": [s.name for s in slots], "start": t0, "end": time.time(), **extra}}) + "\\n")

@pytest.mark.parametrize("i", range(8))
def test_one(kerasmp_slots, kerasmp_device, i):
    assert kerasmp_slots == (kerasmp_device,)   # the README's quick start, with or without -n
    record(f"one{{i}}", kerasmp_slots)

@pytest.mark.kerasmp_slots(2)
def test_pool_on_two(kerasmp_slots, kerasmp_pool_factory):
    pool = kerasmp_pool_factory(warm_import=False)
    assert len(pool.pids()) == 2
    record("pool", kerasmp_slots, pool_slots=sorted(s.name for s in pool.slots))

@pytest.mark.kerasmp_slots(2)
def test_cluster_on_two(kerasmp_slots, kerasmp_tf_cluster):
    cluster = kerasmp_tf_cluster(2)
    record("cluster", kerasmp_slots, pool_slots=sorted(s.name for s in cluster.slots))

@pytest.mark.kerasmp_slots("all")
def test_all(kerasmp_slots):
    record("all", kerasmp_slots)

@pytest.mark.kerasmp_slots(3)
def test_three(kerasmp_slots):
    pass
"""


def _overlaps(rows: list[dict]) -> list[tuple[str, str]]:
    return [(a["test"], b["test"]) for i, a in enumerate(rows) for b in rows[i + 1:]
            if set(a["slots"]) & set(b["slots"]) and a["start"] < b["end"] and b["start"] < a["end"]]


@pytest.mark.parametrize("workers", [[], ["-n", "2"], ["-n", "4"]], ids=["no-n", "n2", "n4"])
def test_a_mixed_suite_never_runs_two_tests_on_one_slot_at_once(pytester, run_pytest, tmp_path, workers):
    log = tmp_path / "log.jsonl"
    pytester.makepyfile(test_mixed=SUITE.format(log=str(log)))
    report = tmp_path / "report"
    result = run_pytest("--kerasmp-gpus=2", f"--kerasmp-report={report}", "-rs", *workers)
    result.assert_outcomes(passed=11, skipped=1)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 11
    assert _overlaps(rows) == []
    by_test = {r["test"]: r for r in rows}
    assert all(len(r["slots"]) == 1 for name, r in by_test.items() if name.startswith("one"))
    for name in ("pool", "cluster", "all"):
        assert sorted(by_test[name]["slots"]) == ["slot0", "slot1"], by_test[name]
    # The processes the marked tests started ran on the slots leased to them.
    assert by_test["pool"]["pool_slots"] == by_test["cluster"]["pool_slots"] == ["slot0", "slot1"]
    result.stdout.fnmatch_lines([
        "kerasmp: slots leased per test*",
        "kerasmp: 11 leases on 2 slots over * s: slot use *%*longest wait*",
        "SKIPPED*test_mixed.py:*: needs 3 slots (kerasmp_slots marker) but the session has 2 slots*",
    ])
    record = json.loads((report / "kerasmp-report.json").read_text())
    assert len(record["leases"]) == 11  # the skipped test leased nothing
    assert 0 < record["lease_summary"]["slot_use"] <= 1
    assert record["leases_plot"] == "kerasmp-leases.png" and (report / "kerasmp-leases.png").stat().st_size > 0
    assert "### slot leases" in (report / "kerasmp-report.md").read_text()
    # The processes of different workers never competed: each computed only under its lease.
    assert all(p["competed_with"] == [] for p in record["placement"]), [
        (p["owner"], p["label"], p["competed_with"]) for p in record["placement"] if p["competed_with"]]


def test_the_table_serves_first_come_first_served_and_lets_others_pass():
    me = os.getpid()

    def entry(name, want, extra=0):
        return {"id": name, "pid": me, "owner": name, "test": name, "want": want, "extra": extra, "since": 0.0}

    # slot0 is held; a 2-slot test waits for it; a 1-slot test on slot1 queued after it must
    # not take slot1 (the 2-slot test would be starved by a stream of them).
    state = {"holders": [{**entry("h", [0]), "slots": [0], "granted": 0.0}], "queue": [entry("two", [0], 1), entry("one", [1])]}
    leases._grant(state, 2, 1.0)
    assert [w["id"] for w in state["queue"]] == ["two", "one"]
    # A later request that needs only slots nobody earlier waits for goes ahead.
    state = {"holders": [{**entry("h", [0]), "slots": [0], "granted": 0.0}], "queue": [entry("a", [0]), entry("b", [1])]}
    leases._grant(state, 2, 1.0)
    assert [h["id"] for h in state["holders"]] == ["h", "b"] and [w["id"] for w in state["queue"]] == ["a"]
    # When slot0 frees, the 2-slot test gets both at once, before the 1-slot test.
    state = {"holders": [], "queue": [entry("two", [0], 1), entry("one", [1])]}
    leases._grant(state, 2, 1.0)
    assert [(h["id"], h["slots"]) for h in state["holders"]] == [("two", [0, 1])]


def test_a_holder_whose_process_is_gone_holds_nothing(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    table = {"holders": [{"id": "x", "pid": pid, "owner": "gw1", "test": "t.py::died", "want": [0], "extra": 1,
                          "since": 0.0, "slots": [0, 1], "granted": 0.0}], "queue": []}
    (tmp_path / leases.TABLE).write_text(json.dumps(table))
    t0 = time.monotonic()
    lease = leases.acquire(tmp_path, 2, want=[0], extra=1, owner="gw0", test="t.py::next", timeout=10, names=["slot0", "slot1"])
    assert lease.slots == (0, 1) and time.monotonic() - t0 < 5
    leases.release(tmp_path, lease, ["slot0", "slot1"])
    assert leases.read(tmp_path)["holders"] == []
    assert [r["test"] for r in leases.history(tmp_path)] == ["t.py::next"]


def test_a_wait_past_its_bound_fails_naming_who_holds_what(tmp_path):
    names = ["slot0", "slot1"]
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:  # another live worker
        granted = time.time()
        table = {"holders": [{"id": "x", "pid": other.pid, "owner": "gw1", "test": "t.py::long", "want": [1], "extra": 0,
                              "since": granted, "slots": [1], "granted": granted}], "queue": []}
        (tmp_path / leases.TABLE).write_text(json.dumps(table))
        t0 = time.monotonic()
        try:
            with pytest.raises(LeaseTimeoutError) as info:
                leases.acquire(tmp_path, 2, want=[0], extra=1, owner="gw0", test="t.py::wide", timeout=0.5, names=names)
        finally:
            other.kill()
    assert time.monotonic() - t0 < 5
    held_for = round(time.time() - granted)
    assert str(info.value) in [LEASE_TIMED_OUT.format(
        owner="gw0", test="t.py::wide", wanted="slot0 and 1 more", timeout=0.5, held=f"slot1 by gw1 (t.py::long) for {s} s")
        for s in (held_for - 1, held_for)]
    assert leases.read(tmp_path)["queue"] == []  # the waiter that gave up wants nothing


@pytest.mark.parametrize("fault", ["os._exit(1)", "time.sleep(60)"], ids=["dies", "times-out"])
def test_a_holder_that_dies_or_times_out_frees_its_slots(pytester, run_pytest, fault):
    pytester.makepyfile(test_fault=f"""
        import os, time
        import pytest

        @pytest.mark.kerasmp_slots(2)
        @pytest.mark.timeout(3)
        def test_fault_holding_both(kerasmp_slots):
            {fault}

        @pytest.mark.kerasmp_slots(2)
        def test_then_both_again(kerasmp_slots):
            assert len(kerasmp_slots) == 2
    """)
    t0 = time.monotonic()
    # pytest-timeout's signal method ends the sleeping test: its teardown ends the lease.
    result = run_pytest("-n", "2", "--kerasmp-gpus=2", "--kerasmp-lease-timeout=60", "--timeout=60")
    result.assert_outcomes(passed=1, failed=1)
    assert time.monotonic() - t0 < 60, "the second test waited out its bound: the lease was not freed"


def test_the_wait_notice_and_the_options(pytester, run_pytest):
    pytester.makepyfile("def test_x(kerasmp_slots):\n    assert len(kerasmp_slots) == 1\n")
    bad = run_pytest("--kerasmp-gpus=2", f"{cfg.LEASE_TIMEOUT_OPTION}=soon")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines([f"*{cfg.LEASE_TIMEOUT_OPTION}='soon' (from the command line) is invalid: {cfg.LEASE_TIMEOUT_VALID}*"])
    bad = run_pytest("--kerasmp-gpus=2", f"{cfg.LEASES_OPTION}=sometimes")
    bad.stderr.fnmatch_lines([f"*{cfg.LEASES_OPTION}='sometimes' (from the command line) is invalid: {cfg.LEASES_VALID}*"])
    off = run_pytest("--kerasmp-gpus=2", f"{cfg.LEASES_OPTION}=off")
    assert off.ret == 1  # off: the process owns both slots for the session, as before leases
    state = {"queue": [{"id": "w", "owner": "gw0", "test": "t.py::x", "want": [1], "extra": 0, "since": time.time() - 12}],
             "holders": [{"owner": "gw1", "test": "t.py::y", "slots": [1], "granted": time.time() - 30}]}
    [(_, line)] = leases.waits(state, ["slot0", "slot1"], leases.NOTICE_S)
    assert line.startswith("gw0 waits for slot1 (t.py::x, 12 s so far): held: slot1 by gw1 (t.py::y) for 30 s")


def test_n_auto_starts_one_worker_per_slot(pytester, run_pytest, monkeypatch):
    monkeypatch.setenv("PYTEST_KERASMP_FAKE_GPUS", "3")
    pytester.makepyfile("def test_x(kerasmp_slots):\n    assert len(kerasmp_slots) == 1\n")
    result = run_pytest("-n", "auto", "--kerasmp-gpus=3")
    result.stdout.fnmatch_lines(["kerasmp: -n auto -> 3 xdist workers, one per slot (--kerasmp-gpus=3)*", "*created: 3/3 workers*"])
    assert result.ret == 0


def test_marker_arguments_are_checked(pytester, run_pytest):
    pytester.makepyfile("""
        import pytest
        @pytest.mark.kerasmp_slots(0)
        def test_zero(kerasmp_slots):
            pass
    """)
    result = run_pytest("--kerasmp-gpus=2")
    result.stdout.fnmatch_lines(["*" + leasing.MARKER_BAD.format(args=(0,)) + "*"])
    result.assert_outcomes(errors=1)


def test_too_many_slots_fail_under_require_gpu(pytester, run_pytest, monkeypatch):
    monkeypatch.setenv("PYTEST_KERASMP_FAKE_GPUS", "2")
    pytester.makepyfile("""
        import pytest
        @pytest.mark.kerasmp_slots(3)
        def test_three(kerasmp_slots):
            pass
    """)
    result = run_pytest("--kerasmp-gpus=2", "--kerasmp-require-gpu")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*" + leasing.TOO_MANY_REQUIRED.format(
        wanted="3 slots", have="2 slots", source="the command line", n=3) + "*"])


def test_a_pool_of_a_broader_scope_keeps_its_slots_leased(pytester, run_pytest):
    pytester.makepyfile("""
        import pytest
        from pytest_kerasmp import WorkerPool

        @pytest.fixture(scope="module")
        def wide(kerasmp_worker_slots):
            with WorkerPool(kerasmp_worker_slots, warm_import=False, name="wide") as pool:
                yield pool

        def test_before(kerasmp_slots):
            assert len(kerasmp_slots) == 1

        @pytest.mark.kerasmp_slots(2)
        def test_opens_it(wide, kerasmp_slots):
            assert len(wide.slots) == 2

        def test_while_it_is_open(wide, kerasmp_slots):
            assert len(kerasmp_slots) == 2   # its slots are this test's too: nobody else computes there
    """)
    run_pytest("--kerasmp-gpus=2").assert_outcomes(passed=3)


def test_a_long_wait_shows_on_the_terminal_as_it_happens(pytester, run_pytest):
    pytester.makeconftest("""
        import time
        import pytest

        @pytest.hookimpl(tryfirst=True)
        def pytest_runtest_setup(item):
            if item.name == "test_one":  # asks after test_both holds both slots
                time.sleep(2)
    """)
    pytester.makepyfile("""
        import time
        import pytest

        @pytest.mark.kerasmp_slots(2)
        def test_both(kerasmp_slots):
            time.sleep(9)

        def test_one(kerasmp_slots):
            pass
    """)
    result = run_pytest("-n", "2", "--kerasmp-gpus=2")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["kerasmp: gw? waits for slot? (test_a_long_wait_shows_on_the_terminal_as_it_happens.py::test_one, "
                                 "* s so far): held: slot? by gw? (*::test_both) for * s"])
