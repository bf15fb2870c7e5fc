"""The JAX backend of Keras: what pinning, servers, clusters and seeding need of it.

JAX reads its device and memory settings when its backend starts (the first op, or the first
model Keras builds), not at import: ``import keras`` leaves it unstarted, so a warm child and a
forkserver that only imported it are still safe to pin and to fork from. XLA's CPU thread pool
sizes itself from the process's CPU affinity when the backend starts, so pinning binds the
cores before that and names the count (``PJRT_NPROC``) as well.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

from pytest_kerasmp.frameworks.base import CompiledForward, Forward, Framework, SlotLike

#: Set in a pinned process for a GPU slot with a memory cap: the GPU's total memory in MB,
#: from which the cap becomes XLA's memory fraction (nvidia-smi reports it; see ``environ``).
GPU_TOTAL_ENV = "PYTEST_KERASMP_GPU_TOTAL_MB"
#: The GPU size assumed for a cap when the GPU's total memory is unknown (a faked GPU).
UNKNOWN_TOTAL_MB = 16384


def gpu_total_mb(gpu: str | None) -> int | None:
    """GPU ``gpu``'s total memory in MB from ``nvidia-smi`` (None without one: a faked GPU)."""
    import shutil
    import subprocess

    if gpu is None or shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={gpu}", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


class Adapter(Framework):
    name = "jax"
    module = "jax"
    title = "JAX"
    live_type = ("Array", "jax.Array")
    warm_keras = True
    #: Absl's banner and glog-format info lines (the CUDA plugin's and gloo's among them).
    chatter = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|I\d{4} [\d:.]+ )")
    #: A CPU slot hides every GPU on purpose: JAX's note that it found none is chatter there.
    cpu_chatter = re.compile(r"^(E\d{4} .*cuInit|.*An NVIDIA GPU may be present on this machine)")

    def environ(self, slot: SlotLike, growth: bool) -> dict[str, str]:
        if slot.kind == "GPU":
            if slot.memory_limit_mb is not None:
                # XLA takes a fraction of the GPU's total memory, allocated up front.
                total = gpu_total_mb(getattr(slot, "gpu", None)) or UNKNOWN_TOTAL_MB
                fraction = min(max(slot.memory_limit_mb / total, 0.01), 1.0)
                return {"XLA_CLIENT_MEM_FRACTION": f"{fraction:.4f}", GPU_TOTAL_ENV: str(total)}
            return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if growth else {}
        # Read at import (set before it) and by the CPU client when it starts.
        return {"JAX_PLATFORMS": "cpu", "PJRT_NPROC": str(len(slot.cores))}

    def quiet_environ(self) -> dict[str, str]:
        import os

        return {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}

    def memory_growth(self, environ: dict[str, str]) -> bool:
        return environ.get("XLA_PYTHON_CLIENT_PREALLOCATE") == "false"

    def initialized(self) -> bool:
        """Whether JAX's backend has started here (a private query: jax has no public one)."""
        if "jax" not in sys.modules:
            return False
        try:
            from jax._src import xla_bridge

            return bool(xla_bridge.backends_are_initialized())
        except Exception:  # a JAX without it: cannot tell
            return False

    def configure(self, module: Any, slot: SlotLike) -> None:
        """A CPU slot's platform through ``jax.config``: ``JAX_PLATFORMS`` is read at import,
        so a JAX imported before pinning would not see it."""
        if slot.kind == "CPU":
            module.config.update("jax_platforms", "cpu")

    def forward(self, model: Any, inputs: Sequence[tuple[tuple[Any, ...], str, str]]) -> Forward:
        """``jax.jit`` over the model's stateless call, its variables passed in at every call
        (not baked into the executable); batches are padded to the next power of two, so batch sizes up to
        ``2**k`` compile at most ``k + 1`` times."""
        import jax
        import numpy as np

        count = [0]
        multi = len(inputs) > 1

        def call(tv: Any, ntv: Any, *xs: Any) -> Any:
            count[0] += 1  # runs once per trace
            out, _ = model.stateless_call(tv, ntv, list(xs) if multi else xs[0], training=False)
            return out if isinstance(out, (list, tuple)) else [out]

        compiled = jax.jit(call)

        def run(*xs: Any) -> list[Any]:
            rows = len(xs[0])
            size = 1 << max(rows - 1, 0).bit_length()
            if size != rows:
                xs = tuple(np.concatenate([x, np.zeros((size - rows, *x.shape[1:]), x.dtype)]) for x in xs)
            # The variables' current arrays at every call: Keras' own jitted steps (predict,
            # fit in the same process) replace them and delete the old ones.
            trainable = [v.value for v in model.trainable_variables]
            non_trainable = [v.value for v in model.non_trainable_variables]
            return [np.asarray(o)[:rows] for o in compiled(trainable, non_trainable, *xs)]

        return CompiledForward(run, lambda: count[0])

    def cluster_environ(self, spec: dict[str, list[str]], task_type: str, index: int) -> dict[str, str]:
        """``jax.distributed``'s coordinator (task 0's address, bound to 127.0.0.1 only), and
        the same as Keras reads it (``keras.distribution.initialize()`` without arguments);
        CPU collectives through gloo."""
        addresses, rank = ranks(spec, task_type, index)
        return {
            "JAX_COORDINATOR_ADDRESS": addresses[0],
            "JAX_COORDINATOR_BIND_ADDRESS": addresses[0],
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            "KERAS_DISTRIBUTION_JOB_ADDRESSES": ",".join(addresses),
            "KERAS_DISTRIBUTION_NUM_PROCESSES": str(len(addresses)),
            "KERAS_DISTRIBUTION_PROCESS_ID": str(rank),
        }

    def init_distributed(self) -> None:
        import keras

        keras.distribution.initialize()


def ranks(spec: dict[str, list[str]], task_type: str, index: int) -> tuple[list[str], int]:
    """Every task's address in rank order (chief first, then the workers) and this task's rank."""
    order = sorted(spec, key=lambda kind: (kind != "chief", kind))
    addresses = [a for kind in order for a in spec[kind]]
    rank = sum(len(spec[kind]) for kind in order[: order.index(task_type)]) + index
    return addresses, rank
