#!/usr/bin/env python3
"""Figures per Keras backend on this machine (CPU slots): `import keras` in a pinned worker,
a pool of 2 workers' start, a served tiny model's requests/s, a cluster's start + one
all-reduce. Run from the repository root: python3 tools/backend_figures.py [jax torch ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

IMPORT = """
import os, time
from pytest_kerasmp import pin_process, plan_slots
pin_process(plan_slots(1)[0])
t = time.perf_counter()
import keras
print(time.perf_counter() - t)
"""


def figures(backend: str) -> dict:
    os.environ["KERAS_BACKEND"] = backend
    import backend_tasks
    import numpy as np

    from pytest_kerasmp import InferenceServer, KerasCluster, ModelRef, WorkerPool, plan_slots

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    imports = [float(subprocess.run([sys.executable, "-c", IMPORT], capture_output=True, text=True, env=env,
                                    timeout=120, check=True).stdout.split()[-1]) for _ in range(3)]
    starts = []
    for _ in range(3):
        t = time.perf_counter()
        with WorkerPool(plan_slots(2), name="fig", start_timeout_s=120):
            starts.append(time.perf_counter() - t)
    slot = plan_slots(2)[0]
    with InferenceServer(ModelRef.from_builder("backend_tasks:linear"), slot, max_batch_size=64, max_delay_ms=2) as server:
        x = np.ones(4, np.float32)
        server.predict(x)
        done = [0]

        def client() -> None:
            end = time.perf_counter() + 3.0
            while time.perf_counter() < end:
                server.predict(x)
                done[0] += 1

        threads = [threading.Thread(target=client) for _ in range(8)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=30)
        rate = done[0] / (time.perf_counter() - t)
    t = time.perf_counter()
    with KerasCluster(2, slots=plan_slots(2), start_timeout_s=120, run_timeout_s=120) as cluster:
        total = cluster.run(backend_tasks.all_reduce_sum)
        cluster_s = time.perf_counter() - t
        t = time.perf_counter()
        cluster.run(backend_tasks.all_reduce_sum)
        second_s = time.perf_counter() - t
    return {"backend": backend, "import_keras_s": imports, "pool2_start_s": starts, "served_req_per_s_8_clients": rate,
            "cluster_start_plus_all_reduce_s": cluster_s, "all_reduce_again_s": second_s, "sum": total}


if __name__ == "__main__":
    for name in sys.argv[1:] or ["tensorflow", "jax", "torch"]:
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, timeout=600) \
            if "--one" not in sys.argv else None
        if out is not None:
            print(out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:], flush=True)
            continue
        print(json.dumps(figures(sys.argv[-1])))
        break
