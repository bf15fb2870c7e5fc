"""The public names: one list, each loads, the deprecated ones warn and still work."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

import pytest_kerasmp
from pytest_kerasmp import RayBackend, WorkerPool
from pytest_kerasmp.errors import RemoteTraceback
from pytest_kerasmp.runtime import backends
from cpu_slots import CPU0



def test_every_public_name_loads_and_the_list_is_the_one_type_checkers_read():
    assert {"PoolStats", "RayBackend", "WorkerPool", "InferenceServer", "KerasCluster"} <= set(pytest_kerasmp.__all__)
    assert "RemoteTraceback" not in pytest_kerasmp.__all__
    for name in pytest_kerasmp.__all__:
        assert getattr(pytest_kerasmp, name).__name__ == name


def test_the_loader_reads_every_name_type_checkers_read():
    """One import per line under TYPE_CHECKING, as the loader reads them: a formatter that
    wraps one into parentheses would hide that name from the loader, and this fails."""
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(pytest_kerasmp.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))
    typed = {alias.name: node.module.removeprefix("pytest_kerasmp.") for node in block.body for alias in node.names}
    assert typed == pytest_kerasmp._WHERE


def test_remote_traceback_from_the_top_warns_and_is_the_one_in_errors():
    with pytest.warns(DeprecationWarning, match="import it from pytest_kerasmp.errors"):
        assert pytest_kerasmp.RemoteTraceback is RemoteTraceback


def test_import_tensorflow_still_works_with_a_warning_naming_warm_import():
    with pytest.warns(DeprecationWarning, match=r"use warm_import=\.\.\."):
        pool = WorkerPool([CPU0], import_tensorflow=False, name="old-keyword")
    with pool:
        assert pool.warm_import is False
        assert pool.submit(sum, [1, 2]).result(timeout=30) == 3


def test_a_configured_backend_is_one_frozen_object_for_pools_and_servers():
    ray = RayBackend(address="127.0.0.1:6379", reserve=False, timeout_s=5)
    assert backends.configured("ray") == RayBackend()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ray.reserve = True  # type: ignore[misc]
    pool_side, server_side = ray.for_pool("spawn"), ray.for_server("spawn")
    assert (pool_side.address, pool_side.reserve, pool_side.timeout_s) == ("127.0.0.1:6379", False, 5)
    assert (server_side.address, server_side.reserve, server_side.timeout_s) == ("127.0.0.1:6379", False, 5)
    assert backends.for_pool("local", "forkserver").start_method == "forkserver"
    with pytest.raises(ValueError, match="timeout_s=-1 must be a positive number of seconds"):
        RayBackend(timeout_s=-1)
    with pytest.raises(ValueError, match=r"backend='nope' is not one of \('local', 'ray'\)"):
        backends.for_pool("nope", "spawn")


def test_the_old_ray_keywords_fold_into_the_configured_backend_with_a_warning():
    with pytest.warns(DeprecationWarning, match=r"WorkerPool\(ray_address, ray_reserve=\.\.\.\) is deprecated.*RayBackend"):
        made = backends.from_ray_keywords("ray", "WorkerPool", "127.0.0.1:1", False, None)
    assert made == RayBackend(address="127.0.0.1:1", reserve=False)
    with pytest.warns(DeprecationWarning):  # as before, they mean nothing to another backend
        assert backends.from_ray_keywords("local", "InferenceServer", None, False, None) == "local"
    with pytest.warns(DeprecationWarning):  # a configured one (the --kerasmp-ray fixtures') takes them too
        folded = backends.from_ray_keywords(RayBackend(reserve=False), "WorkerPool", "127.0.0.1:2", None, 7)
    assert folded == RayBackend(address="127.0.0.1:2", reserve=False, timeout_s=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.from_ray_keywords("ray", "WorkerPool", None, None, None) == "ray"
