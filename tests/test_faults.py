"""Injected faults against pools and servers: each must end in a worded error, within seconds.

Every test bounds its own waits (``result(timeout=...)``, elapsed-time checks) so that a broken
promise fails here in seconds rather than at pytest-timeout's backstop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import pool_tasks
import server_models
from pytest_kerasmp import (
    InferenceServer,
    ModelRef,
    PoolBrokenError,
    PoolClosedError,
    ServerClosedError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerPool,
    WorkerStartupError,
)
from conftest import running as _running
from cpu_slots import CPU0, CPU1
from interrupted import PREAMBLE, wait_or_fail

SIGRT = signal.SIGRTMIN + 1  # a signal without a name in signal.Signals


def light_pool(slots=(CPU0,), **options) -> WorkerPool:
    return WorkerPool(list(slots), warm_import=False, **options)


# -------------------------------------------------------------------------------- deaths


def test_a_worker_killed_by_an_unnamed_signal_fails_its_task_and_is_replaced(no_leftovers):
    with light_pool() as pool:
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashedError, match=rf"died with signal {int(SIGRT)} \(SIGRTMIN\+1\).*starting a replacement"):
            pool.submit(pool_tasks.signal_self, int(SIGRT)).result(timeout=10)
        assert time.monotonic() - t0 < 5
        assert pool.submit(pool_tasks.add, 1, 2).result(timeout=30) == 3
        assert pool.stats.crashes == 1 and pool.stats.timeouts == 0


def test_a_worker_killed_by_an_unnamed_signal_at_start_is_a_startup_error(no_leftovers):
    with pytest.raises(WorkerStartupError, match=r"exited with signal \d+ \(SIGRTMIN\+1\) before it was ready"):
        light_pool(initializer=pool_tasks.signalling_initializer, initargs=(int(SIGRT),))


@pytest.mark.kerasmp_expect_broken
def test_failing_replacements_are_bounded_then_the_pool_refuses_work(no_leftovers, tmp_path):
    flag = tmp_path / "fail"
    pool = light_pool(initializer=pool_tasks.fail_if_exists, initargs=(str(flag),))
    try:
        flag.write_text("")
        queued = [pool.submit(pool_tasks.add, i) for i in range(3)]
        crash = pool.submit(pool_tasks.kill_self)  # runs after the queued ones; then no worker can start
        assert [f.result(timeout=30) for f in queued] == [0, 1, 2]
        with pytest.raises(WorkerCrashedError):
            crash.result(timeout=10)
        with pytest.raises(PoolBrokenError, match=r"failed to start 3 times in a row.*fails on purpose") as info:
            pool.submit(pool_tasks.add, 1).result(timeout=60)  # refused at once, or failed when the slot dies
        assert "fails on purpose" in str(info.value.__cause__.__cause__)  # the child's traceback
        t0 = time.monotonic()
        with pytest.raises(PoolBrokenError, match="can run nothing more"):
            pool.submit(pool_tasks.add, 1)
        with pytest.raises(PoolBrokenError):
            pool.map(pool_tasks.add, [1, 2], timeout=5)
        assert time.monotonic() - t0 < 1
    finally:
        pool.close(timeout=5)


# ----------------------------------------------- one body per fault, on both backends


def test_a_worker_that_dies_running_a_task_fails_it_and_is_replaced(make_pool):
    pool = make_pool()
    old = pool.pids()[0]
    with pytest.raises(WorkerCrashedError, match=rf"worker 0 \(.*, pid {old}\) of pool '\w+' died with .* while running task 0 "
                                                 r"\(pool_tasks:kill_self\); the pool is starting a replacement on the same slot; "):
        pool.submit(pool_tasks.kill_self).result(timeout=30)
    assert pool.submit(pool_tasks.add, 1, 2).result(timeout=60) == 3
    assert pool.pids()[0] != old
    assert pool.stats.crashes == 1 and pool.stats.tasks_failed == 1 and pool.stats.timeouts == 0


def test_a_task_past_its_timeout_gets_its_stacks_and_its_worker_replaced(make_pool):
    pool = make_pool()
    with pytest.raises(TaskTimeoutError, match=r"ran past its 0.5 s timeout on worker 0 .*; the worker was killed "
                                               r"\(the pool is starting a replacement on the same slot\)") as info:
        pool.submit_with_timeout(0.5, pool_tasks.sleep_then, 60).result(timeout=30)
    assert "sleep_then" in (info.value.stacks or "") and "pool_tasks.py" in (info.value.stacks or "")
    assert pool.submit(pool_tasks.add, 2, 2).result(timeout=60) == 4
    assert pool.stats.timeouts == 1 and pool.stats.crashes == 0


def test_an_initializer_that_raises_is_a_startup_error_with_its_traceback(make_pool):
    with pytest.raises(WorkerStartupError, match="initializer exploded on purpose") as info:
        make_pool(initializer=pool_tasks.failing_initializer)
    assert "failing_initializer" in str(info.value.__cause__)


def test_close_and_terminate_fail_what_is_left(make_pool):
    pool = make_pool()
    running = pool.submit(pool_tasks.sleep_then, 30)
    queued = pool.submit(pool_tasks.add, 1)
    time.sleep(0.5)  # the first task is under way
    pool.close(timeout=0.5)
    with pytest.raises(PoolClosedError, match="was closed"):
        queued.result(timeout=5)
    with pytest.raises(PoolClosedError, match="while task .* ran on worker 0"):
        running.result(timeout=5)
    with pytest.raises(PoolClosedError, match="is closed"):
        pool.submit(pool_tasks.add, 1)
    other = make_pool()
    busy = other.submit(pool_tasks.sleep_then, 30)
    time.sleep(0.5)
    other.terminate("Ctrl-C in a test")
    with pytest.raises(PoolClosedError, match="Ctrl-C in a test"):
        busy.result(timeout=5)


@pytest.mark.kerasmp_expect_broken
def test_an_error_in_the_dispatcher_fails_every_future_and_breaks_the_pool(make_pool, monkeypatch):
    from pytest_kerasmp.runtime.pool.policy import DispatchPolicy

    def explode(self, *args):
        raise RuntimeError("injected dispatcher fault")

    pool = make_pool()
    monkeypatch.setattr(type(pool._dispatcher), "hand", explode)
    assert isinstance(pool._dispatcher, DispatchPolicy)  # the one policy, whichever backend
    future = pool.submit(pool_tasks.add, 1)
    with pytest.raises(PoolBrokenError, match="dispatcher thread failed with RuntimeError: injected") as info:
        future.result(timeout=30)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(PoolBrokenError, match="injected dispatcher fault"):
        pool.submit(pool_tasks.add, 1)


# ------------------------------------------------------------------------ timeouts, close


def test_map_and_broadcast_take_a_timeout(no_leftovers):
    with light_pool() as pool:
        t0 = time.monotonic()
        with pytest.raises(TaskTimeoutError, match=r"map of sleep_then .* did not finish within 0.5 s \(0 of 3 done\)"):
            pool.map(pool_tasks.sleep_then, [3, 3, 3], timeout=0.5)
        with pytest.raises(TaskTimeoutError, match="broadcast of sleep_then"):
            pool.broadcast(pool_tasks.sleep_then, 3, timeout=0.2)
        assert time.monotonic() - t0 < 3
        pool.close(timeout=0.5)
        assert time.monotonic() - t0 < 8


@pytest.mark.parametrize("run", range(3))
def test_close_with_a_stuck_task_resolves_it_within_the_bound(no_leftovers, run):
    pool = light_pool()
    stuck = pool.submit(pool_tasks.sleep_then, 1000)
    queued = pool.submit(pool_tasks.add, 1)
    time.sleep(0.2)
    t0 = time.monotonic()
    pool.close(timeout=1.0)
    assert time.monotonic() - t0 < 5
    with pytest.raises(PoolClosedError, match=r"closed \(close\(timeout=1\) expired\) while task 0") as info:
        stuck.result(timeout=0)
    assert "sleep_then" in info.value.stacks
    with pytest.raises(PoolClosedError, match=r"closed \(close\(timeout=1\) expired\) before task 1"):
        queued.result(timeout=0)


def test_a_worker_dying_during_close_fails_only_its_task_and_is_not_replaced(no_leftovers):
    pool = light_pool([CPU0, CPU1])
    dying = pool.submit(pool_tasks.sleep_then_exit, 0.5)  # dies by itself, well into close()
    pool.submit(pool_tasks.sleep_then, 0.1)
    queued = [pool.submit(pool_tasks.add, i) for i in range(4)]
    t0 = time.monotonic()
    pool.close(timeout=20)
    assert time.monotonic() - t0 < 5
    with pytest.raises(WorkerCrashedError, match="it was not replaced: the pool is closing"):
        dying.result(timeout=0)
    assert [f.result(timeout=0) for f in queued] == [0, 1, 2, 3]  # the other worker ran them


# ----------------------------------------------------------------------------- interrupts

OWNER = PREAMBLE + """
import os, sys, time
sys.path.insert(0, {tests!r})
import pool_tasks
from pytest_kerasmp import WorkerPool, DeviceSlot
if __name__ == "__main__":
    with WorkerPool([DeviceSlot(index=0, kind="CPU", cores=(0,))] * 2, warm_import=False) as pool:
        print(*pool.pids(), flush=True)
        pool.map(pool_tasks.sleep_then, [1000] * 4)
