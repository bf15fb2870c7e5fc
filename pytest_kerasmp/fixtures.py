"""Fixtures of pytest-kerasmp; ``plugin.py`` registers them. Each wraps a public function."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from pytest_kerasmp.comparison import Comparison
from pytest_kerasmp.config import session_plan
from pytest_kerasmp.devices import DeviceSlot
from pytest_kerasmp.modelref import ModelRef
from pytest_kerasmp.pinning import current_slot
from pytest_kerasmp.pool import WorkerPool
from pytest_kerasmp.seeding import base_seed
from pytest_kerasmp.server import InferenceServer
from pytest_kerasmp.speedup import measure


@pytest.fixture(scope="session")
def kerasmp_slots(pytestconfig: pytest.Config) -> tuple[DeviceSlot, ...]:
    """All device slots of this session (session scope; --kerasmp-gpus, --kerasmp-gpu-memory)."""
    return session_plan(pytestconfig).slots


@pytest.fixture
def kerasmp_device() -> DeviceSlot | None:
    """The slot this process is pinned to, or None when it is not pinned (--kerasmp-gpus)."""
    return current_slot()


@pytest.fixture(scope="session")
def kerasmp_pool(kerasmp_slots: tuple[DeviceSlot, ...]) -> Iterator[WorkerPool]:
    """A warm WorkerPool, one spawn worker per session slot (session scope; --kerasmp-gpus)."""
    with WorkerPool(kerasmp_slots, name="session") as pool:
        yield pool


@pytest.fixture
def kerasmp_pool_factory(
    kerasmp_slots: tuple[DeviceSlot, ...],
) -> Iterator[Callable[..., WorkerPool]]:
    """Factory: make_pool(slots=None, **options) -> WorkerPool, closed at test end (function)."""
    pools: list[WorkerPool] = []

    def make_pool(slots: Sequence[DeviceSlot] | None = None, **options: Any) -> WorkerPool:
        options.setdefault("name", f"factory{len(pools)}")
        pool = WorkerPool(kerasmp_slots if slots is None else slots, **options)
        pools.append(pool)
        return pool

    yield make_pool
    for pool in pools:
        pool.close(timeout=30.0, cancel_pending=True)


@pytest.fixture
def kerasmp_speedup(request: pytest.FixtureRequest) -> Callable[..., Comparison]:
    """measure(serial, parallel, *, workers, rounds=5, variant="", check=None, kind="speedup") -> Comparison.

    Rounds continue until the ratio's 95% interval decides its floors (--kerasmp-min-speedup,
    --kerasmp-budget). Under --benchmark-skip the check still runs once, untimed.
    """
    config = request.config
    skip = config.getoption("benchmark_skip", False) and not config.getoption("benchmark_only", False)
    # Asked for only when the rounds start, so a failed check leaves pytest-benchmark quiet.
    benchmark = None if skip else (lambda: request.getfixturevalue("benchmark"))
    return functools.partial(measure, request.node, benchmark)


@pytest.fixture(scope="session")
def kerasmp_seed() -> int | None:
    """The run's base seed (session; --kerasmp-seed), or None when the run is not seeded.

    Derive a seed per task with ``derive_seed(kerasmp_seed, index, "task")`` so that serial
    and parallel runs of the same task use the same seed.
    """
    return base_seed()


@pytest.fixture
def kerasmp_inference_server(
    kerasmp_slots: tuple[DeviceSlot, ...],
) -> Iterator[Callable[..., InferenceServer]]:
    """Factory: start(model_ref, slot=None, **options) -> InferenceServer on slot 0, closed at test end."""
    servers: list[InferenceServer] = []

    def start(model_ref: ModelRef, slot: DeviceSlot | None = None, **options: Any) -> InferenceServer:
        options.setdefault("name", f"server{len(servers)}")
        server = InferenceServer(model_ref, kerasmp_slots[0] if slot is None else slot, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close(timeout=30.0)


@pytest.fixture(scope="session")
def kerasmp_scale(pytestconfig: pytest.Config) -> float:
    """Workload scale factor for scenarios (session; --kerasmp-scale, default 1)."""
    return float(pytestconfig.getoption("kerasmp_scale") or 1)
