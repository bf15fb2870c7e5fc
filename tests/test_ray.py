"""The Ray backend on a loopback-only local cluster of 2 nodes: planning, the pool, its faults.

One cluster (the session's ``ray_cluster`` fixture) serves every test here; each test bounds
its own waits, so a broken promise fails in seconds.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("ray")

import pool_tasks  # noqa: E402

from pytest_kerasmp import (  # noqa: E402
    RayBackend,
    DeviceSlot,
    KerasMPError,
    ModelRef,
    PoolBrokenError,
    WorkerCrashedError,
    WorkerPool,
    WorkerStartupError,
    shared_empty,
)
from pytest_kerasmp.errors import SLOT_NODE_GONE  # noqa: E402
from pytest_kerasmp.ray.cluster import (  # noqa: E402
    alive_nodes,
    listening_addresses,
    plan_ray_slots,
    reported_addresses,
)


def ray_pool(slots, **options) -> WorkerPool:
    options.setdefault("warm_import", False)
    options.setdefault("backend", "ray")
    return WorkerPool(list(slots), **options)


@pytest.fixture
def slots(ray_cluster):
    return plan_ray_slots()


# ------------------------------------------------------------------------ the cluster


def test_every_address_ray_reports_is_loopback(ray_cluster):
    reported = reported_addresses()
    assert len([k for k in reported if k.endswith("NodeManagerAddress")]) == 2
    assert {k: v for k, v in reported.items() if v != "127.0.0.1"} == {}
    for node in alive_nodes():
        for key in ("ObjectStoreSocketName", "RayletSocketName"):  # Unix sockets, not TCP
            assert node[key].startswith("/"), (key, node[key])
    listening = listening_addresses(ray_cluster.processes())
    assert listening, "the cluster's processes listen on no TCP port?"
    assert {k: v for k, v in listening.items() if v not in ("127.0.0.1",)} == {}


def test_slots_are_planned_from_the_nodes(slots, ray_cluster):
    assert [s.node for s in slots] == [n["NodeID"] for n in alive_nodes()]
    assert sorted(s.node for s in slots) == sorted(ray_cluster.node_ids())
    assert all(s.kind == "CPU" and s.cores == (0,) for s in slots)
    assert [s.index for s in slots] == [0, 1]
    assert "on node " + slots[1].node[:8] in slots[1].describe()
    with pytest.raises(KerasMPError, match=r"no node with 5 free CPU\(s\) or a GPU.*node .* at 127.0.0.1: 1 CPU, 0 GPU"):
        plan_ray_slots(cpus_per_slot=5)


# ------------------------------------------------------------------------------- pool


def test_the_pool_runs_pinned_warm_workers_one_per_node(slots, no_leftovers):
    with ray_pool(slots, warm_import=True, name="ray-basic") as pool:
        assert pool.backend.name == "ray" and pool.start_method == "ray" and isinstance(pool, WorkerPool)
        who = pool.broadcast(pool_tasks.whoami, timeout=60)
        assert [w["pid"] for w in who] == pool.pids() and len(set(pool.pids())) == 2
        assert all(w["tf_was_imported"] and w["intra"] == 1 for w in who)
        if len(os.sched_getaffinity(0)) >= 2:  # each node has its own core here
            assert who[0]["cores"] != who[1]["cores"]
        assert [s["node"] for s in pool.broadcast(pool_tasks.slot_env)] == [s.node for s in slots]
        assert pool.map(pool_tasks.add, range(6), range(6), timeout=30) == [0, 2, 4, 6, 8, 10]
        mine = os.getpriority(os.PRIO_PROCESS, 0)  # not Ray's worker niceness (15): the owner's
        assert pool.broadcast(pool_tasks.niceness, timeout=30) == [[mine], [mine]]
        x = np.arange(19 * 2**20 // 8, dtype=np.float64)
        future = pool.submit(pool_tasks.scale, x, 2.0)
        expected = x * 2
        x[:] = -1  # the caller may change its array once submit returned
        assert np.array_equal(future.result(timeout=30), expected)
        assert pool.submit(pool_tasks.writeable, x).result(timeout=30) is False  # mapped from the object store
        with pytest.raises(ValueError, match="on purpose") as info:
            pool.submit(pool_tasks.raise_value_error, "on purpose").result(timeout=30)
        assert "raise_value_error" in str(info.value.__cause__)


def test_models_load_once_per_actor(slots, no_leftovers):
    ref = ModelRef.from_builder("pool_tasks:build_custom", units=2)
    x = np.ones((2, 4), np.float32)
    with ray_pool(slots[:1], name="ray-model") as pool:
        first = pool.submit(pool_tasks.predict_sum, ref, x).result(timeout=60)
        second = pool.submit(pool_tasks.predict_sum, ref, x).result(timeout=30)
    assert first[0] == second[0] == 2 * 2 * 4 * 2.0
    assert second[2] == first[2] and second[3] == 1  # the same model object, one cached


def test_an_actor_takes_back_the_owners_niceness_from_rays(tmp_path):
    """Ray starts its workers at niceness 15 unless the cluster says otherwise; an actor sets
    every thread back to its owner's (here 0) where it may, and leaves it where it may not."""
    code = (
        "import os, threading\n"
        "os.nice(7)  # as Ray's worker_niceness would\n"
        "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
        "from pytest_kerasmp.ray.actor import owner_niceness\n"
        "owner_niceness()\n"
        "print(sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir('/proc/self/task')}))\n"
    )
    import resource

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTEST_KERASMP_NICE": "0"})
    may_raise = os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("[0]" if may_raise else "[7]")


