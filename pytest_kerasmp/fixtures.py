"""Fixtures of pytest-kerasmp; ``plugin.py`` registers them. Each wraps a public function."""

from __future__ import annotations

import pytest

from pytest_kerasmp.config import session_plan
from pytest_kerasmp.devices import DeviceSlot
from pytest_kerasmp.pinning import current_slot


@pytest.fixture(scope="session")
def kerasmp_slots(pytestconfig: pytest.Config) -> tuple[DeviceSlot, ...]:
    """All device slots of this session (session scope; --kerasmp-gpus, --kerasmp-gpu-memory)."""
    return session_plan(pytestconfig).slots


@pytest.fixture
def kerasmp_device() -> DeviceSlot | None:
    """The slot this process is pinned to, or None when it is not pinned (--kerasmp-gpus)."""
    return current_slot()
