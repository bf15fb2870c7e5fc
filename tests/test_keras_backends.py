"""The plugin on each Keras backend: the option, pinning, pools, ModelRef, servers, clusters.

Marked ``backends`` (CI runs these under each installed backend). Parametrized over the
backends installed here; the GPU half with faked GPUs (``PYTEST_KERASMP_FAKE_GPUS``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

import backend_tasks
import numpy as np
import pytest

from pytest_kerasmp import DeviceSlot, InferenceServer, KerasCluster, ModelRef, WorkerPool, frameworks, plan_slots
from pytest_kerasmp.errors import FORK_REFUSED
from pytest_kerasmp.plugin import config as cfg
from cpu_slots import CORES

pytestmark = pytest.mark.backends

INSTALLED = [b for b in ("tensorflow", "jax", "torch") if importlib.util.find_spec(b) is not None]
NON_TF = [b for b in ("jax", "torch") if b in INSTALLED]


@pytest.fixture(params=INSTALLED)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session's Keras backend for this test and the processes it starts."""
    monkeypatch.setenv("KERAS_BACKEND", request.param)
    return str(request.param)


@pytest.fixture(params=NON_TF)
def other_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KERAS_BACKEND", request.param)
    return str(request.param)


# ------------------------------------------------------------------------------ the option


@pytest.mark.parametrize("how", ["option", "env", "ini"])
def test_backend_option_sets_keras_backend_before_keras_is_imported(pytester, run_pytest, how):
    backend = NON_TF[0] if NON_TF else "tensorflow"
    pytester.makeconftest("import keras\n")  # a conftest that imports Keras at once
    pytester.makepyfile(f"""
        import os, keras
        def test_backend():
            assert os.environ["KERAS_BACKEND"] == {backend!r}
            assert keras.backend.backend() == {backend!r}
    """)
    args: list[str] = []
    if how == "option":
        args = [f"{cfg.BACKEND_OPTION}={backend}"]
    elif how == "env":
        os.environ[cfg.BACKEND_ENV] = backend  # removed again by the autouse fixture's monkeypatch
    else:
        pytester.makeini(f"[pytest]\n{cfg.BACKEND_INI} = {backend}\n")
    try:
        result = run_pytest(*args)
    finally:
        os.environ.pop(cfg.BACKEND_ENV, None)
    result.assert_outcomes(passed=1)
    source = {"option": "the command line", "env": f"env {cfg.BACKEND_ENV}", "ini": f"ini {cfg.BACKEND_INI}"}[how]
    result.stdout.fnmatch_lines([f"kerasmp: Keras backend {backend} * (from {source}), keras 3.*"])


def test_bad_backend_is_refused_at_session_start(pytester, run_pytest):
    pytester.makepyfile("def test_x(): pass\n")
    result = run_pytest(f"{cfg.BACKEND_OPTION}=theano")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{cfg.BACKEND_OPTION}='theano' (from the command line) is invalid: {cfg.BACKEND_VALID}*"])


