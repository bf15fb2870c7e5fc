"""Execution backends: where a pool's workers and a server run, behind one small protocol.

:class:`~pytest_kerasmp.WorkerPool` and :class:`~pytest_kerasmp.InferenceServer` are one
class each, whatever runs them. ``backend=`` names an execution backend (``"local"``: child
processes of this one; ``"ray"``: Ray actors) or is a backend object; the name is looked up in
:data:`REGISTRY` (``"module:attribute"`` entries, loaded on first use, the way pytest finds
plugins by entry point), so the runtime never imports a backend's module and the Ray backend
(``pytest_kerasmp.ray``) sits above it and plugs in from there, as ``concurrent.futures``
executors, joblib's ``parallel_config(backend=...)`` or Dask's schedulers do.

What a backend must do is said by the face that uses it, as a protocol: ``PoolBackend`` in
``pool.workerpool`` (start the pool's workers and return the dispatcher that owns them), and
``ServerBackend``/``ServerHandle`` in ``serve.server`` (start the server process and return a
handle the server closes, kills and makes clients from). This module imports neither.
"""

from __future__ import annotations

import importlib
from typing import Any

from pytest_kerasmp.errors import BACKEND_UNKNOWN

#: Backend name -> (pool backend, server backend), each "module:attribute".
REGISTRY: dict[str, tuple[str, str]] = {
    "local": ("pytest_kerasmp.runtime.pool.local:LocalBackend", "pytest_kerasmp.runtime.serve.server:LocalServerBackend"),
    "ray": ("pytest_kerasmp.ray.pool:RayBackend", "pytest_kerasmp.ray.server:RayServerBackend"),
}


def _load(entry: str) -> Any:
    module, _, attribute = entry.partition(":")
    return getattr(importlib.import_module(module), attribute)


def register(name: str, pool: str, server: str) -> None:
    """Make ``backend=name`` mean these backends ("module:attribute" factories)."""
    REGISTRY[name] = (pool, server)


def pool_backend(backend: Any, **options: Any) -> Any:
    """The pool backend ``backend`` names, made with the ``options`` it takes (each factory
    takes what it knows: ``start_method`` locally, ``ray_address``... on Ray); an object is
    used as it is."""
    if not isinstance(backend, str):
        return backend
    if backend not in REGISTRY:
        raise ValueError(BACKEND_UNKNOWN.format(backend=backend, known=tuple(REGISTRY)))
    return _load(REGISTRY[backend][0])(**options)


def server_backend(backend: Any, **options: Any) -> Any:
    """As :func:`pool_backend`, for a server."""
    if not isinstance(backend, str):
        return backend
    if backend not in REGISTRY:
        raise ValueError(BACKEND_UNKNOWN.format(backend=backend, known=tuple(REGISTRY)))
    return _load(REGISTRY[backend][1])(**options)
