"""--kerasmp-ray: the plugin's fixtures on a Ray cluster the session starts (loopback)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

USES_RAY = """
import numpy as np
from pytest_kerasmp import ModelRef

def add(a, b):
    return a + b

# On Ray a slot's CPUs are reserved: the function-scoped pool and server take one slot
# each and end with the test, before the session pool takes every slot.
def test_1_factories_run_on_ray(kerasmp_slots, kerasmp_pool_factory, kerasmp_inference_server):
    assert len(kerasmp_slots) >= 2 and all(s.node for s in kerasmp_slots)
    pool = kerasmp_pool_factory(kerasmp_slots[:1], warm_import=False)
    assert pool.backend.name == "ray"
    assert pool.map(add, [1, 2], [3, 4], timeout=60) == [4, 6]
    server = kerasmp_inference_server(ModelRef.from_builder("models:tiny"), kerasmp_slots[1])
    assert server.backend.name == "ray"
    assert server.predict(np.ones(2, np.float32)).shape == (1,)


def test_2_the_session_pool_runs_on_ray(kerasmp_pool):
    assert kerasmp_pool.backend.name == "ray"
    assert kerasmp_pool.map(add, [1, 2], [3, 4], timeout=60) == [4, 6]
"""

MODELS = """
def tiny():
    import keras
    x = keras.Input((2,))
    return keras.Model(x, keras.layers.Dense(1)(x))
"""


def test_kerasmp_ray_local_puts_the_fixtures_on_a_session_cluster(pytester, run_pytest):
    pytester.makepyfile(test_uses_ray=USES_RAY, models=MODELS)
    pytester.makeini("[pytest]\npythonpath = .\n")
    result = run_pytest("--kerasmp-ray=local", "-p", "no:randomly")
    result.stdout.fnmatch_lines([
        "kerasmp: --kerasmp-ray=local -> pools and servers are Ray actors; slots planned from the cluster's nodes*",
        "*2 passed*",
    ])
    assert result.ret == 0


def test_help_names_the_option(pytester, run_pytest):
    result = run_pytest("--help")
    result.stdout.fnmatch_lines(["*--kerasmp-ray=ADDRESS|local*"])


def test_a_local_cluster_per_xdist_worker_is_refused(pytester, run_pytest):
    from pytest_kerasmp.plugin.config import RAY_LOCAL_XDIST

    pytester.makepyfile("def test_nothing(): pass")
    result = run_pytest("--kerasmp-ray=local", "-n", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*" + RAY_LOCAL_XDIST[:60] + "*"])
