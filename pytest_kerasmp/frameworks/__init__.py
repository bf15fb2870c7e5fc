"""The framework under Keras (its backend), behind one small interface.

Every place that depends on the framework Keras runs on asks the adapter of the session's
backend (:func:`active`) instead of importing it: the environment a pinned process needs
before the import, the configuration right after it, whether it already initialised its
devices, the warm import, the server's compiled forward function, a cluster task's
environment, seeding and determinism, and which start-up lines are chatter. A backend is a
module here with one :class:`~pytest_kerasmp.frameworks.base.Framework` subclass, named in
:data:`ADAPTERS`; nothing else changes to add one.

The backend is Keras's own choice: ``KERAS_BACKEND``, else ``~/.keras/keras.json`` (as Keras
reads them), else TensorFlow. Import-light: no framework is imported here.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from pathlib import Path
from typing import Any

from pytest_kerasmp.frameworks.base import Framework

#: Keras backend name -> the module of its adapter (a class named ``Adapter`` there).
ADAPTERS = {
    "tensorflow": "pytest_kerasmp.frameworks.tensorflow",
    "jax": "pytest_kerasmp.frameworks.jax",
    "torch": "pytest_kerasmp.frameworks.torch",
}
DEFAULT = "tensorflow"
UNSUPPORTED = (
    "KERAS_BACKEND={name!r} (from {source}) is not a backend pytest-kerasmp supports; "
    "use one of {known}"
)


def backend_name(environ: dict[str, str] | None = None) -> tuple[str, str]:
    """The session's Keras backend and where it came from, as Keras decides it."""
    env = os.environ if environ is None else environ
    if env.get("KERAS_BACKEND"):
        return env["KERAS_BACKEND"].strip().lower(), "env KERAS_BACKEND"
    home = Path(env.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        name = json.loads((home / "keras.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        name = None
    if name:
        return str(name).strip().lower(), str(home / "keras.json")
    return DEFAULT, "the default"


@functools.cache
def get(name: str) -> Framework:
    """The adapter of backend ``name``; ValueError for one not supported."""
    module = ADAPTERS.get(name)
    if module is None:
        raise ValueError(UNSUPPORTED.format(name=name, source="the caller", known=", ".join(ADAPTERS)))
    adapter: Framework = importlib.import_module(module).Adapter()
    return adapter


def live_kind(obj: Any) -> str | None:
    """What kind of live object of an imported framework ``obj`` is (refused by the
    transport: it would not survive a process boundary), or None."""
    for name in ADAPTERS:
        adapter = get(name)
        if adapter.imported() is not None:
            kind = adapter.live_kind(obj)
            if kind is not None:
                return kind
    return None


def active() -> Framework:
    """The adapter of this process's Keras backend (see :func:`backend_name`)."""
    name, source = backend_name()
    if name not in ADAPTERS:
        raise ValueError(UNSUPPORTED.format(name=name, source=source, known=", ".join(ADAPTERS)))
    return get(name)


__all__ = ["ADAPTERS", "Framework", "active", "backend_name", "get", "live_kind"]
