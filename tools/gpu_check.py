#!/usr/bin/env python3
"""The plugin on a real GPU, with JAX or PyTorch (or TensorFlow) under Keras: one script.

    python3 tools/gpu_check.py [--backend jax|torch|tensorflow] [--processes 3] [--cap-mb 2048]
                               [--json gpu_check.json]

On an NVIDIA machine it runs, on GPU 0, with the backend's own settings from pin_process:
  1. 2-4 processes sharing the GPU, with memory growth and with a per-process cap: each trains
     the small CNN while nvidia-smi is sampled; peak memory per process against the cap;
  2. served prediction (InferenceServer, dynamic batching) against in-process full batches in a
     worker on the same GPU (the fraction of that limit);
  3. N models trained on GPU slots at once against the same N one after another.
It prints a table and writes JSON. Without a GPU (no nvidia-smi, or it lists none) it prints
"gpu_check: no GPU ... skipped" and exits 0. Needs pytest-kerasmp, keras and one backend with
CUDA: beside an installed JAX or PyTorch, Keras 3.15 needs only keras, namex and optree
(docs/backends.md says how to carry their wheels).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_tasks, for the workers too
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # pytest_kerasmp from a checkout

#: Set by --dry-run-cpu: the same checks on CPU slots (to try the script without a GPU).
DRY_RUN = False
NO_GPU = "gpu_check: no GPU (nvidia-smi {why}): skipped; run it on an NVIDIA machine"


def gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.splitlines() if line.startswith("GPU ")]


class MemorySampler:
    """Peak GPU memory per pid from ``nvidia-smi --query-compute-apps``, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=10,
                ).stdout
            except (OSError, subprocess.SubprocessError):
                out = ""
            for line in out.splitlines():
                try:
                    pid, mb = (int(v) for v in line.split(","))
                except ValueError:
                    continue
                self.peak[pid] = max(self.peak.get(pid, 0), mb)
            self._stop.wait(0.2)


def gpu0() -> list:
    """GPU 0 as the plugin sees it (none in a dry run: CPU slots)."""
    from pytest_kerasmp import detect_gpus

    return [] if DRY_RUN else detect_gpus()[:1]


def sharing(processes: int, cap_mb: int | None, steps: int) -> dict:
    """``processes`` workers on GPU 0 (growth, or ``cap_mb`` each) training at once."""
    import gpu_tasks

    from pytest_kerasmp import WorkerPool, plan_slots

    slots = plan_slots(processes, gpus=gpu0(), memory_limit_mb=cap_mb)
    with MemorySampler() as sampler, WorkerPool(slots, name="share", start_timeout_s=300, task_timeout_s=600) as pool:
        seen = pool.submit(gpu_tasks.where).result(300)
        t0 = time.perf_counter()
        runs = pool.map(gpu_tasks.train, range(processes), [steps] * processes)
        wall = time.perf_counter() - t0
        pids = pool.pids()
    peaks = {pid: sampler.peak.get(pid) for pid in pids if pid is not None}
    return {
        "mode": f"cap {cap_mb} MB" if cap_mb else "growth", "processes": processes, "wall_s": wall,
        "peak_mb": peaks, "within_cap": None if not cap_mb or None in peaks.values() else all(m <= cap_mb * 1.1 for m in peaks.values()),
        "losses": [r["loss"] for r in runs], "worker_sees": seen,
    }


