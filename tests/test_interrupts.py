"""What CI does to a session: a timed-out test, SIGTERM, a crashed xdist worker.

Each test injects the fault (pytest-timeout, a signal handler's exception, SIGTERM, os._exit)
and bounds its own waits, so that a broken promise fails here in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import pool_tasks
from conftest import running
from pytest_kerasmp import TaskCancelledError, WorkerPool
from pytest_kerasmp.errors import TERMINATED
from pytest_kerasmp.plugin.sessionguard import POOL_RESTARTED
from cpu_slots import CPU0

TESTS = os.path.dirname(pool_tasks.__file__)


class Interrupted(Exception):
    """What a signal handler of the user's raises into the waiting thread."""


def _alarm_in(seconds: float):
    def handler(*_):
        raise Interrupted("the alarm went off")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return old


def _gone(pids, within: float) -> bool:
    deadline = time.monotonic() + within
    while any(running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------- an interrupted call, in-process


def test_an_exception_raised_into_map_ends_that_calls_tasks_and_the_pool_serves_on(no_leftovers):
    with WorkerPool([CPU0, CPU0], warm_import=False) as pool:
        before = pool.pids()
        old = _alarm_in(1.0)
        try:
            t0 = time.monotonic()
            with pytest.raises(Interrupted):
                pool.map(pool_tasks.sleep_then, [1000] * 3)  # two run, one queued
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert time.monotonic() - t0 < 3
        assert _gone(before, within=3), "the workers running the abandoned tasks were not ended"
        assert pool.health() is None
        assert pool.map(pool_tasks.add, [1, 2], [10, 20], timeout=60) == [11, 22]  # replacements serve
        assert not set(pool.pids()) & set(before)
        assert pool.stats.crashes == 0 and pool.stats.timeouts == 0


def test_an_interrupted_future_result_cancels_its_task_with_the_workers_stacks(no_leftovers):
    with WorkerPool([CPU0], warm_import=False) as pool:
        running_task = pool.submit(pool_tasks.sleep_then, 1000)
        queued = pool.submit(pool_tasks.add, 1, 2)
        pid = pool.pids()[0]
        old = _alarm_in(0.5)
        try:
            with pytest.raises(Interrupted):
                running_task.result()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        with pytest.raises(TaskCancelledError, match=r"was cancelled while it ran on worker 0 .* its caller's wait in Future.result\(\) ended with Interrupted: the alarm went off; the worker was killed \(the pool is starting a replacement on the same slot\)") as info:
            running_task.result(timeout=10)
        assert "sleep_then" in info.value.stacks  # where it was when it was ended
        assert _gone([pid], within=3)
        assert queued.result(timeout=60) == 3  # the other call's task runs on the replacement


def test_a_wait_that_times_out_by_its_own_timeout_leaves_the_task_running(no_leftovers):
    with WorkerPool([CPU0], warm_import=False) as pool:
        future = pool.submit(pool_tasks.sleep_then, 1.5, "done")
        with pytest.raises(TimeoutError):
            future.result(timeout=0.2)
        assert future.result(timeout=30) == "done"


def test_ctrl_c_in_map_still_ends_the_whole_pool(no_leftovers):
    pool = WorkerPool([CPU0], warm_import=False)

    def press(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, press)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.map(pool_tasks.sleep_then, [1000])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert pool.health() is not None and "interrupted" in pool.health()


# --------------------------------------------------------------- pytest-timeout, -n 2

SUITE_CONFTEST = "import tensorflow  # noqa: F401  (as outside suites do)\n"
SUITE_TASKS = """
import os, time, pathlib

def square(x):
    return x * x

def sleep_marked(seconds, marker):
    pathlib.Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
"""


def _suite(pytester: pytest.Pytester, **files: str) -> None:
    pytester.makeconftest(SUITE_CONFTEST)
    pytester.makepyfile(tasks=SUITE_TASKS, **{k: textwrap.dedent(v) for k, v in files.items()})


@pytest.mark.parametrize("method", ["signal", "thread"])
def test_a_pytest_timeout_in_map_does_not_poison_the_session_pool(run_pytest, pytester, method):
    # The pool starts in the first test (pytest-timeout counts fixture set-up, and a loaded
    # machine may take more than the bound to start it); the timed-out test is the second.
    bound = 3 if method == "signal" else 15
    _suite(pytester, test_a=f"""
        import pytest, tasks

        def test_warm(kerasmp_pool):
            assert kerasmp_pool.map(tasks.square, [2]) == [4]

        @pytest.mark.timeout({bound}, method="{method}")
        def test_times_out(kerasmp_pool, tmp_path):
            kerasmp_pool.map(tasks.sleep_marked, [1000] * 2, [str(tmp_path / "m")] * 2)

        def test_next(kerasmp_pool):
            assert kerasmp_pool.map(tasks.square, [1, 2, 3]) == [1, 4, 9]
    """)
    # loadfile: both tests in one xdist worker (the thread method ends that worker: xdist
    # replaces it, and re-runs the rest of a loadfile unit, so it runs under load)
    dist = "loadfile" if method == "signal" else "load"
    t0 = time.monotonic()
    result = run_pytest("-n", "2", "--dist", dist, "--kerasmp-gpus=2", "-p", "no:randomly")
    result.assert_outcomes(failed=1, passed=2)
    assert time.monotonic() - t0 < 90
    result.stdout.fnmatch_lines(["*FAILED test_a.py::test_times_out*"])
    assert "PoolClosedError" not in result.stdout.str()
    if method == "signal":
        result.stdout.fnmatch_lines(["*Timeout*"])
    else:
        result.stdout.fnmatch_lines(["*crashed while running*test_times_out*"])


def test_a_session_pool_a_test_closed_is_restarted_for_the_next_and_the_summary_says_so(run_pytest, pytester):
    _suite(pytester, test_a="""
        import tasks

        def test_closes_it(kerasmp_pool):
            kerasmp_pool.close()

        def test_next(kerasmp_pool):
            assert kerasmp_pool.map(tasks.square, [2, 3]) == [4, 9]
    """)
    result = run_pytest("-n", "2", "--dist", "loadfile", "--kerasmp-gpus=2", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    line = POOL_RESTARTED.format(
        test="test_a.py::test_next", where=" [gw*]", why="it was closed (close() was called)", culprit="test_a.py::test_closes_it",
    )
    result.stdout.fnmatch_lines([f"kerasmp: {line}".replace("[", "[[]").replace("[[]gw*]", "[[]gw*[]]")])


# ---------------------------------------------------------------------------- SIGTERM

LONG_TEST = """
import os, tasks

def test_long_{k}(kerasmp_pool):
    kerasmp_pool.map(tasks.sleep_marked, [1000], [os.environ["MARK_DIR"] + "/m{k}"])
"""


def _start_and_wait(cmd, cwd, marks, want: int) -> subprocess.Popen[str]:
    env = {**os.environ, "MARK_DIR": str(marks), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while len(list(marks.iterdir())) < want:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("the session did not start its tasks:\n" + proc.communicate()[0][-3000:])
        time.sleep(0.1)
    time.sleep(0.3)
    return proc


def _tree(pid: int) -> list[int]:
    import psutil

    return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]


@pytest.mark.parametrize("target", ["controller", "worker"])
def test_sigterm_ends_every_process_of_an_xdist_session_within_seconds(pytester, tmp_path, target):
    _suite(pytester, test_one=LONG_TEST.format(k=1), test_two=LONG_TEST.format(k=2))
    marks = tmp_path / "marks"
    marks.mkdir()
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "2", "--kerasmp-gpus=2"]
    proc = _start_and_wait(cmd, pytester.path, marks, want=2)
    try:
        pool_workers = [int(m.read_text()) for m in marks.iterdir()]
        everyone = _tree(proc.pid)
        if target == "controller":
            victim, survivors = proc.pid, pool_workers
        else:  # the xdist worker that owns the first pool worker
            import psutil

            owner = psutil.Process(pool_workers[0]).ppid()
            victim, survivors = owner, pool_workers[:1]
        t0 = time.monotonic()
        os.kill(victim, signal.SIGTERM)
        assert _gone(survivors, within=2), "the plugin's processes outlived SIGTERM by 2 s"
        if target == "controller":
            out = proc.communicate(timeout=15)[0]
            assert _gone(everyone, within=5), "processes of the session outlived SIGTERM"
            assert proc.returncode == pytest.ExitCode.INTERRUPTED, out[-3000:]
            assert TERMINATED.format(who="the pytest controller", pid=proc.pid) in out
            assert time.monotonic() - t0 < 8
    finally:
        proc.kill()
        proc.communicate()
    for pid in everyone:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_to_a_single_pytest_process_ends_it_as_an_interrupt(pytester, tmp_path):
    _suite(pytester, test_one=LONG_TEST.format(k=1))
    marks = tmp_path / "marks"
    marks.mkdir()
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--kerasmp-gpus=1"]
    proc = _start_and_wait(cmd, pytester.path, marks, want=1)
    try:
        everyone = _tree(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=15)[0]
        assert _gone(everyone, within=3)
        assert proc.returncode == pytest.ExitCode.INTERRUPTED, out[-3000:]
        assert TERMINATED.format(who="pytest", pid=proc.pid) in out
    finally:
        proc.kill()


SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import pool_tasks
from pytest_kerasmp import DeviceSlot, WorkerPool

def mine(signum, frame):
    open({flag!r}, "w").write("called")
    sys.exit(3)

if __name__ == "__main__":
    if {own_handler!r}:
        signal.signal(signal.SIGTERM, mine)
    with WorkerPool([DeviceSlot(index=0, kind="CPU", cores=(0,))] * 2, warm_import=False) as pool:
        print(*pool.pids(), flush=True)
        pool.map(pool_tasks.sleep_then, [1000] * 2)
"""


@pytest.mark.parametrize("own_handler", [False, True])
def test_sigterm_to_a_script_ends_its_pools_and_chains_to_its_own_handler(tmp_path, own_handler):
    flag = tmp_path / "flag"
    script = tmp_path / "owner.py"
    script.write_text(SCRIPT.format(tests=TESTS, flag=str(flag), own_handler=own_handler))
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            pids = [int(p) for p in proc.stdout.readline().split()]
            assert len(pids) == 2, proc.stderr.read()
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert _gone(pids, within=2), "the pool's workers outlived SIGTERM to their owner"
            proc.wait(timeout=10)
            assert time.monotonic() - t0 < 5
        finally:
            proc.kill()
    if own_handler:
        assert proc.returncode == 3 and flag.read_text() == "called"
    else:
        assert proc.returncode == -signal.SIGTERM


# ------------------------------------------------------------------ a crashed xdist worker

CRASHING = """
import os, time

def test_crash_gw0_{k}():
    time.sleep(0.3)
    if os.environ["PYTEST_XDIST_WORKER"] == "gw0":
        os._exit(1)
"""


def test_a_crashed_xdist_worker_gets_an_end_and_its_replacement_no_false_alarm(run_pytest, pytester, tmp_path):
    pytester.makepyfile(**{f"test_c{k}": CRASHING.format(k=k) for k in range(6)})
    report = tmp_path / "report"
    result = run_pytest("-n", "2", "--kerasmp-gpus=2", "-p", "no:randomly", f"--kerasmp-report={report}")
    assert "crashed while running" in result.stdout.str()
    placement = json.loads((report / "kerasmp-report.json").read_text())["placement"]
    gw0 = next(r for r in placement if r["owner"] == "gw0" and r["role"] == "pytest")
    assert gw0["end"] is not None, "the crashed worker's end was not recorded"
    on_slot0 = [r for r in placement if r["role"] == "pytest" and r["slot"]["index"] == 0 and r["owner"] != "gw0"]
    assert on_slot0, "no replacement worker ran on the crashed worker's slot"
    assert all(not r["competed_with"] for r in placement), placement
    assert "shared a GPU or cores" not in result.stdout.str()
