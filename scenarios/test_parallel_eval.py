"""Scenario: several saved models evaluated on the same held-out data at the same time.

Pattern: K ``.keras`` files (K = twice the session's slots), each passed as a ``ModelRef``;
the warm pool's workers load each model once (cached per process) and call
``model.evaluate``. The serial reference evaluates the same models one after the other in
one worker on slot 0, with its models loaded once too. Both backends: local processes, and
Ray actors on a 2-node loopback Ray cluster (one per node; the serial reference on node 0).
Asserted: every model's loss and accuracy equal the serial evaluation to 1e-6.
Measured: serial vs the pool, side by side.
Known hazard: sending the live model to a child process either hangs (fork after
TensorFlow started) or silently pickles and rebuilds it with ``safe_mode=False`` (spawn);
the pool refuses it with a TypeError that names ModelRef.
"""

from __future__ import annotations

import numpy as np
import pytest

from pytest_kerasmp import ModelRef, seed_everything


def make_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, 64)).astype("float32")
    return x, np.argmax(x @ rng.normal(size=(64, 10)), axis=1).astype("int32")


def build_and_save(index: int, directory) -> ModelRef:
    import keras

    seed_everything(index)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(256 + 64 * index, activation="relu"), keras.layers.Dense(10)],
        name=f"model{index}",
    )
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    x, y = make_data(2000)
    model.fit(x, y, epochs=1, batch_size=128, verbose=0)
    return ModelRef.save(model, directory)


# ------------------------------------------------------------------ run in the workers


def load(refs: list[ModelRef]) -> int:
    return sum(ref.load().count_params() for ref in refs)


def evaluate(ref: ModelRef, x: np.ndarray, y: np.ndarray) -> dict:
    return ref.load().evaluate(x, y, batch_size=512, verbose=0, return_dict=True)


# ------------------------------------------------------------------------ scenarios


@pytest.fixture(params=["local", "ray"])
def eval_pools(request, kerasmp_pool, kerasmp_pool_factory, kerasmp_slots):
    """(serial pool on one slot, parallel pool over every slot) on the backend asked for."""
    if request.param == "local":
        return kerasmp_pool_factory(kerasmp_slots[:1], name="serial-eval"), kerasmp_pool
    slots = request.getfixturevalue("ray_slots")
    parallel = kerasmp_pool_factory(slots[:2], name="ray-eval", backend="ray")
    return kerasmp_pool_factory(slots[2:3], name="ray-serial-eval", backend="ray"), parallel


def test_parallel_evaluation_equals_serial(kerasmp_speedup, eval_pools, kerasmp_scale, tmp_path, request):
    serial_pool, kerasmp_pool = eval_pools
    workers = len(kerasmp_pool.slots)
    refs = [build_and_save(i, tmp_path) for i in range(2 * workers)]
    x, y = make_data(max(1000, int(40_000 * kerasmp_scale)))
    serial_pool.broadcast(load, refs)  # both sides start with every model loaded
    kerasmp_pool.broadcast(load, refs)

    def serial() -> list[dict]:
        return [serial_pool.submit(evaluate, ref, x, y).result(timeout=300) for ref in refs]

    def parallel() -> list[dict]:
        return kerasmp_pool.map(evaluate, refs, [x] * len(refs), [y] * len(refs))

    def check(serial_metrics: list[dict], parallel_metrics: list[dict]) -> None:
        for ref, s, p in zip(refs, serial_metrics, parallel_metrics, strict=True):
            assert s.keys() == p.keys()
            for name in s:
                assert p[name] == pytest.approx(s[name], abs=1e-6), f"{ref.path}: {name} differs from serial"

    backend = request.node.callspec.params["eval_pools"]
    variant = "evaluate" if backend == "local" else "evaluate-ray"
    kerasmp_speedup(serial, parallel, workers=workers, rounds=3, variant=variant, check=check)
