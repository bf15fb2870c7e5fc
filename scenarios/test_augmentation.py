"""Scenario: CPU-heavy image augmentation spread over worker processes.

Pattern: a batch of 96x96x3 images is augmented (random crop of a padded copy, flip,
rotation by a multiple of 90 degrees, brightness/contrast/saturation jitter, a blur) in
numpy, serially, in the plugin's pool with 1, 2 and 4 workers (images through shared
memory), with ``tf.data`` ``map(num_parallel_calls=AUTOTUNE)`` around the same function, and
by a ``keras.utils.PyDataset(workers=2)`` feeding ``model.predict``, with threads and with
``use_multiprocessing=True`` (a fork pool).
Asserted: every sample's randomness comes from (seed, sample index), never from the worker,
so the output is bitwise identical for 1, 2 and 4 workers, for tf.data, for both PyDatasets,
and to serial.
Measured: serial vs each parallel form, side by side. The in-process forms (tf.data and
PyDataset) get only the cores of the slot their process is pinned to. And the pool with one
worker per slot against what a user would pick instead for the same job (``peers.py``:
joblib/loky, ``ProcessPoolExecutor`` and ``multiprocessing.Pool`` on spawn), each warm, with
as many workers, side by side in one run. The images cross to the pool's workers through
shared memory, and the augmented parts do not come back: each worker writes its part
straight into one output array in shared memory (``map(into=...)`` with views of a ``shared_empty`` array), so the caller joins
nothing. The executor and the multiprocessing pool pickle the images and the parts through
pipes both ways, loky memory-maps what it sends and pickles what comes back; the caller then
joins the parts (some 25 ms for 85 MB here, serial: the pool measured 1.76x on 2 slots with its
parts joined the same way).
Known hazard: a process pool started per call, or one that pickles whole batches through
its pipes, is slower than serial (0.78x measured with multiprocessing.Pool).
``PyDataset(use_multiprocessing=True)`` forks a process that has run TensorFlow: it is safe
only while ``__getitem__`` runs no compiled TensorFlow (a ``tf.function`` there hangs, see
test_pitfalls), and Keras waits for its workers without a bound, so here it runs inside a
pool worker whose task has a timeout, and the pool ends the fork pool with its worker.
"""

from __future__ import annotations

import functools
import multiprocessing

import numpy as np
import pytest
from peers import PEERS, Peer

SEED = 1234
SIZE = 96
PYDATASET_WORKERS = 2
PYDATASET_TIMEOUT_S = 120.0


def augment_one(image: np.ndarray, seed: int, index: int) -> np.ndarray:
    """Augment one uint8 HxWx3 image; randomness from (seed, index) only."""
    rng = np.random.default_rng([seed, index])
    pad = np.pad(image, ((8, 8), (8, 8), (0, 0)), mode="reflect")
    top, left = rng.integers(0, 17, size=2)
    out = pad[top : top + SIZE, left : left + SIZE].astype(np.float32) / 255.0
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = np.rot90(out, k=int(rng.integers(0, 4)))
    out = out * rng.uniform(0.7, 1.3) + rng.uniform(-0.1, 0.1)  # contrast, brightness
    grey = out.mean(axis=2, keepdims=True)
    out = grey + (out - grey) * rng.uniform(0.6, 1.4)  # saturation
    for _ in range(int(rng.integers(1, 4))):  # a 3x3 box blur, 1-3 times
        p = np.pad(out, ((1, 1), (1, 1), (0, 0)), mode="edge")
        out = sum(p[i : i + SIZE, j : j + SIZE] for i in range(3) for j in range(3)) / 9.0
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def augment_batch(images: np.ndarray, seed: int, start: int) -> np.ndarray:
    """Augment ``images``, which are samples ``start, start + 1, ...`` of the dataset."""
    return np.stack([augment_one(im, seed, start + i) for i, im in enumerate(images)])


def make_images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


