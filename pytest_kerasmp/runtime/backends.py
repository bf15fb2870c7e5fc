"""Execution backends: where a pool's workers and a server run, behind one small protocol.

:class:`~pytest_kerasmp.WorkerPool` and :class:`~pytest_kerasmp.InferenceServer` are one
class each, whatever runs them. ``backend=`` names an execution backend (``"local"``: child
processes of this one; ``"ray"``: Ray actors) or is a backend object; the name is looked up in
:data:`REGISTRY` (``"module:attribute"`` entries, loaded on first use, the way pytest finds
plugins by entry point), so the runtime never imports a backend's module and the Ray backend
(``pytest_kerasmp.ray``) sits above it and plugs in from there, as ``concurrent.futures``
executors, joblib's ``parallel_config(backend=...)`` or Dask's schedulers do.

A pool backend starts the pool's workers and returns the dispatcher that owns them (a
:class:`~pytest_kerasmp.runtime.pool.taskqueue.TaskQueue` with its thread): the pool only queues,
waits, closes and terminates through it. A server backend starts the server process and
returns a handle the server closes, kills and makes clients from.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pytest_kerasmp.errors import BACKEND_UNKNOWN

if TYPE_CHECKING:
    from pytest_kerasmp.runtime.pool.taskqueue import TaskQueue
    from pytest_kerasmp.runtime.serve.client import InferenceClient

#: Backend name -> (pool backend, server backend), each "module:attribute".
REGISTRY: dict[str, tuple[str, str]] = {
    "local": ("pytest_kerasmp.runtime.pool.local:LocalBackend", "pytest_kerasmp.runtime.serve.server:LocalServerBackend"),
    "ray": ("pytest_kerasmp.ray.pool:RayBackend", "pytest_kerasmp.ray.server:RayServerBackend"),
}


class PoolBackend(Protocol):
    name: str
    #: What the pool reports as its start method ("spawn", "forkserver", "ray").
    start_method: str

    def start(self, pool: Any) -> TaskQueue:
        """Start a worker on each of ``pool.slots`` and wait for all (raising
        ``WorkerStartupError``); the dispatcher that owns them, its thread not yet started."""

    def pack(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, list[Any]]:
        """A call as it travels to a worker: pickled, with its large buffers out of band."""


class ServerHandle(Protocol):
    """A started server process, as its :class:`~pytest_kerasmp.InferenceServer` uses it."""

    pid: int
    address: bytes
    inputs: list[Any]
    outputs: list[Any]

    def client(self, server: Any, request_timeout_s: float, busy_timeout_s: float) -> InferenceClient: ...

    def stop(self, timeout: float) -> str | None:
        """Stop after answering what it accepted, within ``timeout``; past it, kill it and
        return its stacks (``"(none)"`` if it gave none); None when it stopped in time."""

    def kill(self) -> None: ...

    def is_alive(self) -> bool: ...


class ServerBackend(Protocol):
    name: str

    def start(self, server: Any, start_timeout_s: float) -> ServerHandle: ...


def _load(entry: str) -> Any:
    module, _, attribute = entry.partition(":")
    return getattr(importlib.import_module(module), attribute)


def register(name: str, pool: str, server: str) -> None:
    """Make ``backend=name`` mean these backends ("module:attribute" factories)."""
    REGISTRY[name] = (pool, server)


def pool_backend(backend: str | PoolBackend, **options: Any) -> PoolBackend:
    """The pool backend ``backend`` names, made with the ``options`` it takes (each factory
    takes what it knows: ``start_method`` locally, ``ray_address``... on Ray); an object is
    used as it is."""
    if not isinstance(backend, str):
        return backend
    if backend not in REGISTRY:
        raise ValueError(BACKEND_UNKNOWN.format(backend=backend, known=tuple(REGISTRY)))
    made: PoolBackend = _load(REGISTRY[backend][0])(**options)
    return made


def server_backend(backend: str | ServerBackend, **options: Any) -> ServerBackend:
    """As :func:`pool_backend`, for a server."""
    if not isinstance(backend, str):
        return backend
    if backend not in REGISTRY:
        raise ValueError(BACKEND_UNKNOWN.format(backend=backend, known=tuple(REGISTRY)))
    made: ServerBackend = _load(REGISTRY[backend][1])(**options)
    return made
