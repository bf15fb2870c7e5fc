"""Scenario: independent models trained at the same time, one per device slot.

Pattern: a small hyper-parameter sweep. Each configuration trains in a warm worker pinned
to its own slot (its own GPU, or its own cores without a GPU), saves its model, and returns
its metrics; the parent consolidates one table. The serial reference trains the same
configurations one after the other in one worker on slot 0.
Asserted: with fixed seeds and TensorFlow op determinism on, every model's weights are
bitwise identical to its serial training, whichever worker trained it.
Measured: serial vs parallel wall time for the whole sweep (speedup, efficiency per slot).
Known hazard: workers that are not pinned each start one thread per core and fight over
them, and every one of them grabs the whole GPU; training then gets slower with more
workers and results depend on who ran where.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from pytest_kerasmp import ModelRef, assert_same, derive_seed, seed_everything

EPOCHS = 3  # at scale 1: the sweep is the harness's longest row (27 s with 4)


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 10-class problem from a fixed random teacher: learnable, the same in every process."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 64)).astype("float32")
    teacher = rng.normal(size=(64, 10)).astype("float32")
    return x, np.argmax(x @ teacher + 0.5 * rng.normal(size=(n, 10)), axis=1).astype("int32")


def train(config: dict, x: np.ndarray, y: np.ndarray, out_dir: str) -> dict:
    """Train one configuration from its seed; runs in a worker."""
    import keras

    seed_everything(config["seed"], determinism=True)  # random, numpy, TF, Keras; TF op determinism
    model = keras.Sequential(
        [
            keras.Input((x.shape[1],)),
            keras.layers.Dense(config["units"], activation="relu"),
            keras.layers.Dense(config["units"], activation="relu"),
            keras.layers.Dense(10),
        ],
        name=config["name"],
    )
    model.compile(
        optimizer=keras.optimizers.Adam(config["lr"]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        x, y, epochs=config["epochs"], batch_size=64, validation_split=0.25, shuffle=True, verbose=0
    )
    ref = ModelRef.save(model, out_dir, config["name"])
    return {
        "name": config["name"],
        "pid": os.getpid(),
        "weights": model.get_weights(),
        "val_loss": history.history["val_loss"][-1],
        "val_accuracy": history.history["val_accuracy"][-1],
        "model": ref,
    }


def configs(k: int, scale: int, base_seed: int | None) -> list[dict]:
    """One configuration per slot; each seed derived from the run's --kerasmp-seed (0 without)."""
    lrs = [1e-3, 3e-3, 1e-2, 3e-4, 2e-3, 5e-3, 7e-4, 1.5e-3]
    return [
        {"name": f"mlp{i}", "seed": derive_seed(base_seed or 0, i, "task"), "units": 256, "lr": lrs[i % len(lrs)], "epochs": EPOCHS * scale}
        for i in range(k)
    ]


def test_independent_training_one_model_per_slot(
    kerasmp_speedup, kerasmp_pool, kerasmp_pool_factory, kerasmp_slots, kerasmp_seed, tmp_path, helper_start_method
):
    if len(kerasmp_slots) < 2:
        pytest.skip("needs 2 or more slots: run with --kerasmp-gpus=2 (CPU cores stand in for GPUs)")
    sweep = configs(len(kerasmp_slots), scale=1, base_seed=kerasmp_seed)
    x, y = make_data(8000)
    serial_pool = kerasmp_pool_factory(kerasmp_slots[:1], start_method=helper_start_method, name="serial")

    def serial() -> list[dict]:
        return [serial_pool.submit(train, c, x, y, str(tmp_path / "serial")).result(timeout=600) for c in sweep]

    def parallel() -> list[dict]:
        return kerasmp_pool.map(train, sweep, [x] * len(sweep), [y] * len(sweep), [str(tmp_path / "parallel")] * len(sweep))

    def same_weights(serial_runs: list[dict], parallel_runs: list[dict]) -> None:
        assert len({r["pid"] for r in parallel_runs}) == len(sweep), "the sweep did not spread over the workers"
        for s, p in zip(serial_runs, parallel_runs, strict=True):
            assert_same(s["weights"], p["weights"], name=f"{p['name']} weights (serial vs parallel)")
        print("\nmodel   val_loss  val_accuracy  saved as")
        for p in parallel_runs:
            print(f"{p['name']:6}  {p['val_loss']:.4f}    {p['val_accuracy']:.4f}        {p['model'].path}")

    kerasmp_speedup(serial, parallel, workers=len(kerasmp_slots), rounds=3, variant="sweep", check=same_weights)


def split_cpu(replicas: int) -> None:
    """Worker initializer: one logical CPU device per replica (before TensorFlow starts)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)


def train_mirrored(x: np.ndarray, y: np.ndarray, replicas: int) -> dict:
    """The same model from the same seed, on one device and mirrored over ``replicas``."""
    import keras
    import tensorflow as tf

    def fit(strategy) -> list[np.ndarray]:
        seed_everything(7)
        with strategy.scope():
            model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, epochs=2, batch_size=128, shuffle=False, verbose=0)
        return model.get_weights()

    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return {
        "devices": devices,
        "single": fit(tf.distribute.OneDeviceStrategy(devices[0])),
        "mirrored": fit(tf.distribute.MirroredStrategy(devices[:replicas])),
    }


MIRRORED_ATOL = 1e-4


def test_mirrored_strategy_over_the_slots_matches_one_device(kerasmp_pool_factory, kerasmp_slots):
    """MirroredStrategy over the slots' devices (logical CPUs without a GPU) vs one device.

    Tolerance: weights within 1e-4 absolute after 2 epochs (the replicas' gradients are summed
    in a different order than one device's, so bitwise equality is not expected).
    """
    if len(kerasmp_slots) < 2:
        pytest.skip("needs 2 or more slots: run with --kerasmp-gpus=2")
    if kerasmp_slots[0].kind == "GPU":
        pytest.skip("on GPUs, run MirroredStrategy in a worker given every slot's GPU")
    from pytest_kerasmp import DeviceSlot

    cores = tuple(sorted({c for s in kerasmp_slots for c in s.cores}))
    replicas = len(kerasmp_slots)
    pool = kerasmp_pool_factory(
        [DeviceSlot(index=0, kind="CPU", cores=cores)], initializer=split_cpu, initargs=(replicas,), name="mirrored"
    )
    x, y = make_data(4096, seed=3)
    result = pool.submit(train_mirrored, x, y, replicas).result(timeout=600)
    assert len(result["devices"]) == replicas
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(result["single"], result["mirrored"], strict=True))
    print(f"\nMirroredStrategy over {replicas} logical CPUs vs one device: max |weight diff| {worst:.2e}")
    assert worst <= MIRRORED_ATOL
