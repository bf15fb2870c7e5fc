"""Run code right after a module is imported, whoever imports it, without importing it.

Pinning configures a framework this way (thread counts, memory limit) and seeding seeds it:
at once if it is already imported, else the moment its import finishes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any


def after_import(module: str, callback: Callable[[Any], None], *, key: str) -> None:
    """Call ``callback(module)`` now if ``module`` is imported, else right after its import.

    One callback per (module, key): a later one replaces it. Never imports ``module`` itself.
    """
    loaded = sys.modules.get(module)
    if loaded is not None and not getattr(loaded.__spec__, "_initializing", False):
        callback(loaded)  # imported (not half-way: then the hook below runs it at the end)
        return
    _ImportHook.add(module, key, callback)


class _ConfiguringLoader(importlib.abc.Loader):
    """Runs the module's own loader, then the callbacks waiting for that module."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        for callback in _ImportHook.pop(self._name):
            callback(module)

    def __getattr__(self, name: str) -> Any:  # resource readers, get_filename, ...
        return getattr(self._loader, name)


class _ImportHook(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the loader of the modules callbacks wait for, once each."""

    waiting: dict[str, dict[str, Callable[[Any], None]]] = {}

    @classmethod
    def add(cls, module: str, key: str, callback: Callable[[Any], None]) -> None:
        cls.waiting.setdefault(module, {})[key] = callback
        if not any(isinstance(f, cls) for f in sys.meta_path):
            sys.meta_path.insert(0, cls())

    @classmethod
    def pop(cls, module: str) -> list[Callable[[Any], None]]:
        callbacks = list(cls.waiting.pop(module, {}).values())
        if not cls.waiting:
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, cls)]
        return callbacks

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.waiting:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _ConfiguringLoader(spec.loader, fullname)
                return spec
        return None