def test_task_functions_are_checked_before_they_travel(slots, no_leftovers):
    with ray_pool(slots[:1], name="ray-check") as pool:
        with pytest.raises(TypeError, match="cannot"):
            pool.submit(lambda: 1)
        out = shared_empty((3, 4), "float32")  # into=: the caller copies (no shared region on Ray)
        assert pool.map(pool_tasks.filled, [(4,)] * 3, [1, 2, 3], into=list(out))[2] is not None
        assert out.tolist() == [[1.0] * 4, [2.0] * 4, [3.0] * 4]
        with pytest.raises(ValueError, match=r"task \d+ \(filled\) returned an array of shape \(2,\)"):
            pool.map(pool_tasks.filled, [(2,)], [1], into=[out[0]])


# ----------------------------------------------------------------------------- faults


def test_an_actor_killed_mid_task_fails_it_and_is_replaced(slots, no_leftovers):
    with ray_pool(slots[:1], name="ray-kill") as pool:
        old = pool.pids()[0]
        running = pool.submit(pool_tasks.sleep_then, 30)
        time.sleep(0.5)
        t0 = time.monotonic()
        os.kill(old, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError, match=rf"worker 0 \(slot0 cores \{{0\}} on node {slots[0].node[:8]}, pid {old}\).*died with the end of its Ray worker process.*replacement"):
            running.result(timeout=15)
        assert time.monotonic() - t0 < 10
        assert pool.submit(pool_tasks.add, 1, 2).result(timeout=30) == 3
        assert pool.pids()[0] != old and pool.stats.crashes == 1


def test_an_actor_that_dies_idle_is_replaced_without_failing_the_next_task(slots, no_leftovers):
    with ray_pool(slots[:1], name="ray-idle") as pool:
        old = pool.pids()[0]
        os.kill(old, signal.SIGKILL)  # between tasks
        deadline = time.monotonic() + 15
        while pool.stats.crashes == 0:
            assert time.monotonic() < deadline, "the idle actor's death went unnoticed"
            time.sleep(0.05)
        assert pool.submit(pool_tasks.add, 1, 2).result(timeout=30) == 3  # not charged to it
        assert pool.pids()[0] != old and pool.stats.tasks_failed == 0


def test_unreserved_pools_share_a_slot_as_local_pools_do(slots, no_leftovers):
    """What the fixtures do under --kerasmp-ray: a session pool does not starve later ones."""
    with ray_pool(slots[:1], name="ray-first", backend=RayBackend(reserve=False)) as first:
        t0 = time.monotonic()
        with ray_pool(slots[:1], name="ray-second", backend=RayBackend(reserve=False), start_timeout_s=20) as second:
            assert second.submit(pool_tasks.add, 2, 3).result(timeout=30) == 5
        assert first.submit(pool_tasks.add, 1, 1).result(timeout=30) == 2
        assert time.monotonic() - t0 < 20


