"""Pin a process to a device slot: the one routine every process the plugin pins goes through.

Pinning must happen before the framework under Keras initialises its devices. It sets the
slot's environment (``CUDA_VISIBLE_DEVICES``, thread caps, memory growth: the framework
adapter's part included), binds the process to the slot's cores, and configures the framework
(thread counts, memory limit) as soon as it is imported: at once if it already is, otherwise
right after its import, whoever imports it. No framework is imported here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from pytest_kerasmp import frameworks
from pytest_kerasmp.errors import FRAMEWORK_ALREADY_INITIALIZED, DeviceAlreadyInitializedError
from pytest_kerasmp.frameworks.hooks import after_import
from pytest_kerasmp.slots.devices import DeviceSlot, set_scope
from pytest_kerasmp.slots.seeding import seed_process

#: Set in a pinned process (and inherited by its children): the slot, as JSON.
SLOT_ENV = "PYTEST_KERASMP_SLOT"

_pinned: DeviceSlot | None = None


def current_slot() -> DeviceSlot | None:
    """The slot this process was pinned to by :func:`pin_process`, or ``None``."""
    return _pinned


def pin_process(slot: DeviceSlot, *, memory_growth: bool | None = None) -> None:
    """Pin this process to ``slot`` before TensorFlow touches a device.

    Raises:
        DeviceAlreadyInitializedError: TensorFlow already initialised its devices here, so
            the slot could not take effect.
    """
    global _pinned
    framework = frameworks.active()
    if framework.initialized():
        raise DeviceAlreadyInitializedError(FRAMEWORK_ALREADY_INITIALIZED.format(
            framework=framework.title, pid=os.getpid(), slot=slot.describe(),
        ))
    os.environ.update(slot.environ(memory_growth=memory_growth))
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # the order nvidia-smi numbers in
    os.environ[SLOT_ENV] = slot.to_json_text()
    if slot.cores:
        _bind_cores(slot.cores)
    _pinned = slot
    # plan_slots() here plans within this slot; the plugin widens it for a pytest process.
    set_scope((slot,), f"this process's slot ({slot.describe()})")
    after_import(framework.module, lambda module: framework.configure(module, slot), key="pin")
    seed_process(slot.index)


def configure_tensorflow(tf: Any, slot: DeviceSlot) -> None:
    """Apply the slot's thread counts and memory limit through ``tf.config`` (the TensorFlow
    adapter's ``configure``; ``pin_process`` calls it for you, right after the import)."""
    frameworks.get("tensorflow").configure(tf, slot)


def _bind_cores(cores: Sequence[int]) -> None:
    """Bind every thread of this process to ``cores`` (affinity is per thread on Linux)."""
    import psutil

    proc = psutil.Process()
    proc.cpu_affinity(list(cores))
    if hasattr(os, "sched_setaffinity"):
        for thread in proc.threads():
            try:
                os.sched_setaffinity(thread.id, cores)
            except OSError:  # the thread ended meanwhile
                pass
