"""Client-side functions run in other processes against an InferenceServer."""

from __future__ import annotations

import os

import numpy as np

import server_models


def hammer(client, seed: int, n: int) -> dict:
    """Send ``n`` requests of 1-8 rows, each checked against numpy: answered and wrong counts."""
    rng = np.random.default_rng(seed)
    answered = wrong = 0
    for i in range(n):
        x = rng.random((int(rng.integers(1, 9)), 4), dtype=np.float32) + i  # unique per request
        y = client.predict(x)
        answered += 1
        if y.shape != (x.shape[0], 3) or not np.allclose(y, server_models.expected(x), rtol=1e-4, atol=1e-3):
            wrong += 1
    return {"answered": answered, "wrong": wrong}


def send_then_die(client) -> None:
    client.submit(np.ones((1, 4), np.float32))
    import time

    time.sleep(0.05)  # the request is on its way, its answer is not
    os._exit(9)


def route_of(client) -> str:
    """How this process reaches a Ray server: 'direct' (its socket) or 'actor calls'."""
    return "direct" if client.direct() else "actor calls"
