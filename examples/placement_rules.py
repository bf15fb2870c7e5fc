"""The placement rules of pytest-kerasmp, checked from what a process reports about itself."""

from __future__ import annotations

from collections.abc import Sequence

from pytest_kerasmp import DeviceSlot


def assert_placed(seen: dict, slots: Sequence[DeviceSlot]) -> None:
    """``seen`` (tasks.where() in some process) sits on one of ``slots`` as that slot says."""
    slot = next((s for s in slots if seen["slot"] and s == DeviceSlot.from_json(seen["slot"])), None)
    assert slot is not None, f"pid {seen['pid']} is on {seen['slot']}, not on one of {[s.describe() for s in slots]}"
    if slot.kind == "CPU":
        assert seen["cores"] == list(slot.cores), seen
        assert seen["cuda_visible_devices"] == "-1", seen
    else:
        assert seen["cuda_visible_devices"] == slot.gpu, seen
        # Never TensorFlow's whole-GPU default: growth, or a cap instead of it.
        assert seen["memory_growth"] != bool(slot.memory_limit_mb), seen