@pytest.mark.kerasmp_expect_broken
def test_a_node_removed_mid_task_is_a_clear_error(ray_cluster, no_leftovers):
    local = DeviceSlot(index=0, kind="CPU", cores=(sorted(os.sched_getaffinity(0))[0],))
    with WorkerPool([local], warm_import=False, name="bystander") as bystander:
        node = ray_cluster.add_node(1)
        assert not set(bystander.pids()) & set(ray_cluster.processes()), "the cluster would end another owner's process"
    node_id = str(node.node_id)
    slot = next(s for s in plan_ray_slots() if s.node == node_id)
    slot = dataclasses.replace(slot, index=0)
    pool = ray_pool([slot], name="ray-node")
    try:
        running = pool.submit(pool_tasks.sleep_then, 60)
        time.sleep(0.5)
        t0 = time.monotonic()
        ray_cluster.remove_node(node_id)
        with pytest.raises(WorkerCrashedError, match=rf"on node {node_id[:8]}.*died with its node's end") as crashed:
            running.result(timeout=30)
        # It says what happens next, and that happens: the slot is given up, no start is tried.
        assert f"; its slot was given up, no replacement started: its Ray node {node_id[:8]} is gone from the cluster;" in str(crashed.value)
        assert "starting a replacement" not in str(crashed.value)
        with pytest.raises(PoolBrokenError, match=rf"Ray node {node_id[:8]} is gone") as broken:
            pool.submit(pool_tasks.add, 1).result(timeout=30)
        assert SLOT_NODE_GONE.format(pool="ray-node", slot=slot.describe(), node=node_id[:8]) in str(broken.value)
        assert "failed to start" not in str(broken.value)  # no start was tried, none is counted
        assert time.monotonic() - t0 < 30
    finally:
        pool.close(timeout=5)


def test_a_slot_no_node_can_hold_fails_at_once(slots, no_leftovers):
    big = dataclasses.replace(slots[0], cores=(0, 1, 2, 3))
    t0 = time.monotonic()
    with pytest.raises(WorkerStartupError, match=rf"on Ray node {slots[0].node[:8]} ask for 4 CPU but that node has 1 CPU in all"):
        ray_pool([big], name="ray-big")
    gone = dataclasses.replace(slots[0], node="ab" * 28)
    with pytest.raises(WorkerStartupError, match="is not .or no longer. in the cluster"):
        ray_pool([gone], name="ray-gone")
    assert time.monotonic() - t0 < 5


def test_a_slot_whose_cpus_are_taken_fails_within_the_start_bound(slots, no_leftovers):
    with ray_pool(slots[:1], name="ray-holder"):
        t0 = time.monotonic()
        with pytest.raises(WorkerStartupError, match="was not ready after 3 s: Ray had not placed it"):
            ray_pool(slots[:1], name="ray-waiter", start_timeout_s=3)
        assert time.monotonic() - t0 < 8


EXIT_WITHOUT_CLEANUP = """
import json, sys, time
sys.path.insert(0, {tests!r})
import pool_tasks
from pytest_kerasmp import LocalRayCluster, WorkerPool, plan_ray_slots
if __name__ == "__main__":  # actors import the script, as local workers do
    cluster = LocalRayCluster(2)
    pool = WorkerPool(plan_ray_slots(), backend="ray", warm_import=False, name="exit")
    pool.submit(pool_tasks.sleep_then, 60)
    time.sleep(0.5)
    open({pids!r}, "w").write(json.dumps(cluster.processes()))
    raise SystemExit("leaving without clean-up")
"""


def test_a_script_that_exits_with_a_busy_ray_pool_ends_in_seconds(run_python, tmp_path):
    from conftest import running

    pids = tmp_path / "pids.json"
    tests = os.path.dirname(os.path.abspath(__file__))
    t0 = time.monotonic()
    done = run_python(EXIT_WITHOUT_CLEANUP.format(tests=tests, pids=str(pids)))
    assert "leaving without clean-up" in done.stderr, done.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    import json

    started = json.loads(pids.read_text())
    assert started
    deadline = time.monotonic() + 20
    while any(running(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in started if running(p)], "Ray processes outlived the script"