"""


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_ends_the_pool_and_its_running_tasks_within_seconds(tmp_path, presses):
    script = tmp_path / "owner.py"
    script.write_text(OWNER.format(tests=os.path.dirname(pool_tasks.__file__)))
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            pids = [int(p) for p in proc.stdout.readline().split()]
            assert len(pids) == 2, proc.stderr.read()
            time.sleep(0.5)  # the tasks run
            t0 = time.monotonic()
            for _ in range(presses):
                proc.send_signal(signal.SIGINT)
                time.sleep(0.05)
            wait_or_fail(proc)
            assert time.monotonic() - t0 < 4
        finally:
            proc.kill()
    deadline = time.monotonic() + 3
    while any(_running(p) for p in pids):
        assert time.monotonic() < deadline, "workers outlived the interrupted owner"
        time.sleep(0.05)


def test_ctrl_c_under_pytest_ends_running_tasks_within_seconds(pytester, tmp_path):
    pidfile = tmp_path / "pids"
    pytester.makepyfile(f"""
        import os, signal, threading
        from pytest_kerasmp import DeviceSlot
        import pool_tasks

        def test_interrupted(kerasmp_pool_factory):
            pool = kerasmp_pool_factory([DeviceSlot(index=0, kind="CPU", cores=(0,))] * 2, warm_import=False)
            open({str(pidfile)!r}, "w").write(" ".join(map(str, pool.pids())))
            signal.signal(signal.SIGINT, signal.default_int_handler)  # even if launched ignoring it
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
            pool.map(pool_tasks.sleep_then, [1000] * 4)
    """)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(pool_tasks.__file__)}
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"],
        cwd=pytester.path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == pytest.ExitCode.INTERRUPTED, done.stdout + done.stderr
    assert time.monotonic() - t0 < 15  # pytest and the pool start in ~2 s; the tasks sleep 1000 s
    pids = [int(p) for p in pidfile.read_text().split()]
    assert not [p for p in pids if _running(p)]


def test_a_script_without_a_main_guard_gets_a_clear_error(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(pool_tasks.__file__)!r})
        import pool_tasks
        from pytest_kerasmp import WorkerPool, DeviceSlot
        pool = WorkerPool([DeviceSlot(index=0, kind="CPU", cores=(0,))], warm_import=False, start_timeout_s=30)
        print(pool.submit(pool_tasks.add, 1, 2).result(30))
        pool.close()
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "WorkerStartupError" in done.stderr
    assert "starts pytest-kerasmp processes when it is imported" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr


def test_task_functions_of_a_guarded_script_run_in_workers(tmp_path):
    script = tmp_path / "guarded.py"
    script.write_text(textwrap.dedent("""
        from pytest_kerasmp import WorkerPool, DeviceSlot

        def triple(x):
            return 3 * x

        if __name__ == "__main__":
            with WorkerPool([DeviceSlot(index=0, kind="CPU", cores=(0,))], warm_import=False) as pool:
                print(pool.map(triple, [1, 2]))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[3, 6]", done.stderr


