"""The TensorFlow backend of Keras: what pinning, servers, clusters and seeding need of it."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pytest_kerasmp.frameworks.base import CompiledForward, Forward, Framework, SlotLike


class Adapter(Framework):
    name = "tensorflow"
    module = "tensorflow"
    title = "TensorFlow"
    live_type = ("Variable", "tf.Variable")
    #: What TF_CPP_MIN_LOG_LEVEL does not silence: absl's banner and info lines in glog format.
    chatter = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|I\d{4} [\d:.]+ )")
    #: Its failed probe for CUDA: chatter on a CPU slot, which hides every GPU on purpose.
    cpu_chatter = re.compile(r"^E\d{4} .*failed call to cuInit")
    #: Its gRPC server binds every interface whatever TF_CONFIG says (tensorflow#2925, #11689).
    cluster_listens_everywhere = True

    def environ(self, slot: SlotLike, growth: bool) -> dict[str, str]:
        if slot.kind == "GPU":
            # TensorFlow refuses growth together with a memory limit; the limit wins.
            return {"TF_FORCE_GPU_ALLOW_GROWTH": "true"} if growth and slot.memory_limit_mb is None else {}
        n = str(len(slot.cores))
        return {"TF_NUM_INTRAOP_THREADS": n, "TF_NUM_INTEROP_THREADS": n}

    def quiet_environ(self) -> dict[str, str]:
        return {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}

    def memory_growth(self, environ: dict[str, str]) -> bool:
        return environ.get("TF_FORCE_GPU_ALLOW_GROWTH") == "true"

    def warm_import(self) -> None:
        with jax_deferred():
            super().warm_import()

    def imported(self) -> Any:
        tf = sys.modules.get("tensorflow")
        return tf if tf is not None and hasattr(tf, "config") else None  # not half-imported

    def initialized(self) -> bool:
        if "tensorflow" not in sys.modules:
            return False
        try:
            from tensorflow.python.eager import context

            return bool(context.context()._initialized)
        except Exception:  # a TensorFlow without this private attribute: cannot tell
            return False

    def configure(self, module: Any, slot: SlotLike) -> None:
        """Thread counts and the memory limit through ``tf.config`` (before devices initialise)."""
        tf = module
        if slot.threads:
            tf.config.threading.set_intra_op_parallelism_threads(slot.threads)
            tf.config.threading.set_inter_op_parallelism_threads(slot.threads)
        if slot.kind == "GPU" and slot.memory_limit_mb is not None:
            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                tf.config.set_logical_device_configuration(
                    gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=slot.memory_limit_mb)]
                )

    def seed(self, module: Any, seed: int, determinism: bool) -> None:
        module.random.set_seed(seed)
        if determinism:
            module.config.experimental.enable_op_determinism()

    def forward(self, model: Any, inputs: Sequence[tuple[tuple[Any, ...], str, str]]) -> Forward:
        """A ``tf.function`` with a ``None`` batch axis: one trace for every batch size."""
        import numpy as np
        import tensorflow as tf

        specs = [tf.TensorSpec((None, *shape), np.dtype(dtype)) for shape, dtype, _ in inputs]
        multi = len(specs) > 1

        def call(*xs: Any) -> Any:
            out = model(list(xs) if multi else xs[0], training=False)
            return out if isinstance(out, (list, tuple)) else [out]

        compiled = tf.function(call, input_signature=specs)
        # Called directly, the traced graph skips the tf.function's argument matching on
        # every call: 93 instead of 186 us per call of a tiny MLP here, at any batch size.
        concrete = compiled.get_concrete_function()
        return CompiledForward(
            lambda *xs: [o.numpy() for o in concrete(*xs)], lambda: int(compiled.experimental_get_tracing_count())
        )

    def cluster_environ(self, spec: dict[str, list[str]], task_type: str, index: int) -> dict[str, str]:
        """``TF_CONFIG``, as ``MultiWorkerMirroredStrategy`` reads it."""
        return {"TF_CONFIG": json.dumps({"cluster": spec, "task": {"type": task_type, "index": index}})}


def set_collective_timeout(collective_timeout_s: float | None) -> None:
    """In a cluster task, after TensorFlow is imported and before any op: every
    ``MultiWorkerMirroredStrategy`` created without a collective timeout gets this one."""
    if collective_timeout_s is None:
        return
    import tensorflow as tf
    from tensorflow.python.distribute import collective_all_reduce_strategy as module

    strategy = module.CollectiveAllReduceStrategy
    original = strategy.__init__

    def __init__(self: Any, cluster_resolver: Any = None, communication_options: Any = None) -> None:
        default = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout_s)
        if communication_options is None:
            communication_options = default
        elif communication_options.timeout_seconds is None:
            communication_options = communication_options.merge(default)
        original(self, cluster_resolver=cluster_resolver, communication_options=communication_options)

    strategy.__init__ = __init__


DEFER_JAX_ENV = "PYTEST_KERASMP_DEFER_JAX"


@contextlib.contextmanager
def jax_deferred() -> Iterator[None]:
    """While TensorFlow (and the Keras it loads) is imported, ``jax`` is a stand-in that
    imports the real JAX only when used.

    With JAX installed, ``import tensorflow`` imports it for ``tf.lite``'s ``from jax import
    jit`` (used only by ``TFLiteConverter.experimental_from_jax``) and Keras for a check of
    ``jax.monitoring.record_scalar``: 0.3 s of every TensorFlow worker's start here. The
    stand-in has those two, as functions that import JAX when called; any other attribute
    imports JAX at once. After the import, ``import jax`` is JAX itself. While it stands in,
    ``import jax.<submodule>`` fails (the stand-in is no package: ``from jax import jit``
    asks for ``__path__``); ``PYTEST_KERASMP_DEFER_JAX=0`` turns it off.
    """
    if (
        os.environ.get(DEFER_JAX_ENV) == "0"
        or "jax" in sys.modules
        or "tensorflow" in sys.modules
        or importlib.util.find_spec("jax") is None
    ):
        yield
        return

    def real() -> Any:
        if sys.modules.get("jax") is stand_in:
            sys.modules.pop("jax", None)  # another thread may have been first
        return importlib.import_module("jax")

    monitoring = _forwarding("jax.monitoring", lambda: real().monitoring, "record_scalar")
    stand_in = _forwarding("jax", real, "jit", monitoring=monitoring)
    sys.modules["jax"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("jax") is stand_in:
            sys.modules.pop("jax", None)


def _forwarding(name: str, target: Callable[[], Any], *functions: str, **attributes: Any) -> types.ModuleType:
    """A module whose ``functions`` call ``target()``'s when called, and whose other attributes
    are ``target()``'s (dunder names excepted: the import system asks for them)."""
    module = types.ModuleType(name, f"Stands in for {name} while TensorFlow imports (pytest-kerasmp).")

    def forward(attr: str) -> Callable[..., Any]:
        return lambda *args, **kwargs: getattr(target(), attr)(*args, **kwargs)

    def module_getattr(attr: str) -> Any:
        if attr.startswith("__") and attr != "__version__":  # the import system's questions
            raise AttributeError(attr)
        return getattr(target(), attr)

    for attr in functions:
        setattr(module, attr, forward(attr))
    for attr, value in attributes.items():
        setattr(module, attr, value)
    module.__getattr__ = module_getattr  # type: ignore[method-assign]
    return module
