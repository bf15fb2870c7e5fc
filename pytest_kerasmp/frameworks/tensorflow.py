"""The TensorFlow backend of Keras: what pinning, servers, clusters and seeding need of it."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
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

    def environ(self, slot: SlotLike, growth: bool) -> dict[str, str]:
        if slot.kind == "GPU":
            # TensorFlow refuses growth together with a memory limit; the limit wins.
            return {"TF_FORCE_GPU_ALLOW_GROWTH": "true"} if growth and slot.memory_limit_mb is None else {}
        n = str(len(slot.cores))
        return {"TF_NUM_INTRAOP_THREADS": n, "TF_NUM_INTEROP_THREADS": n}

    def quiet_environ(self) -> dict[str, str]:
        import os

        return {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}

    def memory_growth(self, environ: dict[str, str]) -> bool:
        return environ.get("TF_FORCE_GPU_ALLOW_GROWTH") == "true"

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
        return CompiledForward(
            lambda *xs: [o.numpy() for o in compiled(*xs)], lambda: int(compiled.experimental_get_tracing_count())
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