def serving(requests: int, clients: int, batch: int) -> dict:
    """Served requests/s (one sample each, ``clients`` threads) against in-process full batches."""
    import gpu_tasks

    from pytest_kerasmp import InferenceServer, ModelRef, WorkerPool, plan_slots

    slot = plan_slots(1, gpus=gpu0())[0]
    path = str(Path(tempfile.mkdtemp(prefix="gpu-check-")) / "cnn.keras")
    with WorkerPool([slot], name="limit", start_timeout_s=300) as pool:
        pool.submit(gpu_tasks.save_cnn, path).result(300)
        limit = pool.submit(gpu_tasks.in_process_rate, path, batch).result(300)
    x, _ = gpu_tasks.data(2, clients)
    with InferenceServer(ModelRef.from_file(path), slot, max_batch_size=batch, max_delay_ms=2, name="serve") as server:
        server.predict(x[:1])

        def client(i: int) -> None:
            for _ in range(requests // clients):
                server.predict(x[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        wall = time.perf_counter() - t0
    rate = (requests // clients) * clients / wall
    return {"served_per_s": rate, "in_process_per_s": limit, "fraction": rate / limit, "clients": clients, "batch": batch}


def independent(n: int, steps: int) -> dict:
    """N models trained at once on N GPU slots sharing GPU 0, against one after another."""
    import gpu_tasks

    from pytest_kerasmp import WorkerPool, plan_slots

    slots = plan_slots(n, gpus=gpu0())
    with WorkerPool(slots[:1], name="serial", start_timeout_s=300, task_timeout_s=1200) as pool:
        pool.submit(gpu_tasks.train, 99, 2).result(600)  # compile caches warm, as the parallel run's are not
        serial = pool.submit(gpu_tasks.train_serially, list(range(n)), steps).result(1200)
    with WorkerPool(slots, name="parallel", start_timeout_s=300, task_timeout_s=1200) as pool:
        pool.map(gpu_tasks.train, [99] * n, [2] * n)
        t0 = time.perf_counter()
        pool.map(gpu_tasks.train, range(n), [steps] * n)
        parallel = time.perf_counter() - t0
    return {"models": n, "serial_s": serial, "parallel_s": parallel, "speedup": serial / parallel}


REFUSAL = """
import os, sys
from pytest_kerasmp import DeviceAlreadyInitializedError, pin_process, plan_slots
backend = os.environ["KERAS_BACKEND"]
if backend == "torch":
    import torch; torch.zeros(1, device="cuda")
elif backend == "jax":
    import jax.numpy as jnp; float(jnp.ones(1).sum())
else:
    import tensorflow as tf; tf.constant(1.0) + 1
try:
    pin_process(plan_slots(1)[0])
    print("NOT REFUSED")
except DeviceAlreadyInitializedError as exc:
    print("refused:", str(exc)[:80])
"""


def refusal() -> str:
    """Pinning after the backend initialised the GPU is refused (a fresh interpreter)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path[:2])}
    done = subprocess.run([sys.executable, "-c", REFUSAL], capture_output=True, text=True, timeout=300, env=env)
    return (done.stdout.strip().splitlines() or [f"exit {done.returncode}: {done.stderr[-200:]}"])[-1]


def pick_backend(asked: str | None) -> str:
    if asked:
        return asked
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    return next((b for b in ("jax", "torch", "tensorflow") if importlib.util.find_spec(b)), "tensorflow")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("jax", "torch", "tensorflow"))
    parser.add_argument("--processes", type=int, default=3, help="processes sharing the GPU (2-4). Default: 3")
    parser.add_argument("--cap-mb", type=int, default=2048, help="per-process cap for the capped run. Default: 2048")
    parser.add_argument("--steps", type=int, default=40, help="training batches per model. Default: 40")
    parser.add_argument("--json", default="gpu_check.json", help="where to write the results. Default: gpu_check.json")
    parser.add_argument("--dry-run-cpu", action="store_true", help="run the checks on CPU slots (no GPU needed)")
    parser.add_argument("--requests", type=int, default=2000, help="served requests. Default: 2000")
    args = parser.parse_args(argv)
    global DRY_RUN
    DRY_RUN = args.dry_run_cpu
    found = ["CPU (dry run, no GPU used)"] if DRY_RUN else gpus()
    if not found:
        why = "not found" if shutil.which("nvidia-smi") is None else "lists no GPU"
        print(NO_GPU.format(why=why))
        Path(args.json).write_text(json.dumps({"skipped": NO_GPU.format(why=why)}))
        return 0
    backend = pick_backend(args.backend)
    os.environ["KERAS_BACKEND"] = backend  # before anything imports keras, here and in every worker
    from pytest_kerasmp import frameworks

    results: dict = {"gpus": found, "backend": backend, "backend_version": frameworks.get(backend).version()}
    rows = []
    for cap in (None, args.cap_mb):
        r = sharing(args.processes, cap, args.steps)
        results.setdefault("sharing", []).append(r)
        peaks = ", ".join(f"{m}" for m in r["peak_mb"].values())
        rows.append((f"{r['processes']} processes on {'CPU slots' if DRY_RUN else 'GPU 0'}, {r['mode']}", f"peak MB per process: {peaks}; "
                     f"wall {r['wall_s']:.1f} s" + ("" if r["within_cap"] is None else f"; within cap: {r['within_cap']}")))
    s = serving(requests=args.requests, clients=16, batch=64)
    results["serving"] = s
    rows.append(("served CNN, 16 clients, 1 sample each", f"{s['served_per_s']:.0f} req/s = {s['fraction']:.0%} of "
                 f"in-process full batches ({s['in_process_per_s']:.0f} samples/s)"))
    t = independent(args.processes, args.steps)
    results["independent"] = t
    rows.append((f"{t['models']} models trained on GPU slots", f"{t['parallel_s']:.1f} s vs {t['serial_s']:.1f} s "
                 f"serially: {t['speedup']:.2f}x"))
    if not DRY_RUN:
        results["refusal"] = refusal()
        rows.append(("pin after the GPU was initialised", results["refusal"]))
    width = max(len(a) for a, _ in rows)
    print(f"gpu_check: {found[0]}; Keras backend {backend} {results['backend_version']}")
    for a, b in rows:
        print(f"  {a.ljust(width)}  {b}")
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(f"gpu_check: wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
