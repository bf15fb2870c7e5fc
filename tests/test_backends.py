"""Choosing a backend: what works and what is said without Ray (no Ray needed here)."""

from __future__ import annotations

import sys

import pytest

from pytest_kerasmp import DeviceSlot, InferenceServer, ModelRef, WorkerPool
from pytest_kerasmp.errors import BACKEND_UNKNOWN, RAY_MISSING

SLOT = DeviceSlot(index=0, kind="CPU", cores=(0,))


def test_an_unknown_backend_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=BACKEND_UNKNOWN.format(backend="spark", known=("local", "ray")).replace("(", r"\(").replace(")", r"\)")):
        WorkerPool([SLOT], backend="spark")
    with pytest.raises(ValueError, match="is not one of"):
        InferenceServer(ModelRef.from_builder("x:y"), SLOT, backend="spark")


def test_without_ray_the_ray_backend_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pytest-kerasmp\[ray\]") as info:
        WorkerPool([SLOT], backend="ray")
    assert str(info.value) == RAY_MISSING
