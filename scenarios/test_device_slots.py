"""Scenario: the pytest process itself runs Keras on its device slot.

Pattern: a test suite run with ``--kerasmp-gpus`` (the harness uses ``auto``); the plugin
pins this process to slot 0 before any module imports TensorFlow.
Asserted: TensorFlow, as it sees itself here, runs on the slot's device with the slot's
thread cap, and a small Keras model trains there to the same weights as a reference run.
Known hazard: TensorFlow settles devices and threads at its first op; pinning later is an
error (``DeviceAlreadyInitializedError``), never a silent run on the wrong device.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from pytest_kerasmp import current_slot, seed_everything


def test_this_process_is_pinned_before_tensorflow(kerasmp_slots):
    kerasmp_device = current_slot()  # the fixture fails unpinned; this scenario skips then
    if kerasmp_device is None:
        pytest.skip("run with --kerasmp-gpus to pin the pytest process")
    import tensorflow as tf

    assert kerasmp_device == kerasmp_slots[0]
    if kerasmp_device.kind == "CPU":
        assert sorted(os.sched_getaffinity(0)) == list(kerasmp_device.cores)
        assert tf.config.threading.get_intra_op_parallelism_threads() == len(kerasmp_device.cores)
        assert tf.config.list_physical_devices("GPU") == []
    else:
        assert len(tf.config.list_physical_devices("GPU")) == 1


def test_keras_trains_on_the_slot_device():
    import keras

    kerasmp_device = current_slot()
    device = kerasmp_device.tf_device if kerasmp_device else "/CPU:0"
    x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    y = x @ np.arange(8, dtype="float32")[:, None]

    def train() -> list[np.ndarray]:
        seed_everything(1)
        import tensorflow as tf

        with tf.device(device):
            model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
            model.fit(x, y, epochs=3, batch_size=32, verbose=0, shuffle=False)
        return model.get_weights()

    first, second = train(), train()
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(np.mean((x @ first[0] + first[1] - y) ** 2)) < float(np.mean(y**2))
