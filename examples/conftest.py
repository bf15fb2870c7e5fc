"""Root conftest of the example suite. It imports TensorFlow at module level, as many suites
do: pytest-kerasmp pins each pytest process before this file is imported."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402, F401

from pytest_kerasmp import ModelRef  # noqa: E402


@pytest.fixture(scope="session")
def model_ref(tmp_path_factory: pytest.TempPathFactory) -> ModelRef:
    """A small Keras model saved as .keras, by reference (what crosses to other processes)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(16, activation="relu")(inputs)))
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    model.save(path)
    return ModelRef.from_file(path)


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).random((64, 32, 32, 3), dtype=np.float32)
