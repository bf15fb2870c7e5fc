"""InferenceServer with a real Keras model in a real server process: batching, routing, faults."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

import server_models
import server_tasks
from pytest_kerasmp import InferenceServer, ModelRef, ServerBusyError, ServerDiedError, WorkerPool, WorkerStartupError
from cpu_slots import CPU0

LINEAR = ModelRef.from_builder("server_models:linear")


@pytest.fixture(scope="module")
def server():
    """One server for the tests that do not break it (module scope: the model loads once)."""
    with InferenceServer(LINEAR, CPU0, max_batch_size=16, max_delay_ms=2, name="shared") as server:
        yield server


def test_single_sample_batch_and_oversize_requests_match_the_model(server):
    rng = np.random.default_rng(0)
    one = rng.random(4, dtype=np.float32)
    out = server.predict(one)
    assert out.shape == (3,)
    np.testing.assert_allclose(out, server_models.expected(one), rtol=1e-5, atol=1e-6)
    for rows in (1, 7, 16, 50):  # 50 > max_batch_size: split into batches and reassembled
        x = rng.random((rows, 4), dtype=np.float32)
        np.testing.assert_allclose(server.predict(x), server_models.expected(x), rtol=1e-5, atol=1e-6)
    assert server.predict(np.ones((3, 4), np.float64)).dtype == np.float32  # same-kind cast
    stats = server.stats()
    assert stats["traces"] == 1, "a new batch size retraced the forward function"
    assert stats["requests"] >= 6 and stats["errors"] == 0


def test_the_delay_is_for_an_idle_server_not_for_requests_that_came_while_a_batch_ran(kerasmp_inference_server):
    slow = ModelRef.from_builder("server_models:linear", delay_s=0.3)  # each batch takes 0.3 s
    server = kerasmp_inference_server(slow, CPU0, max_batch_size=16, max_delay_ms=3000, adaptive_delay=False)
    client = server.client()
    full = client.submit(np.ones((16, 4), np.float32))  # a full batch: runs at once
    time.sleep(0.1)
    t0 = time.monotonic()
    late = client.submit(np.ones((1, 4), np.float32))  # came while that batch ran
    late.result(timeout=10)
    assert time.monotonic() - t0 < 2.5, "a request that waited for a running batch also waited max_delay_ms"
    full.result(timeout=10)
    # An idle server waits for company when a connection that sent before may send again:
    # here another thread's, kept open while it waits.
    with another_connection_that_sent(client):
        t0 = time.monotonic()
        client.submit(np.ones((1, 4), np.float32)).result(timeout=10)
        assert time.monotonic() - t0 >= 2.9
    client.close()


@contextlib.contextmanager
def another_connection_that_sent(client):
    """Another thread's connection to the server that sent a request and stays open (a fixed
    delay waits for it to send again)."""
    sent, hold = threading.Event(), threading.Event()

    def other_thread() -> None:
        client.predict(np.ones((1, 4), np.float32))
        sent.set()
        hold.wait(30)

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        assert sent.wait(10)
        yield
    finally:
        hold.set()
        thread.join(10)


@pytest.mark.parametrize("adaptive", [True, False])
def test_an_adaptive_delay_closes_a_batch_when_no_request_is_expected_within_a_compute_time(kerasmp_inference_server, adaptive):
    server = kerasmp_inference_server(LINEAR, CPU0, max_batch_size=16, max_delay_ms=1500, adaptive_delay=adaptive)
    client = server.client()
    with another_connection_that_sent(client):  # a fixed delay waits for it
        waits = []
        for _ in range(2):  # arrivals 0.3 s apart, a batch computes in well under 1 ms
            time.sleep(0.3)
            t0 = time.monotonic()
            client.submit(np.ones((1, 4), np.float32)).result(timeout=10)
            waits.append(time.monotonic() - t0)
    client.close()
    if adaptive:
        assert max(waits) < 1.0, f"requests arriving 0.3 s apart waited {waits} s for company that was not expected"
    else:
        assert min(waits) >= 1.4, f"adaptive_delay=False did not wait max_delay_ms: {waits} s"


def test_the_delay_is_not_spent_waiting_for_requests_no_client_is_expected_to_send(kerasmp_inference_server):
    server = kerasmp_inference_server(LINEAR, CPU0, max_batch_size=16, max_delay_ms=3000)
    client = server.client()
    try:
        t0 = time.monotonic()
        for i in range(3):  # one caller, one request at a time, the server's only client
            x = np.full((1, 4), i, np.float32)
            np.testing.assert_allclose(client.predict(x), server_models.expected(x), rtol=1e-5)
        assert time.monotonic() - t0 < 2.5, "a lone client's request waited max_delay_ms for requests that could not come"
        assert server.stats()["batches"] == 3
    finally:
        client.close()


def test_bad_requests_get_a_clear_error_and_lose_nothing_else(server):
    with pytest.raises(ValueError, match=r"^the request has shape \(2, 5\) for the model's input 0 \('x'\), which takes one sample of shape \(4,\) or a batch of shape \(n, 4\), dtype float32; reshape"):
        server.predict(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="dtype complex64"):
        server.predict(np.ones((2, 4), np.complex64))
    with pytest.raises(ValueError, match="takes 1 input,"):
        server.predict([np.ones((1, 4)), np.ones((1, 4))])
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(server.predict(x), server_models.expected(x), rtol=1e-5)


def test_a_failing_batch_fails_its_requests_and_later_batches_are_served(server):
    bad = np.full((1, 4), np.nan, np.float32)
    with pytest.raises(Exception, match="the batch holds a NaN") as info:
        server.predict(bad)
    assert "Traceback" in str(info.value.__cause__)
    x = np.ones((4, 4), np.float32)
    np.testing.assert_allclose(server.predict(x), server_models.expected(x), rtol=1e-5)
    assert server.stats()["errors"] >= 1


def test_many_client_processes_random_sizes_nothing_lost_duplicated_or_misrouted(server, no_leftovers):
    client = server.client()
    before = server.stats()["requests"]
    with WorkerPool([CPU0] * 8, warm_import=False, name="clients") as pool:
        reports = pool.map(server_tasks.hammer, [client] * 8, range(8), [2000] * 8)
    assert [r["answered"] for r in reports] == [2000] * 8
    assert all(r["wrong"] == 0 for r in reports), reports
    stats = server.stats()
    assert stats["requests"] - before == 16000
    assert stats["mean_batch_size"] > 1.0, "requests from 8 processes were never batched together"


def test_the_async_form_overlaps_requests(server):
    client = server.client()
    xs = [np.full((1, 4), i, np.float32) for i in range(32)]
    futures = [client.submit(x) for x in xs]
    for x, f in zip(xs, futures, strict=True):
        np.testing.assert_allclose(f.result(timeout=30), server_models.expected(x), rtol=1e-5)
    client.close()


def test_multi_input_model_takes_a_list_or_a_dict(no_leftovers, kerasmp_inference_server):
    server = kerasmp_inference_server(ModelRef.from_builder("server_models:two_inputs"), CPU0)
    a, b = np.ones((5, 4), np.float32), np.full((5, 2), 2.0, np.float32)
    np.testing.assert_allclose(server.predict([a, b]), np.full((5, 3), 8.0))
    np.testing.assert_allclose(server.predict({"b": b[0], "a": a[0]}), np.full(3, 8.0))
    with pytest.raises(ValueError, match=r"lacks 1 input \['b'\]"):
        server.predict({"a": a})


# ------------------------------------------------------------------------- faults


def test_server_killed_mid_batch_fails_pending_and_later_calls_fast(no_leftovers, kerasmp_inference_server):
    server = kerasmp_inference_server(ModelRef.from_builder("server_models:linear", delay_s=1.0), CPU0)
    client = server.client()
    futures = [client.submit(np.ones((1, 4), np.float32)) for _ in range(4)]
    time.sleep(0.3)  # the first batch is running
    os.kill(server.pid, signal.SIGKILL)
    t0 = time.perf_counter()
    for f in futures:
        with pytest.raises(ServerDiedError, match="is gone"):
            f.result(timeout=10)
    assert time.perf_counter() - t0 < 2.0
    # "connecting failed", or, when the connection came in the instant before the dying
    # process closed its listening socket, the end of that connection: gone either way.
    t0 = time.perf_counter()
    with pytest.raises(ServerDiedError, match="is gone"):
        server.predict(np.ones((1, 4), np.float32))
    assert time.perf_counter() - t0 < 2.0
    client.close()


def test_server_killed_while_loading_raises_server_died(no_leftovers):
    ref = ModelRef.from_builder("server_models:linear", load_delay_s=60.0)
    me = psutil.Process()

    def kill_the_server() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            new = [c for c in me.children() if c.pid not in known and "resource_tracker" not in " ".join(c.cmdline())]
            if new:
                time.sleep(1.0)  # well into the 60 s load
                new[0].kill()
                return
            time.sleep(0.05)

    known = {c.pid for c in me.children()}
    killer = threading.Thread(target=kill_the_server)
    killer.start()
    t0 = time.perf_counter()
    with pytest.raises(ServerDiedError, match="exited with SIGKILL before it was ready"):
        InferenceServer(ref, CPU0, name="loading")
    assert time.perf_counter() - t0 < 10
    killer.join(30)


def test_a_dying_client_does_not_disturb_the_server(no_leftovers, kerasmp_inference_server):
    server = kerasmp_inference_server(ModelRef.from_builder("server_models:linear", delay_s=0.2), CPU0)
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=server_tasks.send_then_die, args=(server.client(),))
    child.start()
    child.join(30)
    assert child.exitcode == 9
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(server.predict(x), server_models.expected(x), rtol=1e-5)
    assert server.is_alive()


def test_close_answers_every_accepted_request(no_leftovers):
    server = InferenceServer(ModelRef.from_builder("server_models:linear", delay_s=0.2), CPU0, max_batch_size=2)
    client = server.client()
    xs = [np.full((1, 4), i, np.float32) for i in range(8)]
    futures = [client.submit(x) for x in xs]
    deadline = time.monotonic() + 30
    while server.stats()["requests"] < 8:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.close()  # four batches of 0.2 s are still to run
    for x, f in zip(xs, futures, strict=True):
        np.testing.assert_allclose(f.result(timeout=0), server_models.expected(x), rtol=1e-5)
    assert not server.is_alive()
    client.close()


def test_a_full_queue_refuses_with_server_busy(no_leftovers, kerasmp_inference_server):
    server = kerasmp_inference_server(
        ModelRef.from_builder("server_models:linear", delay_s=0.3), CPU0, max_queue=1, max_batch_size=1
    )
    client = server.client(busy_timeout_s=0.0)
    futures = [client.submit(np.ones((1, 4), np.float32)) for _ in range(4)]
    errors = [f.exception(timeout=30) for f in futures]
    outcomes = [type(e).__name__ for e in errors]
    busy = next(e for e in errors if isinstance(e, ServerBusyError))
    assert "queue full (1 requests waiting) for 0 s" in str(busy)
    assert outcomes.count("ServerBusyError") >= 1 and outcomes.count("NoneType") >= 1, outcomes
    assert server.stats()["busy"] >= 1
    patient = server.client(busy_timeout_s=10.0)
    futures = [patient.submit(np.ones((1, 4), np.float32)) for _ in range(3)]
    assert all(f.exception(timeout=30) is None for f in futures)  # waited for room instead
    client.close()
    patient.close()


def test_bad_options_and_a_live_model_are_refused():
    with pytest.raises(TypeError, match="must be a pytest_kerasmp.ModelRef"):
        InferenceServer("model.keras", CPU0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_batch_size"):
        InferenceServer(LINEAR, CPU0, max_batch_size=0)


def test_a_model_that_cannot_load_is_a_startup_error(no_leftovers):
    # A reference made without from_file's check (a file removed since, say): the server says so.
    with pytest.raises(WorkerStartupError, match="failed to start: .*No such file"):
        InferenceServer(ModelRef(path="/nonexistent/m.keras"), CPU0)


def test_a_missing_model_file_is_refused_at_once_naming_the_path(tmp_path, monkeypatch):
    from pytest_kerasmp.modelref import MODEL_FILE_MISSING

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        ModelRef.from_file("missing.keras")
    where = f" (given as 'missing.keras', from {str(tmp_path)!r})"
    assert str(info.value) == MODEL_FILE_MISSING.format(path=str(tmp_path / "missing.keras"), where=where)
    with pytest.raises(ValueError, match="is not a .keras file"):
        ModelRef.from_file(tmp_path / "model.h5")


def test_fixture_starts_on_the_session_slot_and_stops_at_teardown(pytester, run_pytest):
    pytester.makepyfile(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(server_models.__file__)!r})
        import numpy as np, psutil
        from pytest_kerasmp import ModelRef

        PIDS = []

        def test_serve(kerasmp_inference_server):
            server = kerasmp_inference_server(ModelRef.from_builder("server_models:linear"))
            PIDS.append(server.pid)
            assert server.predict(np.ones(4, np.float32)).shape == (3,)

        def test_stopped():
            assert not psutil.pid_exists(PIDS[0]) or psutil.Process(PIDS[0]).status() == "zombie"
        """
    )
    result = run_pytest("--kerasmp-gpus=1")
    result.assert_outcomes(passed=2)