def in_pool(pool, images: np.ndarray, chunks: int) -> np.ndarray:
    """The plugin's pool: each worker writes its part straight into one shared output."""
    from pytest_kerasmp import shared_empty

    starts = [int(s) for s in np.linspace(0, len(images), chunks + 1)]
    parts = [images[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    out = shared_empty((len(images), SIZE, SIZE, 3), np.float32)
    pool.map(augment_batch, parts, [SEED] * chunks, starts[:-1], into=[out[a:b] for a, b in zip(starts, starts[1:], strict=False)])
    return out


def in_peer(peer, images: np.ndarray, chunks: int) -> np.ndarray:
    """A peer's map: the parts come back to the caller, which joins them."""
    starts = [int(s) for s in np.linspace(0, len(images), chunks + 1)]
    parts = [images[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    return np.concatenate(peer.map(augment_batch, parts, [SEED] * chunks, starts[:-1]))


def with_tf_data(images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    def one(image, index):
        out = tf.numpy_function(lambda im, i: augment_one(im, SEED, int(i)), [image, index], tf.float32)
        return tf.ensure_shape(out, (SIZE, SIZE, 3))

    dataset = tf.data.Dataset.from_tensor_slices((images, np.arange(len(images))))
    dataset = dataset.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(256)
    return np.concatenate([b.numpy() for b in dataset])


@functools.cache
def augmenting_dataset() -> type:
    """A PyDataset that augments batch ``i`` (made on first use: importing this module must
    not import Keras, or every augmentation worker would pay for it)."""
    import keras

    class AugmentedImages(keras.utils.PyDataset):
        def __init__(self, images: np.ndarray, batch_size: int, **kwargs: object) -> None:
            super().__init__(**kwargs)
            self.images, self.batch_size = images, batch_size

        def __len__(self) -> int:
            return -(-len(self.images) // self.batch_size)

        def __getitem__(self, i: int) -> np.ndarray:
            start = i * self.batch_size
            return augment_batch(self.images[start : start + self.batch_size], SEED, start)

    return AugmentedImages


@functools.cache
def identity_model():
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    return keras.Model(inputs, keras.layers.Identity()(inputs))


def predict_through_pydataset(images: np.ndarray, workers: int, use_multiprocessing: bool) -> np.ndarray:
    """Runs in a pool worker: a model fed by a PyDataset that augments; returns what it saw.

    Keras starts its pool with the process's default start method: fork on Linux up to
    Python 3.13, as in a user's script. A spawned worker's default is spawn, so fork is set
    here for the call, and put back after it.
    """
    dataset = augmenting_dataset()(images, 32, workers=workers, use_multiprocessing=use_multiprocessing)
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("fork", force=True)
    try:
        return identity_model().predict(dataset, verbose=0)
    finally:
        multiprocessing.set_start_method(before, force=True)


@pytest.fixture(scope="module")
def images(kerasmp_scale):
    return make_images(max(64, int(768 * kerasmp_scale)))


@pytest.fixture(scope="module")
def serial_result(images):
    return augment_batch(images, SEED, 0)


def same(serial: np.ndarray, parallel: np.ndarray) -> None:
    np.testing.assert_array_equal(parallel, serial)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_augmentation_in_the_pool_is_bitwise_serial(kerasmp_speedup, kerasmp_pool_factory, kerasmp_slots, images, serial_result, workers):
    pool = kerasmp_pool_factory(
        [kerasmp_slots[i % len(kerasmp_slots)] for i in range(workers)], warm_import=False, name=f"augment{workers}"
    )
    same(serial_result, in_pool(pool, images, 4 * workers))  # the pool result itself, first
    kerasmp_speedup(
        lambda: augment_batch(images, SEED, 0), lambda: in_pool(pool, images, 4 * workers),
        workers=workers, rounds=3, variant=f"pool-{workers}w", check=same,
    )


def test_augmentation_with_tf_data_autotune(kerasmp_speedup, kerasmp_slots, images, serial_result):
    same(serial_result, with_tf_data(images))
    kerasmp_speedup(
        lambda: augment_batch(images, SEED, 0), lambda: with_tf_data(images),
        workers=len(kerasmp_slots[0].cores) if kerasmp_slots[0].kind == "CPU" else 1,
        rounds=3, variant="tf.data", check=same,
    )


@pytest.mark.parametrize("use_multiprocessing", [False, True], ids=["threads", "fork"])
def test_augmentation_in_a_pydataset_feeding_a_model(kerasmp_speedup, kerasmp_pool, images, serial_result, use_multiprocessing):
    def parallel() -> np.ndarray:  # bounded: a hung fork pool becomes a TaskTimeoutError
        return kerasmp_pool.submit_with_timeout(
            PYDATASET_TIMEOUT_S, predict_through_pydataset, images, PYDATASET_WORKERS, use_multiprocessing
        ).result()

    same(serial_result, parallel())
    kerasmp_speedup(
        lambda: augment_batch(images, SEED, 0), parallel, workers=PYDATASET_WORKERS, rounds=3,
        variant=f"pydataset-{'fork' if use_multiprocessing else 'threads'}-{PYDATASET_WORKERS}w", check=same,
    )


@pytest.mark.parametrize("peer", PEERS)
def test_augmentation_pool_against_peers(kerasmp_speedup, kerasmp_pool_factory, kerasmp_slots, images, serial_result, peer):
    if peer == "loky":
        pytest.importorskip("joblib", reason="the loky row needs joblib (the peers extra)")
    workers = len(kerasmp_slots)
    pool = kerasmp_pool_factory(list(kerasmp_slots), warm_import=False, name=f"augment-vs-{peer}")
    other = Peer(peer, workers)
    try:
        same(serial_result, in_peer(other, images, 4 * workers))
        kerasmp_speedup(
            lambda: in_peer(other, images, 4 * workers), lambda: in_pool(pool, images, 4 * workers),
            workers=workers, rounds=3, variant=f"pool-{workers}w-vs-{peer}", check=same,
        )
    finally:
        other.close()
