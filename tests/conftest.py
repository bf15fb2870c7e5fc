from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest

#: Bound for every child pytest or Python process a test starts.
CHILD_TIMEOUT_S = 120

XDIST_ENV = ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID")


@pytest.fixture(autouse=True)
def _deterministic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Child processes see no GPU unless a test fakes some, and no outer kerasmp settings."""
    for key in [k for k in os.environ if k.startswith("PYTEST_KERASMP_")] + list(XDIST_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYTEST_KERASMP_FAKE_GPUS", "0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def run_pytest(pytester: pytest.Pytester) -> Callable[..., pytest.RunResult]:
    """Run pytest in a subprocess of the pytester directory, bounded by CHILD_TIMEOUT_S."""

    def run(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=CHILD_TIMEOUT_S)

    return run


@pytest.fixture
def run_python(tmp_path) -> Callable[[str], subprocess.CompletedProcess[str]]:
    """Run a Python script in a fresh interpreter, bounded by CHILD_TIMEOUT_S."""

    def run(source: str) -> subprocess.CompletedProcess[str]:
        script = tmp_path / "script.py"
        script.write_text(textwrap.dedent(source))
        return subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
        )

    return run


#: A test module that records, per process, what it is pinned to and what TensorFlow sees.
PROBE = """
import json, os, pathlib

from pytest_kerasmp import current_slot

def test_probe(kerasmp_slots):
    record = {
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "cores": sorted(os.sched_getaffinity(0)),
        "slot": current_slot().to_json() if current_slot() else None,
        "n_slots": len(kerasmp_slots),
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "growth": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH"),
    }
    if os.environ.get("PROBE_TF"):
        import tensorflow as tf
        assert float(tf.reduce_sum(tf.ones((64, 64)))) == 4096.0
        record["intra"] = tf.config.threading.get_intra_op_parallelism_threads()
        record["inter"] = tf.config.threading.get_inter_op_parallelism_threads()
        record["tf_cpus"] = len(tf.config.list_physical_devices("CPU"))
        record["tf_gpus"] = len(tf.config.list_physical_devices("GPU"))
    out = pathlib.Path(os.environ["PROBE_DIR"]) / (record["worker"] + ".json")
    out.write_text(json.dumps(record))
"""


@pytest.fixture
def probe(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    """Writes PROBE as the test module; returns a reader of the per-process records."""
    pytester.makepyfile(test_probe=PROBE)
    out = pytester.mkdir("probe-out")
    monkeypatch.setenv("PROBE_DIR", str(out))

    def records() -> dict[str, dict]:
        """Records by process: "main" or the xdist worker id."""
        return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}

    return records


def _leftover_children() -> set[int]:
    import psutil

    keep = ("forkserver", "resource_tracker")  # multiprocessing's own helpers, one per parent
    me = psutil.Process()
    found = set()
    for p in me.children(recursive=True):
        try:
            helper = p.ppid() == me.pid and any(k in " ".join(p.cmdline()) for k in keep)
            # A Ray node keeps idle workers for reuse; they end with the cluster, which the
            # ray_cluster fixture checks. Actors (pools, servers) must end with their test.
            # A worker Ray is starting (to keep idle) is named python until it is ready.
            name = p.name()
            helper = helper or name.startswith("ray::IDLE") or (
                not name.startswith("ray::") and "default_worker.py" in " ".join(p.cmdline())
            )
            zombie = p.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            continue  # gone meanwhile
        if not helper and not zombie:  # a forkserver's children are workers: they count
            found.add(p.pid)
    return found


def running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def arena_maps() -> list[str]:
    """This process's mappings of pytest-kerasmp shared-memory arenas (memfd files)."""
    with open("/proc/self/maps") as maps:
        return [line for line in maps if "kerasmp-arena" in line]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kerasmp_expect_broken: the test leaves a broken pool on purpose (the leak guard allows it)"
    )


def _broken_pools() -> set[int]:
    from pytest_kerasmp.runtime.process import owners
    from pytest_kerasmp.runtime.pool.workerpool import WorkerPool

    return {id(o) for o in list(owners._owners) if isinstance(o, WorkerPool) and o._dispatcher.broken}