def test_a_backend_that_is_not_installed_is_refused(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(pytest.UsageError) as info:
        cfg.resolve_backend({"kerasmp_keras_backend": "torch"}, {}, lambda name: "")
    assert str(info.value) == cfg.BACKEND_NOT_INSTALLED.format(
        name="torch", source="the command line", module="torch", extra="torch", option=cfg.BACKEND_OPTION,
    )


def test_keras_imported_on_another_backend_is_refused(run_python):
    done = run_python("""
import os
os.environ["KERAS_BACKEND"] = "tensorflow"
import keras
from pytest_kerasmp.plugin import config as cfg
try:
    cfg.apply_backend(cfg.Settings(keras_backend="jax", keras_backend_source="the command line"))
except Exception as exc:
    print(type(exc).__name__, exc)
""")
    assert done.stdout.strip().splitlines()[-1] == "UsageError " + cfg.BACKEND_TOO_LATE.format(
        imported="tensorflow", name="jax", source="the command line",
    )


def test_keras_backend_from_the_environment_is_the_default(pytester, run_pytest, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", INSTALLED[-1])
    pytester.makepyfile("def test_x(): pass\n")
    run_pytest("--kerasmp-gpus=1").stdout.fnmatch_lines([f"kerasmp: Keras backend {INSTALLED[-1]} * (from env KERAS_BACKEND)*"])


# ------------------------------------------------------------------ pinning, no process


def test_slot_environment_per_backend():
    cpu = DeviceSlot(index=0, kind="CPU", cores=(0, 1))
    gpu = DeviceSlot(index=1, kind="GPU", gpu="1")
    capped = DeviceSlot(index=1, kind="GPU", gpu="1", memory_limit_mb=4096)
    jax, torch = frameworks.get("jax"), frameworks.get("torch")
    assert jax.environ(cpu, True) == {"JAX_PLATFORMS": "cpu", "PJRT_NPROC": "2"}
    assert jax.environ(gpu, True) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    env = jax.environ(capped, True)  # a fraction of the GPU's size (16 GiB assumed for a faked one)
    assert float(env["XLA_CLIENT_MEM_FRACTION"]) == pytest.approx(4096 / int(env["PYTEST_KERASMP_GPU_TOTAL_MB"]), abs=1e-4)
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in env
    assert torch.environ(cpu, True) == {"PYTORCH_NVML_BASED_CUDA_CHECK": "1", "KERAS_TORCH_DEVICE": "cpu"}
    assert torch.environ(gpu, True)["KERAS_TORCH_DEVICE"] == "cuda:0"
    assert torch.preload_environ() == {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}


def test_cluster_environment_per_backend():
    spec = {"worker": ["127.0.0.1:5001", "127.0.0.1:5002"]}
    jax = frameworks.get("jax").cluster_environ(spec, "worker", 1)
    assert jax["JAX_COORDINATOR_ADDRESS"] == jax["JAX_COORDINATOR_BIND_ADDRESS"] == "127.0.0.1:5001"
    assert (jax["KERAS_DISTRIBUTION_NUM_PROCESSES"], jax["KERAS_DISTRIBUTION_PROCESS_ID"]) == ("2", "1")
    torch = frameworks.get("torch").cluster_environ(spec, "worker", 1)
    assert (torch["MASTER_ADDR"], torch["MASTER_PORT"], torch["RANK"], torch["WORLD_SIZE"]) == ("127.0.0.1", "5001", "1", "2")


def test_fork_is_refused_on_every_backend(backend):
    with pytest.raises(ValueError) as info:
        WorkerPool([DeviceSlot(index=0, kind="CPU", cores=(CORES[0],))], start_method="fork")
    assert str(info.value) == FORK_REFUSED


# ------------------------------------------------------------ pinning in fresh processes

PIN = """
import json, os, sys
from pytest_kerasmp import DeviceSlot, DeviceAlreadyInitializedError, pin_process
slot = DeviceSlot(index=0, kind="CPU", cores=({core},))
"""


@pytest.mark.skipif("jax" not in INSTALLED, reason="JAX is not installed")
def test_jax_pinned_after_import_before_first_op_then_refused_after_it(run_python, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    done = run_python(PIN.format(core=CORES[-1]) + """
import jax, jax.numpy as jnp
pin_process(slot)  # imported, not started: still in time
platforms = jax.config.jax_platforms
x = float(jnp.ones((64, 64)).sum())
threads = sum("XLAEigen" in open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task"))
try:
    pin_process(slot)
    refused = None
except DeviceAlreadyInitializedError as exc:
    refused = str(exc)
print(json.dumps({"platforms": platforms, "threads": threads, "refused": refused,
                  "cores": sorted(os.sched_getaffinity(0))}))
""")
    assert done.returncode == 0, done.stderr
    rec = json.loads(done.stdout.strip().splitlines()[-1])
    assert rec["platforms"] == "cpu" and rec["cores"] == [CORES[-1]]
    assert rec["threads"] == 1, "XLA's CPU pool did not follow the slot's one core"
    assert rec["refused"] and rec["refused"].startswith("JAX had already initialised its devices")


@pytest.mark.skipif("jax" not in INSTALLED, reason="JAX is not installed")
def test_jax_on_a_faked_gpu_slot_gets_growth_and_its_gpu(run_python, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    monkeypatch.setenv("PYTEST_KERASMP_FAKE_GPUS", "2")
    done = run_python("""
import json, os
from pytest_kerasmp import pin_process, plan_slots
slots = plan_slots(2)
pin_process(slots[1])
print(json.dumps({k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS")}))
""")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "CUDA_VISIBLE_DEVICES": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_PLATFORMS": None,
    }


@pytest.mark.skipif("torch" not in INSTALLED, reason="PyTorch is not installed")
def test_torch_refusal_needs_cuda(run_python, monkeypatch):
    """On a CPU-only torch, CUDA never initialises: pinning after import and after ops is
    allowed and still sets the threads (the refusal itself is checked by tools/gpu_check.py)."""
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    done = run_python(PIN.format(core=CORES[-1]) + """
import torch
(torch.ones(64, 64) @ torch.ones(64, 64)).sum()
pin_process(slot)
print(json.dumps({"threads": torch.get_num_threads(), "cuda_init": torch.cuda.is_initialized()}))
""")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"threads": 1, "cuda_init": False}


# ---------------------------------------------------------------- pools, ModelRef, server


def test_pool_model_file_and_server_on_each_backend(backend, tmp_path):
    slots = plan_slots(2)
    x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    started = time.perf_counter()
    with WorkerPool(slots, name=f"pool-{backend}", start_timeout_s=60) as pool:
        start_s = time.perf_counter() - started
        infos = pool.map(backend_tasks.whoami, [x, x])
        path = pool.submit(backend_tasks.save_linear, str(tmp_path / "linear.keras")).result(timeout=60)
    print(f"{backend}: pool of 2 started in {start_s:.2f} s")
    for info, slot in zip(infos, slots, strict=True):
        assert info["backend"] == backend and info["env"]["KERAS_BACKEND"] == backend
        assert info["package"].startswith(os.path.dirname(os.path.dirname(backend_tasks.__file__)))
        assert info["cores"] == list(slot.cores) and info["predict_ok"]
        assert info["import_s"] < 0.05, "the worker was not warm: it imported Keras in its first task"
        if backend == "jax":
            assert info["devices"] == ["cpu"] and info["xla_threads"] == len(slot.cores)
            assert info["env"]["PJRT_NPROC"] == str(len(slot.cores)) and not info["tf_imported"]
        if backend == "torch":
            assert info["threads"] == info["interop"] == len(slot.cores) and not info["tf_imported"]
            assert info["env"]["KERAS_TORCH_DEVICE"] == "cpu"
    with InferenceServer(ModelRef.from_file(path), slots[0], max_batch_size=16, max_delay_ms=2, name=f"srv-{backend}") as server:
        for rows in (1, 3, 16, 40):
            xs = np.random.default_rng(rows).random((rows, 4), dtype=np.float32)
            np.testing.assert_allclose(server.predict(xs), backend_tasks.expected(xs), rtol=1e-5, atol=1e-5)
        traces = server.stats()["traces"]
    assert traces == {"tensorflow": 1, "torch": 0}.get(backend, traces)
    assert traces <= 6, "JAX retraced for more than the power-of-two batch sizes up to 16"


@pytest.mark.skipif("jax" not in INSTALLED, reason="JAX is not installed")
def test_a_tensorflow_worker_imports_jax_only_when_a_task_uses_it(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    with WorkerPool(plan_slots(1), name="tf-defers-jax", start_timeout_s=60) as pool:
        got = pool.submit(backend_tasks.jax_after_a_warm_tensorflow_import).result(timeout=120)
    assert got == {"jax_imported_at_start": False, "jax_is_real": True, "doubled": 6, "sum": 3.0, "keras_backend": "tensorflow"}


# ------------------------------------------------------------------------------ clusters


def test_keras_cluster_all_reduce_and_data_parallel_training(other_backend):
    started = time.perf_counter()
    with KerasCluster(2, slots=plan_slots(2), name=f"kc-{other_backend}", run_timeout_s=90, start_timeout_s=60) as cluster:
        assert cluster.run(backend_tasks.all_reduce_sum) == [3.0, 3.0]
        first_s = time.perf_counter() - started
        results = cluster.run(backend_tasks.train_data_parallel)
    print(f"{other_backend}: cluster start + first all-reduce {first_s:.2f} s")
    assert [r["rank"] for r in results] == [0, 1]
    np.testing.assert_allclose(results[0]["kernel"], results[1]["kernel"], rtol=1e-6, atol=1e-7)
    assert np.isfinite(results[0]["loss"])


def test_compiled_forward_survives_keras_own_steps_in_the_same_process(other_backend, run_python):
    """The server's forward function keeps working after model.predict/fit ran in the same
    process (Keras' jitted JAX steps replace the variables' arrays and delete the old ones)."""
    done = run_python(f"""
import sys
sys.path.insert(0, {os.path.dirname(backend_tasks.__file__)!r})
import numpy as np, keras, backend_tasks
from pytest_kerasmp import frameworks
model = backend_tasks.linear()
forward = frameworks.active().forward(model, [((4,), "float32", "x")])
x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
first = forward(x)[0]
model.predict(x, verbose=0)
model.compile(optimizer="sgd", loss="mse")
model.fit(x, np.zeros((5, 3), np.float32), verbose=0)
after = forward(x)[0]
assert first.shape == (5, 3) and np.allclose(first, backend_tasks.expected(x), atol=1e-5)
assert np.allclose(after, model.predict(x, verbose=0), atol=1e-5) and not np.allclose(after, first)
print("ok", frameworks.active().name)
""")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == other_backend


def test_forkserver_workers_on_each_backend(other_backend, run_python):
    """A forkserver that imported the framework (never ran it) forks workers on the session's
    backend; under torch it got PYTORCH_NVML_BASED_CUDA_CHECK=1 before that import."""
    done = run_python(f"""
import json, sys
sys.path.insert(0, {os.path.dirname(backend_tasks.__file__)!r})
import numpy as np, backend_tasks
from pytest_kerasmp import WorkerPool, plan_slots
if __name__ == "__main__":
    with WorkerPool(plan_slots(1), start_method="forkserver", name="fs", start_timeout_s=60) as pool:
        print(json.dumps(pool.submit(backend_tasks.whoami, np.ones((2, 4), np.float32)).result(timeout=60)))
""")
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["backend"] == other_backend and info["predict_ok"]
    if other_backend == "torch":
        assert info["env"]["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
