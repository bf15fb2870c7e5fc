"""Tasks tools/gpu_check.py sends to pinned workers (importable: they travel by reference)."""

from __future__ import annotations

import os
import time

import numpy as np


def cnn(seed: int = 0):
    """A small CNN on 32x32x3 images (the model every check uses)."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((32, 32, 3), name="x"),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])


def data(seed: int, rows: int):
    rng = np.random.default_rng(seed)
    return rng.random((rows, 32, 32, 3), dtype=np.float32), rng.integers(0, 10, rows)


def where() -> dict:
    """What the worker sees: its backend's devices and the pinning environment."""
    import keras

    info = {"pid": os.getpid(), "backend": keras.backend.backend(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if info["backend"] == "jax":
        import jax

        info["devices"] = [str(d) for d in jax.devices()]
    elif info["backend"] == "torch":
        import torch

        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["memory_fraction_env"] = os.environ.get("PYTEST_KERASMP_SLOT")
    return info


def train(seed: int, steps: int, batch: int = 256) -> dict:
    """Train ``cnn`` for ``steps`` batches; its wall time and final loss."""
    model = cnn(seed)
    model.compile(optimizer="adam", loss=__import__("keras").losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(seed, steps * batch)
    t0 = time.perf_counter()
    history = model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    return {"pid": os.getpid(), "seconds": time.perf_counter() - t0, "loss": float(history.history["loss"][-1])}


def train_serially(seeds: list[int], steps: int) -> float:
    t0 = time.perf_counter()
    for seed in seeds:
        train(seed, steps)
    return time.perf_counter() - t0


def in_process_rate(path: str, batch: int, seconds: float = 3.0) -> float:
    """Samples/s of ``model.predict_on_batch`` on full batches in this (pinned) process."""
    import keras

    model = keras.saving.load_model(path)
    x, _ = data(1, batch)
    model.predict_on_batch(x)  # compile
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.predict_on_batch(x)
        n += batch
    return n / (time.perf_counter() - t0)


def save_cnn(path: str) -> str:
    cnn(0).save(path)
    return path
