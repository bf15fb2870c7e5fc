"""TFCluster: a local TensorFlow cluster of pinned, warm tasks with shared fate.

Real TensorFlow in every task (CPU slots here; GPU placement with faked GPUs). Every fault
test bounds its waits and checks the elapsed time, so a broken promise fails in seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

import cluster_tasks
from conftest import running
import pool_tasks
from pytest_kerasmp import (
    ClusterClosedError,
    ClusterStartError,
    ClusterTaskError,
    DeviceSlot,
    PoolBrokenError,
    TFCluster,
    WorkerCrashedError,
    WorkerPool,
    plan_slots,
)
from pytest_kerasmp.runtime.cluster import ports as _ports
from pytest_kerasmp.slots import network
from cpu_slots import CPU0, CPU1
from interrupted import PREAMBLE, wait_or_fail

TESTS = os.path.dirname(cluster_tasks.__file__)


def gone(pids, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while any(running(p) for p in pids if p):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def warm():
    """One 2-task cluster for the happy-path tests (started before any test's leak guard)."""
    with TFCluster(2, slots=[CPU0, CPU1], name="warm") as c:
        yield c


# ------------------------------------------------------------------------------ happy path


def test_tasks_are_pinned_told_the_loopback_cluster_and_ran_no_op(warm):
    infos = warm.run(cluster_tasks.describe)
    assert [i["task"] for i in infos] == [("worker", 0), ("worker", 1)]
    assert warm.task_names == ["worker:0", "worker:1"]
    spec = warm.cluster_spec
    assert spec == {"worker": [f"127.0.0.1:{p}" for p in warm.ports]} and len(set(warm.ports)) == 2
    for k, info in enumerate(infos):
        assert info["tf_config"] == {"cluster": spec, "task": {"type": "worker", "index": k}}
        assert info["cores"] == list((CPU0, CPU1)[k].cores)
        assert info["slot"]["index"] == k
    assert [i["pid"] for i in infos] == warm.pids()


def test_the_strategy_made_in_the_first_call_all_reduces_and_the_tasks_stay_warm(warm):
    pids = warm.pids()
    first = warm.run(cluster_tasks.all_reduce_rank)
    assert first == [(3.0, 2, None)] * 2  # 1 + 2 over both tasks; no collective timeout by default
    t0 = time.monotonic()
    assert warm.run(cluster_tasks.all_reduce_rank, timeout=30) == first
    assert time.monotonic() - t0 < 5  # warm: no process start, no TensorFlow import
    assert warm.pids() == pids and warm.starts == 1


def test_a_chief_joins_the_workers_and_a_closed_cluster_refuses_work():
    with TFCluster(2, chief=True, slots=[CPU0, CPU1, CPU0], name="chiefed") as c:
        assert c.task_names == ["chief:0", "worker:0", "worker:1"]
        assert list(c.cluster_spec) == ["chief", "worker"] and len(c.cluster_spec["worker"]) == 2
        infos = c.run(cluster_tasks.describe)
        assert [i["task"] for i in infos] == [("chief", 0), ("worker", 0), ("worker", 1)]
        # The warm-up imported TensorFlow and ran no op, so the strategy can still set up collectives.
        assert [i["context_initialized"] for i in infos] == [False] * 3
        # Every task is a replica: 1 (chief 0) + 1 (worker 0) + 2 (worker 1).
        assert c.run(cluster_tasks.all_reduce_rank, timeout=60) == [(4.0, 3, None)] * 3
        # The tasks talk to each other on loopback only (in their private network: psutil
        # reads the asking process's namespace, so the tables are read from each task's).
        assert set().union(*(network.peers(p) for p in c.pids())) == {"127.0.0.1"}
        pids = c.pids()
    assert gone(pids, within=1)
    with pytest.raises(ClusterClosedError, match=r"cluster 'chiefed' is closed; run\(cluster_tasks.describe\) was refused"):
        c.run(cluster_tasks.describe)
    with pytest.raises(ClusterClosedError, match=r"cluster 'chiefed' is closed; start\(\) was refused"):
        c.start()


CLAIMER = """
import sys
from pathlib import Path
from pytest_kerasmp.runtime.cluster import ports as _ports
from pytest_kerasmp.slots import network
print(*[_ports.claim_free_port(Path(sys.argv[1])) for _ in range(50)], flush=True)
sys.stdin.read()  # alive (its claims held) until the test has every claimer's ports
"""


def test_ports_claimed_by_concurrent_processes_never_collide(tmp_path):
    """(A claim of a process that has exited is stale and rightly taken over: each claimer
    stays alive until all have claimed.)"""
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    try:
        claimed = []
        for proc in procs:
            assert select.select([proc.stdout], [], [], 60)[0], "a claimer did not claim its 50 ports within 60 s"
            claimed.append([int(p) for p in proc.stdout.readline().split()])
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(timeout=30)
            proc.stdout.close()  # (left open, a ResourceWarning at collection)
    ports = [p for c in claimed for p in c]
    assert len(ports) == 150 and len(set(ports)) == 150
    low, high = _ports.port_range()
    assert all(low <= p < high for p in ports)  # below the kernel's ephemeral range


def test_two_processes_taking_over_the_same_stale_claims_never_both_win(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    n, first = 200, 20000
    for port in range(first, first + n):
        (tmp_path / str(port)).write_text(str(dead))  # claims of a process that is gone
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    racers = [ctx.Process(target=cluster_tasks.race_for_claims, args=(str(tmp_path), first, n, barrier, queue)) for _ in range(2)]
    for racer in racers:
        racer.start()
    try:
        won = [set(queue.get(timeout=60)), set(queue.get(timeout=60))]
    finally:
        for racer in racers:
            racer.join(10)
            racer.kill()
    assert not won[0] & won[1], f"{len(won[0] & won[1])} stale claims taken over by both processes"
    assert len(won[0] | won[1]) == n  # and each taken by one


def test_port_claims_are_released_and_stale_ones_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(_ports, "PORTS_DIR", tmp_path)
    port = _ports.claim_free_port()
    assert (tmp_path / str(port)).read_text() == str(os.getpid())
    assert not _ports.claim(tmp_path, port)  # held by a live process: never taken
    _ports.release(port)
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # no claim left (the lock file stays)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    for text in (dead, ""):  # an owner that is gone, or died before writing
        (tmp_path / str(port)).write_text(text)
        assert _ports.claim(tmp_path, port)
        assert (tmp_path / str(port)).read_text() == str(os.getpid())
        _ports.release(port)


def test_bad_arguments_get_clear_errors_and_start_nothing():
    with pytest.raises(ValueError, match="needs one slot per task .*3 tasks: chief:0, worker:0, worker:1.* got 2"):
        TFCluster(2, chief=True, slots=[CPU0, CPU1])
    with pytest.raises(ValueError, match="workers=0 must be a positive"):
        TFCluster(0)
    with pytest.raises(ValueError, match="one port per task"):
        TFCluster(2, slots=[CPU0, CPU1], ports=[1234])
    with pytest.raises(ValueError, match="run_timeout_s=None must be a positive number of seconds"):
        TFCluster(2, slots=[CPU0, CPU1], run_timeout_s=None)


def test_a_task_that_died_between_runs_fails_the_next_run_at_once_and_the_one_after_restarts(kerasmp_tf_cluster):
    c = kerasmp_tf_cluster(2, slots=[CPU0, CPU1])
    pids = c.pids()
    os.kill(pids[1], signal.SIGKILL)  # the OOM killer, between two runs
    assert gone(pids[1:], within=5)
    t0 = time.monotonic()
    with pytest.raises(ClusterTaskError, match=rf"task worker:1 \(slot1 .*, pid {pids[1]}\) of cluster 'cluster0' died with SIGKILL between runs, so run\(cluster_tasks.describe\) was not started") as info:
        c.run(cluster_tasks.describe, timeout=60)
    assert time.monotonic() - t0 < 2
    assert (info.value.task, info.value.exitcode) == ("worker:1", -signal.SIGKILL)
    assert gone(pids)
    assert len(c.run(cluster_tasks.describe, timeout=60)) == 2 and c.starts == 2


def test_a_second_thread_cannot_run_while_a_run_is_on(warm):
    import threading

    c = warm  # no fault: the warm cluster serves
    first = threading.Thread(target=c.run, args=(cluster_tasks.sleep_in, 0, 2))
    first.start()
    time.sleep(0.3)
    with pytest.raises(ClusterClosedError, match=r"is already running run\(cluster_tasks.sleep_in\) in another thread"):
        c.run(cluster_tasks.describe)
    first.join(10)
    assert not first.is_alive()


@pytest.mark.kerasmp_expect_broken
def test_a_pool_that_does_not_replace_fails_what_a_dead_worker_would_have_run():
    """The cluster's pool semantics: what was queued for a dead worker alone fails at once, and
    so does everything once no worker is left."""
    class NotReplacing(WorkerPool):
        replace_workers = False  # as the cluster's pool (fixed when it starts: the backend's PoolSpec)

    with NotReplacing([CPU0, CPU1], warm_import=False, name="norep") as pool:
        running = [pool._submit(pool_tasks.sleep_then, (1000,), {}, None, w) for w in (0, 1)]
        queued = pool._submit(pool_tasks.sleep_then, (0,), {}, None, 1)
        anywhere = pool.submit(pool_tasks.sleep_then, 0)
        time.sleep(0.3)
        pids = pool.pids()
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(WorkerCrashedError, match="it was not replaced: its owner restarts all its processes together"):
            running[1].result(timeout=5)
        with pytest.raises(WorkerCrashedError, match=r"worker 1 .* before task 2 \(pool_tasks:sleep_then\), queued for it alone, could start"):
            queued.result(timeout=5)
        assert not anywhere.done()  # worker 0 may still run it
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(PoolBrokenError, match="every worker died and the pool does not replace them"):
            anywhere.result(timeout=5)


# ---------------------------------------------------------------------------------- faults


def test_a_task_killed_mid_training_fails_the_run_in_seconds_and_the_next_run_restarts(kerasmp_tf_cluster):
    c = kerasmp_tf_cluster(2, slots=[CPU0, CPU1])
    assert c.run(cluster_tasks.train_steps, 3) == [3, 3]
    pids = c.pids()
    t0 = time.monotonic()
    with pytest.raises(ClusterTaskError) as info:
        c.run(cluster_tasks.train_steps, 10_000, 5, timeout=60)
    elapsed = time.monotonic() - t0
    error = info.value
    assert elapsed < 5, f"{elapsed:.1f} s to notice a dead task"
    assert f"task worker:1 (slot1 cores {{{CPU1.cores[0]}}}, pid {pids[1]}) of cluster 'cluster0' died with SIGKILL during run(cluster_tasks.train_steps)" in str(error)
    assert "every task of the cluster was stopped" in str(error)
    assert (error.task, error.pid, error.exitcode) == ("worker:1", pids[1], -signal.SIGKILL)
    assert "task 1 dies at step 5" in error.outputs["worker:1"]
    # The survivor was waiting in a collective: it either failed on the lost peer within the
    # grace (gRPC's connection reset) or had its stacks taken before it was stopped.
    assert set(error.outputs) == {"worker:0", "worker:1"} and set(error.stacks) <= {"worker:0"}
    assert gone(pids), "a task outlived the failed run"
    assert c.pids() == [None, None]
    assert c.run(cluster_tasks.all_reduce_rank, timeout=60) == [(3.0, 2, None)] * 2  # restarted, new ports
    assert c.starts == 2 and not set(c.pids()) & set(pids)


def test_a_task_that_raises_fails_the_run_in_every_task_with_its_traceback_and_output(kerasmp_tf_cluster):
    c = kerasmp_tf_cluster(2, slots=[CPU0, CPU1])
    pids = c.pids()
    t0 = time.monotonic()
    with pytest.raises(ClusterTaskError, match=r"task worker:0 .* raised ValueError: learning rate must be positive, got -0.1 during run\(cluster_tasks.raise_in\)") as info:
        c.run(cluster_tasks.raise_in, 0, timeout=60)
    assert time.monotonic() - t0 < 5  # the healthy task was stopped, not waited for (60 s)
    assert "raise ValueError" in str(info.value.__cause__.__cause__)  # the task's traceback
    assert "about to fail" in info.value.outputs["worker:0"]
    assert any("recent output of task worker:0" in n for n in info.value.__notes__)
    assert gone(pids)


def test_a_run_past_its_bound_dumps_the_stuck_tasks_and_stops_them(kerasmp_tf_cluster):
    c = kerasmp_tf_cluster(2, slots=[CPU0, CPU1])
    pids = c.pids()
    t0 = time.monotonic()
    with pytest.raises(ClusterTaskError, match=r"run\(cluster_tasks.sleep_in\) on cluster 'cluster0' did not finish within 1 s: worker:1") as info:
        c.run(cluster_tasks.sleep_in, 1, 1000, timeout=1)
    assert time.monotonic() - t0 < 5
    assert "sleep_in" in info.value.stacks["worker:1"]
    assert gone(pids)


def test_tensorflow_collectives_time_out_when_a_peer_does_not_come(kerasmp_tf_cluster):
    """The cluster gives every strategy a collective timeout: the waiting task fails in TF itself."""
    c = kerasmp_tf_cluster(2, slots=[CPU0, CPU1], collective_timeout_s=2)
    with pytest.raises(ClusterTaskError, match="task worker:0 .* raised DeadlineExceededError: .*Collective has timed out") as info:
        c.run(cluster_tasks.late_second_collective, 1000, timeout=60)
    assert info.value.task == "worker:0"


def test_a_task_that_cannot_start_fails_the_cluster_start_and_leaves_nothing(kerasmp_tf_cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(_ports, "PORTS_DIR", tmp_path)
    bad = DeviceSlot(index=1, kind="CPU", cores=(4095,))  # no such core: its pin fails
    t0 = time.monotonic()
    with pytest.raises(ClusterStartError, match=r"cluster 'cluster0' could not start: task worker:1 \(slot1 cores \{4095\}, pid \d+\) of cluster 'cluster0' failed to start: .*no task of it is left running") as info:
        kerasmp_tf_cluster(2, slots=[CPU0, bad])
    assert time.monotonic() - t0 < 10
    assert info.value.task == "worker:1" and info.value.slot == bad.describe() and info.value.pid
    assert [p.name for p in tmp_path.iterdir()] == [".lock"], "the failed start left its port claims"


def test_a_port_already_taken_is_refused_before_anything_starts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ClusterStartError, match=f"port {taken} on 127.0.0.1, asked for task worker:1 of cluster 'ports', is already in use \\(process {os.getpid()}"):
            TFCluster(2, slots=[CPU0, CPU1], ports=[0, taken], name="ports")
        assert time.monotonic() - t0 < 2


def test_a_port_taken_after_start_fails_the_run_naming_it_and_the_restart_picks_new_ones(kerasmp_tf_cluster):
    # On this machine's network (a private one has its own ports, which nothing else takes).
    c = kerasmp_tf_cluster(2, slots=[CPU0, CPU1], private_network="off")
    old = list(c.ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", old[0]))
        s.listen()
        t0 = time.monotonic()
        with pytest.raises(ClusterTaskError, match=f"task worker:0 .* raised .*Could not start gRPC server.*its port {old[0]} on 127.0.0.1 was taken by another process"):
            c.run(cluster_tasks.all_reduce_rank, timeout=60)
        assert time.monotonic() - t0 < 15
        assert c.run(cluster_tasks.all_reduce_rank, timeout=60)[0][0] == 3.0
        assert old[0] not in c.ports


OWNER = PREAMBLE + """
import sys
sys.path.insert(0, {tests!r})
import cluster_tasks
from pytest_kerasmp import DeviceSlot, TFCluster
if __name__ == "__main__":
    slots = [DeviceSlot(index=0, kind="CPU", cores=({c0},)), DeviceSlot(index=1, kind="CPU", cores=({c1},))]
    with TFCluster(2, slots=slots) as c:
        print(*c.pids(), flush=True)
        c.run(cluster_tasks.sleep_in, 0, 1000)
"""


def test_ctrl_c_during_run_ends_every_task_within_seconds(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(OWNER.format(tests=TESTS, c0=CPU0.cores[0], c1=CPU1.cores[0]))
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            pids = [int(p) for p in proc.stdout.readline().split()]
            assert len(pids) == 2, proc.stderr.read()
            time.sleep(0.5)  # run() is waiting
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            wait_or_fail(proc)
            assert time.monotonic() - t0 < 4
            assert "KeyboardInterrupt" in proc.stderr.read()
        finally:
            proc.kill()
    assert gone(pids, within=3), "tasks outlived the interrupted owner"


# ------------------------------------------------------------------------------- placement


@pytest.mark.parametrize("cap", [None, 1024])
def test_tasks_on_faked_gpus_get_their_own_gpu_and_its_memory_setting(monkeypatch, cap):
    monkeypatch.setenv("PYTEST_KERASMP_FAKE_GPUS", "2")
    slots = plan_slots(2, memory_limit_mb=cap)
    assert [s.kind for s in slots] == ["GPU", "GPU"]
    with TFCluster(2, slots=slots, name="gpus") as c:
        infos = c.run(cluster_tasks.describe)
    assert [i["cuda_visible"] for i in infos] == [slots[0].gpu, slots[1].gpu] == ["0", "1"]
    if cap is None:
        assert [i["growth"] for i in infos] == ["true", "true"]
    else:
        assert [i["slot"]["memory_limit_mb"] for i in infos] == [1024, 1024]


def test_the_fixture_makes_a_cluster_on_the_slots_leased_to_the_test(run_pytest, pytester):
    test = f"""
        import sys
        import pytest
        sys.path.insert(0, {TESTS!r})
        import cluster_tasks

        @pytest.mark.kerasmp_slots(2)
        def test_cluster(kerasmp_tf_cluster, kerasmp_slots):
            c = kerasmp_tf_cluster(2)
            infos = c.run(cluster_tasks.describe)
            assert [i["slot"]["index"] for i in infos] == [s.index for s in kerasmp_slots[:2]]
            print("PIDS", *c.pids())
    """
    pytester.makepyfile(test_uses=test)
    result = run_pytest("--kerasmp-gpus=2", "-s")
    result.assert_outcomes(passed=1)
    pids = [int(p) for line in result.outlines if "PIDS" in line for p in line.split("PIDS")[1].split()]
    assert len(pids) == 2 and gone(pids, within=1)
    result = run_pytest("--kerasmp-gpus=2", "-n", "2")  # the same command line as one-slot tests
    result.assert_outcomes(passed=1)
    # Unmarked, it leases one slot: the error says which marker leases two.
    pytester.makepyfile(test_uses=test.replace("@pytest.mark.kerasmp_slots(2)", ""))
    result = run_pytest("--kerasmp-gpus=2")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*needs one slot per task (2 tasks: worker:0, worker:1) but the test leased 1 slot (slot0*); "
                                 "mark the test @pytest.mark.kerasmp_slots(2) to lease 2"])
    # With the session-long split (--kerasmp-leases=off), a worker's part is what it owns.
    result = run_pytest("--kerasmp-gpus=2", "-n", "2", "--kerasmp-leases=off")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*needs one slot per task (2 tasks: worker:0, worker:1) but xdist worker gw? owns 1 slot (slot?*): the session's "
        "2 slots are split among 2 xdist workers; pass --kerasmp-gpus=4 or more (2 per worker for 2 workers), or run with fewer workers (-n)",
    ])
    result = run_pytest("--kerasmp-gpus=4", "-n", "2", "--kerasmp-leases=off")  # what the message says to pass works
    result.assert_outcomes(passed=1)
