"""Where a single-sample request's time goes: the model alone, then through the server, back to
back and after idle gaps (issue 31's small-request path).

    .venv/bin/python tools/request_path.py [tiny|cnn] [calls]

On 2 slots: the model (and then the server) on slot 0, this process's client on slot 1. Prints
the median and p90 of each, in ms:
- ``forward``: the compiled forward function in one process, one sample (what the server runs);
- ``round trip``: ``client.submit(x).result()`` to an ``InferenceServer``, one request at a time;
- ``server compute``: the server's own batch time (``stats()``), the rest being wire, loop
  and wake-ups;
each with 0, 2, 5 and 20 ms idle before every call (a request at low load finds the
framework's threads, and the core, asleep).
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
GAPS_S = (0.0, 0.002, 0.005, 0.02)


def timed(call, calls: int, gap: float) -> list[float]:
    times = []
    for i in range(calls):
        if gap:
            time.sleep(gap)
        t0 = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t0)
    return times


def line(what: str, gap: float, times: list[float]) -> str:
    return f"{what:<16} idle {gap * 1e3:>4.0f} ms: p50 {np.median(times) * 1e3:7.3f} ms, p90 {np.percentile(times, 90) * 1e3:7.3f} ms"


def main(name: str, calls: int) -> None:
    sys.path.insert(0, str(ROOT / "scenarios"))
    from test_served_prediction import MODELS, preprocess

    from pytest_kerasmp import InferenceServer, ModelRef, frameworks, pin_process, plan_slots

    slots = plan_slots(2)
    pin_process(slots[0])
    build, shape, _ = MODELS[name]
    model = build()
    xs = preprocess(np.random.default_rng(0).integers(0, 256, size=(64, *shape), dtype=np.uint8))
    forward = frameworks.active().forward(model, [(shape, "float32", "x")])
    for gap in GAPS_S:
        forward(xs[:1])
        print(line("forward", gap, timed(lambda i: forward(xs[i % 64][None]), calls, gap)), flush=True)
    with tempfile.TemporaryDirectory() as tmp, InferenceServer(ModelRef.save(model, tmp, name), slots[0], name="path") as server:
        os.sched_setaffinity(0, set(slots[1].cores))  # the client's side on the other core
        client = server.client()
        for gap in GAPS_S:
            client.submit(xs[0]).result(30)
            before = server.stats()
            trips = timed(lambda i: client.submit(xs[i % 64]).result(30), calls, gap)
            after = server.stats()
            compute = (after["compute_s"] - before["compute_s"]) / max(1, after["batches"] - before["batches"])
            print(line("round trip", gap, trips) + f"; server compute {compute * 1e3:.3f} ms a batch", flush=True)
        client.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny", int(sys.argv[2]) if len(sys.argv) > 2 else 200)
