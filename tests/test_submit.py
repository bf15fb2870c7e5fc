"""client.submit: small requests pipelined on one connection per process, larger ones by a
thread; each answered once with its own rows, bounded by its own timeout, also when another
request's send is interrupted or another client stalls the server mid-message."""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time

import numpy as np
import pytest
import server_models

from pytest_kerasmp import ModelRef
from pytest_kerasmp.runtime.serve.child import STALL_S
from cpu_slots import CPU0

LINEAR = ModelRef.from_builder("server_models:linear")


def slow(delay_s: float) -> ModelRef:
    return ModelRef.from_builder("server_models:linear", delay_s=delay_s)


def test_many_requests_in_flight_each_get_their_own_rows(no_leftovers, kerasmp_inference_server):
    client = kerasmp_inference_server(LINEAR, CPU0).client()
    rng = np.random.default_rng(0)
    small = [rng.random((int(rng.integers(1, 9)), 4), dtype=np.float32) + i for i in range(200)]
    large = rng.random((5000, 4), dtype=np.float32)  # 80 KB: by the thread pool and the arenas
    try:
        futures = [client.submit(x) for x in small]
        readers = [t for t in threading.enumerate() if t.name == "kerasmp-client-reader"]
        assert len(readers) == 1 and not [t for t in threading.enumerate() if t.name.startswith("kerasmp-client_")], (
            "small submitted requests did not share one pipeline"
        )
        big, empty, one = client.submit(large), client.submit(np.ones((0, 4), np.float32)), client.submit(small[7][0])
        bad = client.submit(np.ones((2, 5), np.float32))
        for x, f in zip(small, futures, strict=True):
            np.testing.assert_allclose(f.result(timeout=30), server_models.expected(x), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(big.result(timeout=30), server_models.expected(large), rtol=1e-4, atol=1e-3)
        assert empty.result(timeout=30).shape == (0, 3)
        answer = one.result(timeout=30)
        np.testing.assert_allclose(answer, server_models.expected(small[7][0]), rtol=1e-4, atol=1e-3)
        answer += 1  # the caller's own array, as predict's
        with pytest.raises(ValueError, match=r"shape \(2, 5\)"):
            bad.result(timeout=30)
    finally:
        client.close()


def test_a_request_times_out_alone_and_its_late_answer_reaches_no_other(no_leftovers, kerasmp_inference_server):
    client = kerasmp_inference_server(slow(2.0), CPU0).client()
    first, second = np.full((1, 4), 1.0, np.float32), np.full((1, 4), 2.0, np.float32)
    try:
        t0 = time.monotonic()
        late = client.submit(first, timeout=0.2)
        with pytest.raises(TimeoutError, match=r"did not answer request #\d+ of process \d+ within 0.2 s"):
            late.result(timeout=10)
        assert time.monotonic() - t0 < 1.5, "a submitted request outlived its timeout (its answer takes 2 s)"
        np.testing.assert_allclose(client.submit(second).result(timeout=10), server_models.expected(second), rtol=1e-5)
        cancelled = client.submit(first)
        assert cancelled.cancel()  # its answer then comes to a cancelled future: ignored
        np.testing.assert_allclose(client.submit(second).result(timeout=10), server_models.expected(second), rtol=1e-5)
    finally:
        client.close()


def test_close_waits_for_the_submitted_requests(no_leftovers, kerasmp_inference_server):
    client = kerasmp_inference_server(slow(0.3), CPU0).client()
    x = np.ones((2, 4), np.float32)
    futures = [client.submit(x) for _ in range(3)]
    client.close()
    assert all(f.done() for f in futures)
    for f in futures:
        np.testing.assert_allclose(f.result(timeout=0), server_models.expected(x), rtol=1e-5)


def test_an_interrupted_send_fails_the_requests_on_its_connection_and_no_others(no_leftovers, kerasmp_inference_server):
    server = kerasmp_inference_server(slow(1.0), CPU0)
    client = server.client()
    big = np.ones((3800, 4), np.float32)  # 60 KB, just under the size that goes by the arenas
    futures = [client.submit(np.ones((1, 4), np.float32))]  # a 1 s batch: the server reads nothing meanwhile
    time.sleep(0.2)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.4)  # while a send waits for room in the full socket
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in range(200):
                futures.append(client.submit(big))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    try:
        for f in futures:
            with pytest.raises(ConnectionError, match="another request's send on the same connection was interrupted"):
                f.result(timeout=10)
        x = np.full((3, 4), 5.0, np.float32)  # a new connection, and the server is fine
        np.testing.assert_allclose(client.submit(x).result(timeout=10), server_models.expected(x), rtol=1e-5)
        np.testing.assert_allclose(server.predict(x), server_models.expected(x), rtol=1e-5)
    finally:
        client.close()


def test_a_client_stalled_mid_message_is_dropped_and_the_others_are_served(no_leftovers, kerasmp_inference_server):
    server = kerasmp_inference_server(LINEAR, CPU0)
    client = server.client()
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stalled.connect(client.socket_address)
        stalled.sendall(struct.pack("!i", 1000) + b"0123456789")  # 10 of 1,000 bytes, then nothing
        time.sleep(0.2)  # the server is reading it now
        x = np.ones((1, 4), np.float32)
        t0 = time.monotonic()
        np.testing.assert_allclose(client.predict(x, timeout=STALL_S + 10), server_models.expected(x), rtol=1e-5)
        assert time.monotonic() - t0 < STALL_S + 3
        stalled.settimeout(5)
        assert stalled.recv(1) == b"", "the stalled client's connection was not dropped"
    finally:
        stalled.close()
        client.close()


def test_a_burst_that_fills_both_directions_of_the_socket_is_answered(no_leftovers, kerasmp_inference_server):
    # 60 KB requests and 45 KB answers, 100 of each, more than the socket holds either way:
    # the caller may wait for room to send while answers arrive, which the reader must keep
    # reading (it never waits for a sender).
    client = kerasmp_inference_server(LINEAR, CPU0, max_batch_size=4096, max_queue=1000).client()
    xs = [np.full((3800, 4), i, np.float32) for i in range(100)]
    try:
        t0 = time.monotonic()
        futures = [client.submit(x) for x in xs]
        for x, f in zip(xs, futures, strict=True):
            np.testing.assert_allclose(f.result(timeout=30), server_models.expected(x), rtol=1e-4)
        assert time.monotonic() - t0 < 20
    finally:
        client.close()
