"""Module-level functions that run in pool workers: they travel by reference."""

from __future__ import annotations

import json
import os

import numpy as np


def where(_: object = None) -> dict:
    """Where this process runs, as it sees itself."""
    slot = json.loads(os.environ.get("PYTEST_KERASMP_SLOT", "null"))
    return {
        "pid": os.getpid(),
        "owner": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "cores": sorted(os.sched_getaffinity(0)),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "memory_growth": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH") == "true",
        "slot": slot,
    }


def augment(images: np.ndarray, seed: int) -> np.ndarray:
    """Flip and add noise, reproducibly from the seed."""
    rng = np.random.default_rng(seed)
    flipped = images[:, :, ::-1] if rng.random() < 0.5 else images
    return np.clip(flipped + rng.normal(0, 0.05, images.shape).astype(np.float32), 0, 1)


def augment_all(images: np.ndarray, chunks: int = 4) -> np.ndarray:
    return np.concatenate([augment(part, i) for i, part in enumerate(np.array_split(images, chunks))])


_strategy = None


def cluster_sum() -> dict:
    """In a TFCluster task: all-reduce (task index + 1) with the strategy made on first use."""
    global _strategy
    import tensorflow as tf

    if _strategy is None:
        _strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    out = _strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", tf.constant(float(rank + 1))))
    return {**where(), "sum": float(_strategy.experimental_local_results(out)[0])}
