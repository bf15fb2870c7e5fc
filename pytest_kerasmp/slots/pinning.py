"""Pin a process to a device slot: the one routine every process the plugin pins goes through.

Pinning must happen before TensorFlow initialises its devices. It sets the slot's environment
(``CUDA_VISIBLE_DEVICES``, thread caps, memory growth), binds the process to the slot's cores,
and configures TensorFlow (thread counts, memory limit) as soon as it is imported: at once if
it already is, otherwise right after its import, whoever imports it. TensorFlow itself is
never imported here.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

from pytest_kerasmp.errors import TF_ALREADY_INITIALIZED, DeviceAlreadyInitializedError
from pytest_kerasmp.slots.devices import DeviceSlot, set_scope

#: Set in a pinned process (and inherited by its children): the slot, as JSON.
SLOT_ENV = "PYTEST_KERASMP_SLOT"

_pinned: DeviceSlot | None = None


def current_slot() -> DeviceSlot | None:
    """The slot this process was pinned to by :func:`pin_process`, or ``None``."""
    return _pinned


def tensorflow_initialized() -> bool:
    """Whether TensorFlow has initialised its devices in this process (never imports it)."""
    if "tensorflow" not in sys.modules:
        return False
    try:
        from tensorflow.python.eager import context

        return bool(context.context()._initialized)
    except Exception:  # a TensorFlow without this private attribute: cannot tell
        return False


def pin_process(slot: DeviceSlot, *, memory_growth: bool | None = None) -> None:
    """Pin this process to ``slot`` before TensorFlow touches a device.

    Raises:
        DeviceAlreadyInitializedError: TensorFlow already initialised its devices here, so
            the slot could not take effect.
    """
    global _pinned
    if tensorflow_initialized():
        raise DeviceAlreadyInitializedError(
            TF_ALREADY_INITIALIZED.format(pid=os.getpid(), slot=slot.describe())
        )
    os.environ.update(slot.environ(memory_growth=memory_growth))
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # the order nvidia-smi numbers in
    os.environ[SLOT_ENV] = slot.to_json_text()
    if slot.cores:
        _bind_cores(slot.cores)
    _pinned = slot
    # plan_slots() here plans within this slot; the plugin widens it for a pytest process.
    set_scope((slot,), f"this process's slot ({slot.describe()})")
    after_import("tensorflow", lambda tf: configure_tensorflow(tf, slot), key="pin")
    from pytest_kerasmp.slots.seeding import seed_process  # import-light; seeds only when asked to

    seed_process(slot.index)


def after_import(module: str, callback: Callable[[Any], None], *, key: str) -> None:
    """Call ``callback(module)`` now if ``module`` is imported, else right after its import.

    One callback per (module, key): a later one replaces it. Never imports ``module`` itself.
    """
    loaded = sys.modules.get(module)
    if loaded is not None and (module != "tensorflow" or hasattr(loaded, "config")):
        callback(loaded)
        return
    _ImportHook.add(module, key, callback)


def configure_tensorflow(tf: Any, slot: DeviceSlot) -> None:
    """Apply the slot's thread counts and memory limit through ``tf.config``.

    Must run before TensorFlow initialises its devices; ``pin_process`` arranges that.
    """
    if slot.threads:
        tf.config.threading.set_intra_op_parallelism_threads(slot.threads)
        tf.config.threading.set_inter_op_parallelism_threads(slot.threads)
    if slot.kind == "GPU" and slot.memory_limit_mb is not None:
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            tf.config.set_logical_device_configuration(
                gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=slot.memory_limit_mb)]
            )


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
