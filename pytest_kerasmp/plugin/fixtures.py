"""Fixtures of pytest-kerasmp; ``plugin.py`` registers them. Each wraps a public function.

Their defaults follow the session's placement (``placement``): without xdist this process
owns every slot of the session; under ``-n`` xdist worker gwK owns its part, and its pools
and servers stay on it, so processes of different workers never share a slot (unless -n
exceeds the number of slots, which the header says).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from pytest_kerasmp.errors import CLUSTER_SLOTS_LEASED, CLUSTER_SLOTS_PER_XDIST_WORKER
from pytest_kerasmp.modelref import ModelRef
from pytest_kerasmp.plugin.config import session_plan, session_settings
from pytest_kerasmp.plugin.leasing import slots_of
from pytest_kerasmp.plugin.sessionguard import SESSION_POOL_KEY
from pytest_kerasmp.plugin.speedup import Speedup
from pytest_kerasmp.runtime.cluster.cluster import KerasCluster, TFCluster
from pytest_kerasmp.runtime.pool.workerpool import WorkerPool
from pytest_kerasmp.runtime.serve.server import InferenceServer
from pytest_kerasmp.slots.devices import DeviceSlot, plural
from pytest_kerasmp.slots.pinning import current_slot
from pytest_kerasmp.slots.seeding import base_seed

if TYPE_CHECKING:
    from pytest_kerasmp.load import LoadGenerator

#: kerasmp_device in a process that no slot was asked for.
DEVICE_UNPINNED = (
    "kerasmp_device: this process is not pinned to a device slot ({why}); pass "
    "--kerasmp-gpus=N (or auto), or set kerasmp_gpus in the ini file or PYTEST_KERASMP_GPUS"
)


@pytest.fixture
def kerasmp_slots(pytestconfig: pytest.Config, request: pytest.FixtureRequest) -> tuple[DeviceSlot, ...]:
    """The device slots of this test (function scope; --kerasmp-gpus, @pytest.mark.kerasmp_slots(n)).

    Under --kerasmp-gpus the slots leased to this test: its process's own slot, or n of them
    (its own first) for a test marked kerasmp_slots(n), and the session pool's slots too when
    it uses kerasmp_pool. With --kerasmp-leases=off, or without --kerasmp-gpus: the slots this
    process owns (kerasmp_worker_slots). Under --kerasmp-ray: the Ray cluster's slots.
    """
    if pytestconfig.getoption("kerasmp_ray", None):
        slots: tuple[DeviceSlot, ...] = request.getfixturevalue("kerasmp_ray")
        return slots
    return slots_of(request.node) or session_plan(pytestconfig).own_slots


@pytest.fixture(scope="session")
def kerasmp_worker_slots(pytestconfig: pytest.Config, request: pytest.FixtureRequest) -> tuple[DeviceSlot, ...]:
    """The device slots this pytest process owns for the session (session; for session fixtures).

    Without -n: every slot of the session. Under -n: this xdist worker's part of them (the
    header shows the parts). Under --kerasmp-ray: the Ray cluster's slots. A test uses
    kerasmp_slots, which are the slots leased to it.
    """
    if pytestconfig.getoption("kerasmp_ray", None):
        slots: tuple[DeviceSlot, ...] = request.getfixturevalue("kerasmp_ray")
        return slots
    return session_plan(pytestconfig).own_slots


@pytest.fixture
def kerasmp_device(pytestconfig: pytest.Config) -> DeviceSlot:
    """The slot this process is pinned to; fails when no slot was asked for (--kerasmp-gpus).

    Without -n: slot0. Under -n: the first slot of this xdist worker's part.
    """
    slot = current_slot()
    if slot is None:
        source = session_settings(pytestconfig).gpus_source
        why = "slots are off" if source != "the default" else "no --kerasmp-gpus"
        pytest.fail(DEVICE_UNPINNED.format(why=f"{why}, from {source}"), pytrace=False)
    return slot


@pytest.fixture(scope="session")
def kerasmp_pool(kerasmp_worker_slots: tuple[DeviceSlot, ...], request: pytest.FixtureRequest) -> Iterator[WorkerPool]:
    """A warm WorkerPool, one spawn worker per slot this process owns (session; --kerasmp-gpus, --kerasmp-ray).

    Without -n: one worker per session slot. Under -n: one per slot of this xdist worker's part.
    Under --kerasmp-ray: one Ray actor per slot of the cluster. Never handed out closed or
    broken: a test that closed or broke it leaves it restarted for the next (the summary says so).
    """
    with WorkerPool(kerasmp_worker_slots, name="session", **_backend(request)) as pool:
        request.config.stash[SESSION_POOL_KEY] = pool  # a test that closes or breaks it: restarted (sessionguard)
        try:
            yield pool
        finally:
            del request.config.stash[SESSION_POOL_KEY]


@pytest.fixture
def kerasmp_pool_factory(
    kerasmp_slots: tuple[DeviceSlot, ...], request: pytest.FixtureRequest
) -> Iterator[Callable[..., WorkerPool]]:
    """Factory: make_pool(slots=None, **options) -> WorkerPool, closed at test end (function).

    ``slots`` defaults to the slots this process owns: all without -n, this xdist worker's
    part under -n.
    """
    pools: list[WorkerPool] = []

    def make_pool(slots: Sequence[DeviceSlot] | None = None, **options: Any) -> WorkerPool:
        options.setdefault("name", f"factory{len(pools)}")
        options = {**_backend(request), **options}
        pool = WorkerPool(kerasmp_slots if slots is None else slots, **options)
        pools.append(pool)
        return pool

    yield make_pool
    for pool in pools:
        pool.close(timeout=30.0, cancel_pending=True)


@pytest.fixture(scope="session")
def kerasmp_load_generator(kerasmp_worker_slots: tuple[DeviceSlot, ...]) -> Iterator[LoadGenerator]:
    """A LoadGenerator: 4 sender processes on the slots this process owns other than its first
    (where ``kerasmp_inference_server`` puts a server; with one slot, on it) (session).

    ``offer(client, samples, rate, requests=...)`` -> LoadPoint: Poisson arrivals at ``rate``
    per second to any client with ``submit``, latency percentiles with confidence bounds.
    """
    from pytest_kerasmp.load import LoadGenerator  # numpy only when used

    with LoadGenerator(kerasmp_worker_slots[1:] or kerasmp_worker_slots, senders=4, name="load") as generator:
        yield generator


@pytest.fixture
def kerasmp_speedup(request: pytest.FixtureRequest) -> Speedup:
    """measure(serial, parallel, *, workers, rounds=5, variant="", check=None, kind="speedup",
    budget_s=None, warmup=True) -> Comparison; and ``.record(baseline_s, candidate_s, *,
    workers, variant="", kind="speedup", correct=None, extra=None)`` -> Comparison, for
    paired rounds the test measured itself (seconds per unit of work on each side).

    Rounds continue until the ratio's 95% interval decides its floors (--kerasmp-min-speedup,
    --kerasmp-budget). Under --benchmark-skip the check still runs once, untimed.

    Under -n: timed in its own rounds (pytest-benchmark switches itself off), sent to the
    controller's summary, and marked * there when a process of another xdist worker was on
    this worker's slots meanwhile (always, without --kerasmp-gpus: every worker uses every core).
    """
    config = request.config
    skip = config.getoption("benchmark_skip", False) and not config.getoption("benchmark_only", False)
    # Asked for only when the rounds start, so a failed check leaves pytest-benchmark quiet.
    benchmark = None if skip else (lambda: request.getfixturevalue("benchmark"))
    return Speedup(request.node, benchmark)


@pytest.fixture(scope="session")
def kerasmp_seed() -> int | None:
    """The run's base seed (session; --kerasmp-seed), or None when the run is not seeded.

    Derive a seed per task with ``derive_seed(kerasmp_seed, index, "task")`` so that serial
    and parallel runs of the same task use the same seed.
    """
    return base_seed()


@pytest.fixture
def kerasmp_inference_server(
    kerasmp_slots: tuple[DeviceSlot, ...], request: pytest.FixtureRequest
) -> Iterator[Callable[..., InferenceServer]]:
    """Factory: start(model_ref, slot=None, **options) -> InferenceServer, closed at test end.

    ``slot`` defaults to the first slot this process owns: slot0 without -n, the first
    slot of this xdist worker's part under -n.
    """
    servers: list[InferenceServer] = []

    def start(model_ref: ModelRef, slot: DeviceSlot | None = None, **options: Any) -> InferenceServer:
        options.setdefault("name", f"server{len(servers)}")
        options = {**_backend(request), **options}
        server = InferenceServer(model_ref, kerasmp_slots[0] if slot is None else slot, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close(timeout=30.0)


@pytest.fixture
def kerasmp_tf_cluster(
    kerasmp_slots: tuple[DeviceSlot, ...], pytestconfig: pytest.Config, request: pytest.FixtureRequest,
) -> Iterator[Callable[..., TFCluster]]:
    """Factory: make(workers=2, **options) -> TFCluster, closed at test end (function).

    Each task on its own slot of those this process owns (``--kerasmp-gpus=N`` with N >= the
    number of tasks; under -n, this xdist worker's part). The cluster stays warm across the
    test's ``run`` calls; for one warm cluster across a module, make a module-scoped fixture
    that yields ``TFCluster(...)`` as a context manager.
    """
    yield from _clusters(TFCluster, kerasmp_slots, pytestconfig, slots_of(request.node) is not None)


@pytest.fixture
def kerasmp_keras_cluster(
    kerasmp_slots: tuple[DeviceSlot, ...], pytestconfig: pytest.Config, request: pytest.FixtureRequest,
) -> Iterator[Callable[..., KerasCluster]]:
    """Factory: make(workers=2, **options) -> KerasCluster for the session's Keras backend,
    closed at test end (function).

    As kerasmp_tf_cluster, with each task's environment from the backend (TF_CONFIG; JAX's
    coordinator on 127.0.0.1; torch's MASTER_ADDR/RANK/WORLD_SIZE); in a task,
    pytest_kerasmp.init_distributed() joins the others. --kerasmp-keras-backend picks it.
    """
    yield from _clusters(KerasCluster, kerasmp_slots, pytestconfig, slots_of(request.node) is not None)


def _clusters(
    cls: type[KerasCluster], kerasmp_slots: tuple[DeviceSlot, ...], pytestconfig: pytest.Config, leased: bool,
) -> Iterator[Callable[..., Any]]:
    clusters: list[KerasCluster] = []

    def make(workers: int = 2, **options: Any) -> KerasCluster:
        options.setdefault("name", f"cluster{len(clusters)}")
        if "slots" not in options and isinstance(workers, int) and workers > 0:
            _check_worker_part(pytestconfig, kerasmp_slots, workers, bool(options.get("chief")), options["name"], leased)
        options.setdefault("slots", kerasmp_slots)  # the first ones, one per task
        cluster = cls(workers, **options)
        clusters.append(cluster)
        return cluster

    yield make
    with contextlib.ExitStack() as stack:  # every cluster is closed, even if one close raises
        for cluster in clusters:
            stack.callback(cluster.close, timeout=30.0)


def _check_worker_part(config: pytest.Config, owned: Sequence[DeviceSlot], workers: int, chief: bool, name: str,
                       leased: bool) -> None:
    """Too few slots for a cluster: under leases, say which marker leases enough; under -n
    without them, how many each xdist worker needs and the --kerasmp-gpus that gives them that
    (the worker's part is what it owns, not the session)."""
    plan = session_plan(config)
    tasks = workers + chief
    names = ", ".join((["chief:0"] if chief else []) + [f"worker:{i}" for i in range(workers)])
    if leased and len(owned) < tasks:
        raise ValueError(CLUSTER_SLOTS_LEASED.format(
            cluster=name, tasks=tasks, names=names, leased=plural(len(owned), "slot"),
            described="; ".join(s.describe() for s in owned),
        ))
    if plan.role != "worker" or plan.workers < 2 or len(owned) >= tasks or config.getoption("kerasmp_ray", None):
        return  # without -n, TFCluster's own message says what to pass
    raise ValueError(CLUSTER_SLOTS_PER_XDIST_WORKER.format(
        cluster=name, tasks=tasks, names=names, worker=plan.worker_id, owned=plural(len(owned), "slot"),
        described="; ".join(s.describe() for s in owned), total=plural(len(plan.slots), "slot"),
        workers=plan.workers, need=tasks * plan.workers,
    ))


@pytest.fixture(scope="session")
def kerasmp_scale(pytestconfig: pytest.Config) -> float:
    """Workload scale factor for scenarios (session; --kerasmp-scale, default 1); the same under -n."""
    return float(pytestconfig.getoption("kerasmp_scale") or 1)


@pytest.fixture(scope="session")
def kerasmp_ray(pytestconfig: pytest.Config) -> Iterator[tuple[DeviceSlot, ...] | None]:
    """The slots planned on the Ray cluster of --kerasmp-ray (session), or None without it.

    ``local`` starts a one-node cluster on loopback with this process's usable cores, ended
    (every process checked) at the session's end; an address connects to that cluster.
    """
    address = pytestconfig.getoption("kerasmp_ray", None)
    if not address:
        yield None
        return
    from pytest_kerasmp.errors import RAY_OPTION_UNREACHABLE, RayConnectError
    from pytest_kerasmp.plugin.config import RAY_OPTION, RAY_TIMEOUT_OPTION
    from pytest_kerasmp.ray.cluster import LocalRayCluster, connect, plan_ray_slots

    cluster = None
    if address == "local":
        from pytest_kerasmp.slots.devices import usable_cores

        cluster = LocalRayCluster(1, cpus_per_node=len(usable_cores()))
    else:
        failed = None
        try:
            connect(address, timeout_s=session_settings(pytestconfig).ray_timeout_s)
        except RayConnectError as exc:
            failed = exc.worded_for(RAY_TIMEOUT_OPTION)
        if failed is not None:  # one line, not a traceback in every test that needs the cluster
            pytest.fail(RAY_OPTION_UNREACHABLE.format(option=RAY_OPTION, address=address, source="the command line", error=failed), pytrace=False)
    try:
        yield plan_ray_slots()
    finally:
        if cluster is not None:
            cluster.shutdown()


def _backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Options that put a fixture's pool or server on Ray under --kerasmp-ray. They do not
    reserve their slots' CPUs in Ray, so fixtures share slots as they do locally (a session
    pool would otherwise hold them, and a factory's pool would wait for them)."""
    if not request.config.getoption("kerasmp_ray", None):
        return {}
    from pytest_kerasmp.ray.backend import RayBackend

    return {"backend": RayBackend(reserve=False)}