def test_a_task_function_workers_cannot_import_is_refused_at_submit(pytester):
    pytester.makepyfile(test_importlib_tasks="""
        import pytest
        from pytest_kerasmp import DeviceSlot

        def double(x):
            return 2 * x

        def test_refused(kerasmp_pool_factory):
            pool = kerasmp_pool_factory([DeviceSlot(index=0, kind="CPU", cores=(0,))], warm_import=False)
            with pytest.raises(TypeError, match="cannot run in a worker process: .*is not on sys.path.*put task functions in a module"):
                pool.submit(double, 1)
    """)
    pytest_script = os.path.join(os.path.dirname(sys.executable), "pytest")  # no cwd on sys.path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [pytest_script, "-p", "no:cacheprovider", "--import-mode=importlib"],
        cwd=pytester.path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert "1 passed" in done.stdout, done.stdout + done.stderr


# ------------------------------------------------------------------------- the child side


def test_children_import_no_pytest_before_they_pin_and_print_with_a_prefix(no_leftovers, capfd):
    with light_pool() as pool:
        state = pool.submit(pool_tasks.at_pin).result(timeout=30)
        pool.submit(pool_tasks.say, "hello from the worker").result(timeout=30)
        pid = pool.pids()[0]
        time.sleep(0.2)  # the relay thread prints it
    assert "pytest" not in state["modules"] and "tensorflow" not in state["modules"]
    assert "numpy" not in state["modules"]
    err = capfd.readouterr().err
    assert f"[kerasmp-pool-w0-cpu0 slot0 pid {pid}] hello from the worker" in err