@pytest.fixture(scope="session")
def ray_cluster():
    """One loopback-only local Ray cluster of 2 nodes (1 CPU each) for every Ray test; at
    its end every process it started must be gone (LocalRayCluster.shutdown checks)."""
    pytest.importorskip("ray")
    from pytest_kerasmp.ray.cluster import LocalRayCluster

    cluster = LocalRayCluster(2, cpus_per_node=1)
    yield cluster
    cluster.shutdown()


@pytest.fixture(autouse=True)
def _leak_guard(request: pytest.FixtureRequest):
    """After every test: no process the test started still runs (pools and servers of broader
    fixtures were started before), and no pool it left open is broken, unless it is marked
    ``kerasmp_expect_broken``."""
    import time

    from pytest_kerasmp.runtime.process import lifecycle

    children = _leftover_children()
    ours = {id(c) for c in lifecycle.live_children()}
    broken = _broken_pools()
    yield
    deadline = time.monotonic() + 10
    while _leftover_children() - children and time.monotonic() < deadline:
        time.sleep(0.1)
    # A leak stays; a process that lives for an instant (Ray starting a helper) does not: count
    # what is there in two looks 0.2 s apart (a one-look check failed on a pid gone at once).
    outlived = _leftover_children() - children
    if outlived:
        time.sleep(0.2)
        outlived &= _leftover_children()
    left = [c.name for c in lifecycle.live_children() if id(c) not in ours]
    assert not outlived, f"processes outlived the test: {left or sorted(outlived)}"
    assert not left, f"plugin children not stopped at the end of the test: {left}"
    if request.node.get_closest_marker("kerasmp_expect_broken") is None:
        assert not _broken_pools() - broken, "the test left a broken pool open"


def _held_arena_maps() -> int:
    """Arena mappings that live pools hold legitimately (a session pool outlives a module)."""
    from pytest_kerasmp.runtime.process import owners
    from pytest_kerasmp.runtime.pool.workerpool import WorkerPool

    held = 0
    for owner in list(owners._owners):
        if isinstance(owner, WorkerPool) and owner.start_method != "ray":
            for w in owner._dispatcher.workers:
                held += (w.to_worker.map is not None) + sum(a.map is not None for a in w.from_worker.arenas)
    return held


@pytest.fixture(scope="module", autouse=True)
def _arena_guard():
    """After each test module (and its module fixtures) is done: no shared-memory arena
    mapping left beyond those the still-open pools hold."""
    import gc

    before = len(arena_maps()) - _held_arena_maps()
    yield
    gc.collect()
    left = len(arena_maps()) - _held_arena_maps()
    assert left <= before, f"{left - before} shared-memory arena mapping(s) outlived this module's pools, servers and clients"


@pytest.fixture
def no_leftovers():
    """After the test: no mapping of a shared-memory arena beyond those held before it (every
    pool, server and client the test made is closed), on top of the leak guard."""
    import gc

    before = len(arena_maps())
    yield
    gc.collect()
    assert len(arena_maps()) <= before, "shared-memory arenas outlived their pool or server"


# ------------------------------------------- one body per fault, on both execution backends


@pytest.fixture(scope="session", params=["local", "ray"])
def execution_backend(request):
    """An execution backend and a slot on it (session-scoped, so that Ray's cluster starts
    before any test's leak guard looks at this process's children)."""
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
        from pytest_kerasmp import plan_ray_slots

        return "ray", plan_ray_slots()[0]
    from cpu_slots import CPU0

    return "local", CPU0


@pytest.fixture
def make_pool(execution_backend, no_leftovers):
    """Factory of one-slot pools (numpy only) on the execution backend the test runs on: the
    same fault, the same promise, whichever backend runs the workers."""
    from pytest_kerasmp import WorkerPool

    backend, slot = execution_backend
    made = []

    def make(**options):
        pool = WorkerPool([slot], warm_import=False, backend=backend, name=f"{backend}{len(made)}", **options)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close(timeout=10)
