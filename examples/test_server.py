"""A saved .keras model served from its own process, on this process's first slot."""

from __future__ import annotations

import os

import numpy as np


def test_served_predictions_equal_the_model(kerasmp_inference_server, model_ref, kerasmp_slots):
    server = kerasmp_inference_server(model_ref, max_batch_size=16)
    x = np.random.default_rng(1).random((5, 8), dtype=np.float32)
    np.testing.assert_allclose(server.predict(x), model_ref.load().predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert server.slot == kerasmp_slots[0]
    if server.slot.kind == "CPU":  # the kernel's view of the server process
        assert sorted(os.sched_getaffinity(server.pid)) == list(server.slot.cores)
