"""pytest-kerasmp: device slots, process-safe Keras worker pools and inference servers.

Importing this package never imports TensorFlow.
"""

from __future__ import annotations

from pytest_kerasmp.devices import GPU, DeviceSlot, detect_gpus, plan_slots
from pytest_kerasmp.errors import (
    DeviceAlreadyInitializedError,
    KerasMPError,
    KerasMPWarning,
    PoolClosedError,
    RemoteTraceback,
    ServerBusyError,
    ServerDiedError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerStartupError,
)
from pytest_kerasmp.modelref import ModelRef
from pytest_kerasmp.pinning import configure_tensorflow, current_slot, pin_process
from pytest_kerasmp.pool import WorkerPool
from pytest_kerasmp.results import assert_same, first_difference
from pytest_kerasmp.seeding import derive_seed, seed_everything
from pytest_kerasmp.server import InferenceClient, InferenceServer

__all__ = [
    "GPU",
    "DeviceAlreadyInitializedError",
    "InferenceClient",
    "InferenceServer",
    "DeviceSlot",
    "KerasMPError",
    "KerasMPWarning",
    "ModelRef",
    "PoolClosedError",
    "RemoteTraceback",
    "ServerBusyError",
    "ServerDiedError",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "WorkerPool",
    "WorkerStartupError",
    "assert_same",
    "configure_tensorflow",
    "current_slot",
    "derive_seed",
    "detect_gpus",
    "first_difference",
    "pin_process",
    "plan_slots",
    "seed_everything",
]
