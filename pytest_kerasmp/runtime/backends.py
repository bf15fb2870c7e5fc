"""Execution backends: where a pool's workers and a server run, configured by one object.

:class:`~pytest_kerasmp.WorkerPool` and :class:`~pytest_kerasmp.InferenceServer` are one
class each, whatever runs them, and know no backend's options. ``backend=`` is a name
(``"local"``: child processes of this one; ``"ray"``: Ray actors), a configured backend object
(:class:`Local`, or :class:`~pytest_kerasmp.RayBackend` made with its address, reserve and
timeout), or an object that starts workers itself (a ``PoolBackend``). A name is looked up
in :data:`REGISTRY` (``"module:attribute"`` entries, loaded on first use, the way pytest finds
plugins by entry point), so the runtime never imports a backend's module and the Ray backend
(``pytest_kerasmp.ray``) sits above it and plugs in from there, as joblib's
``parallel_config(backend=..., **backend_params)`` and ``concurrent.futures`` executors do.

A configured backend is frozen (it can be shared, compared and reused by a restart) and makes
the two objects that do the work: ``for_pool(start_method)`` and ``for_server(start_method)``.
What those must do is said by the face that uses them, as a protocol: ``PoolBackend`` in
``pool.workerpool``, ``ServerBackend``/``ServerHandle`` in ``serve.server``. This module
imports neither.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from typing import Any, ClassVar

from pytest_kerasmp.errors import BACKEND_UNKNOWN, RAY_KEYWORDS_DEPRECATED

#: Backend name -> its configured backend's class, "module:attribute" (made with defaults).
REGISTRY: dict[str, str] = {
    "local": "pytest_kerasmp.runtime.backends:Local",
    "ray": "pytest_kerasmp.ray.backend:RayBackend",
}


def load(entry: str) -> Any:
    """The object at ``entry`` ("module:attribute"), its module imported now."""
    module, _, attribute = entry.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclasses.dataclass(frozen=True)
class Local:
    """Child processes of this one (the default): ``backend="local"``, or ``backend=Local()``."""

    name: ClassVar[str] = "local"

    # Made by name, as a backend is found: the seam imports neither face nor backend.
    def for_pool(self, start_method: str) -> Any:
        return load("pytest_kerasmp.runtime.pool.local:LocalBackend")(start_method)

    def for_server(self, start_method: str) -> Any:
        return load("pytest_kerasmp.runtime.serve.server:LocalServerBackend")(start_method)


def register(name: str, entry: str) -> None:
    """Make ``backend=name`` mean the configured backend class at ``entry`` ("module:attribute",
    made with no arguments; it has ``for_pool`` and ``for_server``)."""
    REGISTRY[name] = entry


def configured(backend: Any) -> Any:
    """The configured backend ``backend`` names; an object is returned as it is."""
    if not isinstance(backend, str):
        return backend
    if backend not in REGISTRY:
        raise ValueError(BACKEND_UNKNOWN.format(backend=backend, known=tuple(REGISTRY)))
    return load(REGISTRY[backend])()


def for_pool(backend: Any, start_method: str) -> Any:
    """What starts a pool's workers: from a name or a configured backend, or ``backend``
    itself when it starts workers (has ``start``)."""
    made = configured(backend)
    return made if hasattr(made, "start") else made.for_pool(start_method)


def for_server(backend: Any, start_method: str) -> Any:
    """As :func:`for_pool`, for a server."""
    made = configured(backend)
    return made if hasattr(made, "start") else made.for_server(start_method)


def from_ray_keywords(backend: Any, face: str, address: str | None, reserve: bool | None, timeout_s: float | None) -> Any:
    """``backend`` with the deprecated ``ray_address``/``ray_reserve``/``ray_timeout_s`` of
    ``face`` folded in (a DeprecationWarning when any is given; one release, then gone): into
    a new configured Ray backend for ``"ray"``, into a copy of a configured one (the
    ``--kerasmp-ray`` fixtures pass one). As before, they mean nothing to another backend."""
    given = {k: v for k, v in (("address", address), ("reserve", reserve), ("timeout_s", timeout_s)) if v is not None}
    if not given:
        return backend
    names = ", ".join(f"ray_{k}" for k in given)
    warnings.warn(RAY_KEYWORDS_DEPRECATED.format(face=face, given=names), DeprecationWarning, stacklevel=3)
    if backend == "ray":
        return load(REGISTRY["ray"])(**given)
    if getattr(backend, "name", None) == "ray" and dataclasses.is_dataclass(backend) and not isinstance(backend, type):
        return dataclasses.replace(backend, **given)
    return backend


__all__ = ["REGISTRY", "Local", "configured", "for_pool", "for_server", "load", "register"]
