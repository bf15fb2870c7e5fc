"""Errors and warnings raised by pytest-kerasmp.

Every message names what happened, the likely cause and what to do. Message templates that
tests match live here as constants.
"""

from __future__ import annotations

import pytest


class KerasMPError(Exception):
    """Base class of every error raised by pytest-kerasmp."""


class DeviceAlreadyInitializedError(KerasMPError, RuntimeError):
    """TensorFlow initialised its devices before the process could be pinned to a slot."""


class KerasMPWarning(pytest.PytestWarning):
    """A non-fatal problem with the plan or the use of pytest-kerasmp."""


TF_ALREADY_INITIALIZED = (
    "TensorFlow had already initialised its devices in process {pid} before kerasmp could pin "
    "it to {slot}, so it would run on the wrong device; something ran a TensorFlow op too early "
    "(a plugin or module that builds a model or runs an op when imported): move that work into "
    "a fixture or a test, or drop --kerasmp-gpus to run unpinned"
)

CORES_REUSED = (
    "kerasmp: {slots} CPU slots requested but only {cores} usable cores {core_set}; cores are "
    "reused round-robin, so slots share cores and timings will be slower than planned; "
    "use --kerasmp-gpus={cores} or fewer"
)