def test_tensorflow_start_up_chatter_is_off_by_default(no_leftovers, capfd, monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    with WorkerPool([CPU0]) as pool:
        pool.submit(pool_tasks.add, 1).result(timeout=60)
    assert "absl::InitializeLog" not in capfd.readouterr().err


# ------------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def slow_server():
    ref = ModelRef.from_builder("server_models:linear", delay_s=0.3)
    with InferenceServer(ref, CPU0, max_batch_size=4, max_delay_ms=1, name="slow") as server:
        yield server


def test_an_interrupted_predict_never_leaks_its_answer_into_the_next(slow_server):
    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        for i in range(3):
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            with pytest.raises(KeyboardInterrupt):
                slow_server.predict(np.full((1, 4), 100.0 + i, np.float32))
            x = np.full((2, 4), float(i), np.float32)
            np.testing.assert_allclose(slow_server.predict(x), server_models.expected(x), rtol=1e-5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_zero_row_request_gets_zero_rows_and_bad_input_is_described_as_sent(slow_server):
    out = slow_server.predict(np.zeros((0, 4), np.float32))
    assert out.shape == (0, 3) and out.dtype == np.float32
    with pytest.raises(ValueError, match=r"shape \(5,\)"):  # one sample, as the caller sent it
        slow_server.predict(np.ones(5, np.float32))


def test_close_answers_requests_handed_to_submit_and_later_ones_say_closed(no_leftovers):
    server = InferenceServer(ModelRef.from_builder("server_models:linear"), CPU0, name="closing")
    client = server.client()
    x = np.ones((1, 4), np.float32)
    future = client.submit(x)  # handed to a background thread: may not be sent yet
    server.close()
    np.testing.assert_allclose(future.result(timeout=0), server_models.expected(x), rtol=1e-5)
    with pytest.raises(ServerClosedError, match="was closed by its owner"):
        client.predict(x)
    client.close()


def test_builder_kwargs_may_be_lists_and_dicts():
    ref = ModelRef.from_builder("server_models:layered", layers=[8, 4], options={"act": "relu"})
    assert ref.kwargs == {"layers": [8, 4], "options": {"act": "relu"}}
    assert hash(ref) == hash(ModelRef.from_builder("server_models:layered", layers=[8, 4], options={"act": "relu"}))
    with pytest.raises(TypeError, match=r"builder argument data=.*not hashable"):
        ModelRef.from_builder("server_models:layered", data=np.ones(3))


def test_a_server_started_by_the_forkserver_serves_and_stops(no_leftovers):
    ref = ModelRef.from_builder("server_models:linear")
    with InferenceServer(ref, CPU0, start_method="forkserver", name="forked") as server:
        x = np.ones((3, 4), np.float32)
        np.testing.assert_allclose(server.predict(x), server_models.expected(x), rtol=1e-5)
        pid = server.pid
    assert not _running(pid)
