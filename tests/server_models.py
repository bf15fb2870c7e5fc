"""Models for the inference-server tests, built by importable builders (ModelRef.from_builder)."""

from __future__ import annotations

import time

import numpy as np

KERNEL = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
BIAS = np.array([0.5, -1.0, 2.0], np.float32)


def expected(x: np.ndarray) -> np.ndarray:
    """What ``linear()`` computes, in numpy."""
    return x @ KERNEL + BIAS


def linear(delay_s: float = 0.0, load_delay_s: float = 0.0):
    """Dense(3) with known weights; ``delay_s`` sleeps in every batch, NaN inputs raise."""
    import keras
    import tensorflow as tf

    time.sleep(load_delay_s)

    class Guarded(keras.layers.Layer):
        def call(self, x):
            if delay_s:
                tf.py_function(lambda: time.sleep(delay_s), [], [])
            return tf.debugging.check_numerics(x, "the batch holds a NaN")

    inputs = keras.Input((4,), name="x")
    dense = keras.layers.Dense(3)
    model = keras.Model(inputs, dense(Guarded()(inputs)))
    dense.set_weights([KERNEL, BIAS])
    return model


def two_inputs():
    import keras

    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
    dense = keras.layers.Dense(3)
    model = keras.Model([a, b], dense(keras.layers.Concatenate()([a, b])))
    dense.set_weights([np.ones((6, 3), np.float32), np.zeros(3, np.float32)])
    return model
