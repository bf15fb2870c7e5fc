"""Scenario fixtures shared by the files that run a pattern on both backends."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every scenario compares serial with parallel on all the session's slots: each test
    leases all of them (a test that sets its own kerasmp_slots marker keeps it)."""
    for item in items:
        if item.get_closest_marker("kerasmp_slots") is None:
            item.add_marker(pytest.mark.kerasmp_slots("all"))


@pytest.fixture(scope="session")
def ray_cluster(kerasmp_worker_slots):
    """A loopback-only local Ray cluster of 2 nodes for the Ray variants (session; skipped
    without Ray). Each node runs on half of the session's cores and offers 2 CPUs, so that,
    as on the local backend, a one-slot reference pool and a pool over every node coexist."""
    pytest.importorskip("ray")
    from pytest_kerasmp import LocalRayCluster

    cluster = LocalRayCluster(2, cpus_per_node=2, cores=sorted({c for s in kerasmp_worker_slots for c in s.cores}) or None)
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_slots(ray_cluster):
    """One Ray slot of 1 CPU per node (the first of each node), then the rest."""
    from pytest_kerasmp import plan_ray_slots

    slots = plan_ray_slots()
    first = [s for s in slots if s.cores == (0,)]
    return first + [s for s in slots if s not in first]


@pytest.fixture(scope="session")
def helper_start_method(kerasmp_worker_slots):
    """How the scenarios start the pools that only serve a measurement (the serial side, the
    clients' own model copies): on CPU slots a forkserver (one TensorFlow import for all of
    them; a pool of 8 then starts in well under a second, against some 14 s spawned on 2
    cores), on GPUs spawn (a forked worker's GPU pin is not checked on a GPU here)."""
    return "forkserver" if all(s.kind == "CPU" for s in kerasmp_worker_slots) else "spawn"
