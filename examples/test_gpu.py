"""A test that needs a GPU: skipped without one (or failed under --kerasmp-require-gpu)."""

from __future__ import annotations

import os

import pytest
import tensorflow as tf


@pytest.mark.kerasmp_gpus(1)
def test_runs_on_my_gpu(kerasmp_device):
    assert os.environ["CUDA_VISIBLE_DEVICES"] == kerasmp_device.gpu
    growth = os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH") == "true"
    assert growth != bool(kerasmp_device.memory_limit_mb)  # growth, or a cap instead
    with tf.device(kerasmp_device.tf_device):  # "/GPU:0" inside the pinned process
        assert float(tf.reduce_sum(tf.ones((4, 4)))) == 16.0
