"""Errors and warnings raised by pytest-kerasmp.

Every message names what happened, the likely cause and what to do. Message templates that
tests match live here as constants.
"""

from __future__ import annotations

import pickle

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


class WorkerStartupError(KerasMPError):
    """A worker process could not start: pinning, the TensorFlow import or the initializer failed."""


class WorkerCrashedError(KerasMPError):
    """A worker process died while running a task; the pool replaced it."""


class TaskTimeoutError(KerasMPError, TimeoutError):
    """A task ran past its timeout; its worker was killed and replaced."""


class PoolClosedError(KerasMPError, RuntimeError):
    """The pool was closed before the task could run."""


class ServerDiedError(KerasMPError, ConnectionError):
    """The inference server process is gone; its pending and later requests fail with this."""


class ServerBusyError(KerasMPError):
    """The inference server's queue stayed full for the whole wait."""


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a worker, attached as ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + self.text


def pack_exception(exc: BaseException) -> bytes:
    """``exc`` pickled for the other process, or a RuntimeError naming it if it will not pickle."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(exc).__qualname__}: {exc}"))


def unpack_exception(data: bytes, text: str) -> BaseException:
    """The exception from :func:`pack_exception`, with the remote traceback ``text`` as cause."""
    try:
        error = pickle.loads(data)
    except Exception:
        error = RuntimeError(text.strip().splitlines()[-1])
    error.__cause__ = RemoteTraceback(text)
    return error


FORK_REFUSED = (
    "start_method='fork' is refused: TensorFlow is imported in this process, and a child forked "
    "after TensorFlow has run (model.predict, fit, a tf.function) deadlocks in its first "
    "TensorFlow call; use 'spawn' (default) or 'forkserver'"
)
WORKER_STARTUP_FAILED = (
    "worker {index} ({slot}) of pool {pool!r} failed to start: {reason}; the child's traceback "
    "is attached above"
)
WORKER_START_TIMEOUT = (
    "worker {index} ({slot}) of pool {pool!r} was not ready after {timeout:g} s (TensorFlow "
    "import and initializer); the machine may be overloaded: start fewer workers or raise "
    "start_timeout_s"
)
WORKER_CRASHED = (
    "worker {index} ({slot}, pid {pid}) of pool {pool!r} died with {how} while running task "
    "{task} ({fn}); the pool replaced it; {hint}"
)
TASK_TIMED_OUT = (
    "task {task} ({fn}) ran past its {timeout:g} s timeout on worker {index} ({slot}, pid {pid}); "
    "the worker was killed and replaced; raise the timeout or make the task smaller"
)
POOL_CLOSED = "pool {pool!r} is closed; task {fn} was not run; submit before close()"
ARENA_FAILED = (
    "task {task} ({fn}) was not run: its arrays could not be copied into the worker's shared "
    "memory ({error}); free memory or send smaller arrays"
)
SERVER_DIED = (
    "inference server {name!r} (pid {pid}, {slot}) is gone{how}; request {what} was not "
    "answered; start a new server, and check its output for the reason (SIGKILL is usually "
    "the OOM killer)"
)
SERVER_STARTUP_FAILED = (
    "inference server {name!r} ({slot}) failed to start: {reason}; the child's traceback is "
    "attached above"
)
SERVER_DIED_STARTING = (
    "inference server {name!r} ({slot}) died with {how} while loading and warming its model; "
    "check that the model loads in one process, and the machine's memory"
)
SERVER_BUSY = (
    "inference server {name!r} had its queue full ({queue} requests waiting) for {waited:g} s, "
    "so request {what} was refused; raise max_queue, add servers, or let callers wait "
    "longer (busy_timeout_s)"
)
SERVER_NO_ANSWER = (
    "inference server {name!r} did not answer request {what} within {timeout:g} s (its batch "
    "may be stuck or the model slow); raise request_timeout_s or check server.stats()"
)
BAD_REQUEST = "request {what} does not fit the model's input {index} ({expected}): {problem}"
