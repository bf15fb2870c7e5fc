"""InferenceServer on the Ray backend, on the shared loopback cluster: the same batching and
client semantics as the local server; a client in a pool worker on the other node."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("ray")

import server_models  # noqa: E402
import server_tasks  # noqa: E402

from pytest_kerasmp import (  # noqa: E402
    InferenceServer,
    ModelRef,
    ServerClosedError,
    ServerDiedError,
    WorkerPool,
    WorkerStartupError,
)
from pytest_kerasmp.ray.cluster import plan_ray_slots  # noqa: E402

LINEAR = ModelRef.from_builder("server_models:linear")


def test_a_ray_server_batches_and_answers_every_client_once(ray_cluster, no_leftovers):
    slots = plan_ray_slots()
    with InferenceServer(LINEAR, slots[0], backend="ray", max_batch_size=16, name="ray-served") as server:
        assert server.backend.name == "ray" and server.pid
        rng = np.random.default_rng(0)
        one = rng.random(4, dtype=np.float32)
        np.testing.assert_allclose(server.predict(one), server_models.expected(one), rtol=1e-5, atol=1e-6)
        for rows in (1, 7, 50):  # 50 > max_batch_size: split and reassembled
            x = rng.random((rows, 4), dtype=np.float32)
            np.testing.assert_allclose(server.predict(x), server_models.expected(x), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match=r"has shape \(2, 5\) for the model's input 0"):
            server.predict(np.ones((2, 5), np.float32))
        results: list[dict] = []
        threads = [threading.Thread(target=lambda s=s: results.append(server_tasks.hammer(server.client(), s, 30))) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [{"answered": 30, "wrong": 0}] * 4
        # a client pickled to a pool worker on the other node (the same machine: direct)
        with WorkerPool(slots[1:], backend="ray", warm_import=False, name="ray-clients") as pool:
            assert pool.submit(server_tasks.hammer, server.client(), 9, 20).result(timeout=60) == {"answered": 20, "wrong": 0}
            assert pool.submit(server_tasks.route_of, server.client()).result(timeout=60) == "direct"
        # a client on another machine goes through actor calls into the same loop
        remote = server.client()
        remote._direct = (os.getpid(), False)
        assert server_tasks.hammer(remote, 11, 20) == {"answered": 20, "wrong": 0}
        here = server.client()
        assert here.direct() and here.socket_address.startswith(b"\0kerasmp-ray-")
        import ray  # a client unpickled again (one per pool task) asks Ray nothing more

        asked = []
        real_get_actor = ray.get_actor
        ray.get_actor = lambda *a, **k: asked.append(a) or real_get_actor(*a, **k)
        try:
            again = pickle.loads(pickle.dumps(server.client()))
            assert again.direct() and again.predict(one).shape == (3,) and asked == []
        finally:
            ray.get_actor = real_get_actor
        stats = server.stats()
        assert stats["traces"] == 1 and stats["requests"] >= 4 * 30 + 20 + 20
        assert stats["batches"] < stats["requests"], "no request was batched with another"
    with pytest.raises(ServerClosedError, match="was closed by its owner"):
        server.predict(one)


def test_a_slow_answer_times_out_and_close_answers_what_was_accepted(ray_cluster, no_leftovers):
    slow = ModelRef.from_builder("server_models:linear", delay_s=0.5)
    server = InferenceServer(slow, plan_ray_slots()[0], backend="ray", name="ray-slow")
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="did not answer request"):
            server.predict(np.ones(4, np.float32), timeout=0.1)
        assert time.monotonic() - t0 < 3
        accepted = server._client.submit(np.ones((2, 4), np.float32))
        time.sleep(0.1)
    finally:
        server.close(timeout=10)
    np.testing.assert_allclose(accepted.result(timeout=1), server_models.expected(np.ones((2, 4), np.float32)), rtol=1e-5)


def test_a_full_ray_server_queue_answers_busy(ray_cluster, no_leftovers):
    from pytest_kerasmp import ServerBusyError

    slow = ModelRef.from_builder("server_models:linear", delay_s=0.3)
    with InferenceServer(slow, plan_ray_slots()[0], backend="ray", name="ray-busy", max_queue=1, max_batch_size=1) as server:
        client = server.client(busy_timeout_s=0.0)
        futures = [client.submit(np.ones((1, 4), np.float32)) for _ in range(4)]
        outcomes = [type(f.exception(timeout=30)).__name__ for f in futures]
        assert outcomes.count("ServerBusyError") >= 1 and outcomes.count("NoneType") >= 1, outcomes
        assert server.stats()["busy"] >= 1
        assert ServerBusyError.__name__ in outcomes
    # A queue larger than the actor's threads is capped, so that Busy still happens.
    with InferenceServer(LINEAR, plan_ray_slots()[0], backend="ray", name="ray-cap") as capped:
        assert capped.max_queue == 128 and capped.predict(np.ones((1, 4), np.float32)).shape == (1, 3)


def test_a_killed_ray_server_fails_requests_with_server_died(ray_cluster, no_leftovers):
    with InferenceServer(LINEAR, plan_ray_slots()[0], backend="ray", name="ray-dies") as server:
        os.kill(server.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ServerDiedError, match="is gone"):
            server.predict(np.ones(4, np.float32), timeout=20)
        assert time.monotonic() - t0 < 15


def test_a_ray_server_whose_model_fails_to_load_is_a_startup_error(ray_cluster, no_leftovers):
    with pytest.raises(WorkerStartupError, match="No module named 'no_such_module'") as info:
        InferenceServer(ModelRef.from_builder("no_such_module:build"), plan_ray_slots()[0], backend="ray", name="ray-bad")
    assert "Traceback" in str(info.value.__cause__)


def test_a_ray_serve_application_is_called_like_a_server_and_measured_by_the_load_generator(ray_cluster):
    """RayServeClient: submit -> Future, picklable, one event loop per process; through it the
    load generator offers a rate to Ray Serve as to the plugin's servers."""
    import ray
    from ray import serve

    from pytest_kerasmp import LoadGenerator, RayServeClient
    from cpu_slots import CPU1

    @serve.deployment(ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False, "log_level": "WARNING"})
    class Doubler:
        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.001)
        async def __call__(self, xs: list) -> list:
            return [2 * x for x in xs]

    serve.start(proxy_location="Disabled")
    try:
        serve.run(Doubler.bind(), name="doubler", route_prefix=None)
        client = RayServeClient("doubler", ray.get_runtime_context().gcs_address)
        np.testing.assert_array_equal(client.predict(np.arange(3.0)), 2 * np.arange(3.0))
        again = pickle.loads(pickle.dumps(client))
        np.testing.assert_array_equal(again.submit(np.ones(2)).result(30), [2.0, 2.0])
        xs = np.arange(40.0).reshape(20, 2)

        def check(indices: np.ndarray, outputs: np.ndarray) -> None:
            np.testing.assert_array_equal(outputs, 2 * xs[indices])

        with LoadGenerator([CPU1], senders=2, timeout_s=20, name="serve-senders") as generator:
            point = generator.offer(client, xs, 100.0, requests=100, server="ray-serve", check=check)
        assert point.answered == 100 and point.failed == 0 and point.telemetry is None, point.line()
        loops = [client._loop, again._loop]
        client.close()
        again.close()
        assert all(loop.is_closed() for loop in loops), "close() left this process's event loop open"
    finally:
        serve.shutdown()
