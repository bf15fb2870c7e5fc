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


def all_reduce_sum() -> float:
    """In a cluster task: join the others, sum (task rank + 1) across every task."""
    import keras

    import pytest_kerasmp

    pytest_kerasmp.init_distributed()
    _, index = pytest_kerasmp.task_info()
    value = float(index + 1)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax.numpy as jnp
        from jax.experimental import multihost_utils

        return float(multihost_utils.process_allgather(jnp.asarray([value]), tiled=True).sum())
    if backend == "tensorflow":
        import tensorflow as tf

        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        per_replica = strategy.run(lambda: tf.constant(value))
        return float(strategy.reduce("SUM", per_replica, axis=None))
    import torch
    import torch.distributed as dist

    t = torch.tensor([value])
    dist.all_reduce(t)
    return float(t.item())


def _data(rank: int, rows: int = 64):
    rng = np.random.default_rng(100 + rank)  # each task its own shard
    x = rng.random((rows, 4), dtype=np.float32)
    return x, expected(x)


def train_data_parallel() -> dict:
    """In a cluster task: a few steps of data-parallel training of ``linear``'s shape from one
    seed; each task reports its weights, which must agree across tasks."""
    import keras

    import pytest_kerasmp

    pytest_kerasmp.init_distributed()
    _, rank = pytest_kerasmp.task_info()
    keras.utils.set_random_seed(7)
    x, y = _data(rank)
    backend = keras.backend.backend()
    if backend == "jax":
        distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
        distribution.auto_shard_dataset = False  # NumPy inputs, already one shard per task
        with distribution.scope():
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
            history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        loss = float(history.history["loss"][-1])
    else:
        import torch
        from torch.nn.parallel import DistributedDataParallel

        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for start in range(0, len(x), 16):
            opt.zero_grad()
            out = ddp(torch.from_numpy(x[start:start + 16]))
            loss_t = torch.nn.functional.mse_loss(out, torch.from_numpy(y[start:start + 16]))
            loss_t.backward()
            opt.step()
        loss = float(loss_t.item())
    return {"rank": rank, "kernel": np.asarray(model.layers[-1].get_weights()[0]).tolist(), "loss": loss}


def jax_after_a_warm_tensorflow_import() -> dict:
    """In a warm TensorFlow worker: was JAX imported at start, and does it work when used?"""
    imported = "jax" in sys.modules
    import keras

    model = linear()  # Keras at work, before anything asks for JAX
    model.predict(np.ones((2, 4), np.float32), verbose=0)
    imported = imported or "jax" in sys.modules
    from tensorflow.lite.python import util  # what imported JAX at TensorFlow's import

    import jax

    doubled = util._jit(lambda v: v * 2)(3)  # the stand-in's jit: the real one, on first use
    return {
        "jax_imported_at_start": imported,
        "jax_is_real": jax.__name__ == "jax" and hasattr(jax, "numpy") and type(jax.jit(lambda v: v)).__module__ != __name__,
        "doubled": int(doubled),
        "sum": float(jax.numpy.add(1.0, 2.0)),
        "keras_backend": keras.backend.backend(),
    }
