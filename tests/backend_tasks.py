"""Module-level functions the Keras-backend tests send to workers: backend-agnostic (keras.ops)."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

KERNEL = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
BIAS = np.array([0.5, -1.0, 2.0], np.float32)


def expected(x: np.ndarray) -> np.ndarray:
    return x @ KERNEL + BIAS


def linear():
    """Dense(3) with known weights, on whatever backend the process runs."""
    import keras

    inputs = keras.Input((4,), name="x")
    dense = keras.layers.Dense(3)
    model = keras.Model(inputs, dense(inputs))
    dense.set_weights([KERNEL, BIAS])
    return model


def _threads_named(part: str) -> int:
    n = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                n += part in f.read()
        except OSError:
            pass
    return n


def whoami(x: np.ndarray) -> dict:
    """What a pinned worker sees: its backend, pinning and threads, and a predict."""
    t0 = time.perf_counter()
    import keras

    import_s = time.perf_counter() - t0  # ~0 in a warm worker: the import was paid at start
    import pytest_kerasmp

    backend = keras.backend.backend()
    out = np.asarray(linear().predict(x, verbose=0))
    info: dict = {
        "backend": backend,
        "package": pytest_kerasmp.__file__,
        "cores": sorted(os.sched_getaffinity(0)),
        "env": {k: os.environ.get(k) for k in (
            "KERAS_BACKEND", "CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS", "PJRT_NPROC", "KERAS_TORCH_DEVICE",
            "PYTORCH_NVML_BASED_CUDA_CHECK", "XLA_PYTHON_CLIENT_PREALLOCATE", "TF_NUM_INTRAOP_THREADS",
            "OMP_NUM_THREADS")},
        "predict_ok": bool(np.allclose(out, expected(x), atol=1e-5)),
        "import_s": import_s,
        "tf_imported": "tensorflow" in sys.modules,
    }
    if backend == "jax":
        import jax

        info["devices"] = [d.platform for d in jax.devices()]
        info["xla_threads"] = _threads_named("XLAEigen")
    if backend == "torch":
        import torch

        info["threads"] = torch.get_num_threads()
        info["interop"] = torch.get_num_interop_threads()
    return info


def save_linear(path: str) -> str:
    linear().save(path)
    return path


def all_reduce_sum(value: float) -> float:
    """In a cluster task: join the others, sum ``value`` across every task."""
    import keras

    import pytest_kerasmp

    pytest_kerasmp.init_distributed()
    backend = keras.backend.backend()
    if backend == "jax":
        import jax.numpy as jnp
        from jax.experimental import multihost_utils

        total = multihost_utils.process_allgather(jnp.asarray([value]), tiled=True).sum()
        return float(total)
    if backend == "torch":
        import torch
        import torch.distributed as dist

        t = torch.tensor([value])
        dist.all_reduce(t)
        return float(t.item())
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    return float(strategy.reduce("SUM", strategy.run(lambda: tf.constant(value)), axis=None))
