"""Scripts on the Ray backend as on the local one: task functions defined in a guarded script
run in actors (each imports the script as ``__mp_main__``), an unguarded script is refused
with the same message, and the actors' output is prefixed and quiet like local children's.

Each script starts a loopback cluster of its own and ends it; each run is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pytest_kerasmp.ray import output as _ray_output
from pytest_kerasmp.slots.devices import DeviceSlot
from pytest_kerasmp.errors import MAIN_NOT_GUARDED, MAIN_NOT_ON_NODE

pytest.importorskip("ray")

TESTS = os.path.dirname(os.path.abspath(__file__))

GUARDED = """
import sys, time
from pytest_kerasmp import WorkerPool
from pytest_kerasmp.runtime.wire import transport
from pytest_kerasmp.ray.cluster import LocalRayCluster, plan_ray_slots

def double(x):
    print("doubling", x, file=sys.stderr)
    return 2 * x

if __name__ == "__main__":
    cluster = LocalRayCluster(1, cpus_per_node=1)
    try:
        with WorkerPool(plan_ray_slots()[:1], backend="ray", name="script") as pool:  # imports TensorFlow
            print("RESULT", pool.submit(double, 21).result(timeout=60), flush=True)
            time.sleep(2)  # Ray's log monitor forwards the task's line
        transport.main_script = lambda: "/nonexistent/moved.py"  # as on a node without the script
        with WorkerPool(plan_ray_slots()[:1], backend="ray", name="moved", warm_import=False) as pool:
            try:
                pool.submit(double, 1).result(timeout=60)
            except RuntimeError as exc:
                print("MISSING", exc, flush=True)
    finally:
        cluster.shutdown()
"""

UNGUARDED = """
import sys
sys.path.insert(0, {tests!r})
import pool_tasks
from pytest_kerasmp import WorkerPool
from pytest_kerasmp.ray.cluster import LocalRayCluster, plan_ray_slots
cluster = LocalRayCluster(1, cpus_per_node=1)
try:
    pool = WorkerPool(plan_ray_slots()[:1], backend="ray", warm_import=False, start_timeout_s=60)
    print(pool.submit(pool_tasks.add, 1, 2).result(timeout=60))
except Exception as exc:
    print("REFUSED", type(exc).__name__, exc, flush=True)
finally:
    cluster.shutdown()
"""


def run_script(tmp_path, name: str, source: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / name
    script.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)


def test_functions_of_a_guarded_script_run_in_actors_and_their_output_is_prefixed_and_quiet(tmp_path):
    done = run_script(tmp_path, "guarded.py", GUARDED)
    assert "RESULT 42" in done.stdout, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert any(line.startswith("[kerasmp-script-w0 slot0 pid ") and line.endswith("] doubling 21") for line in lines), lines
    for noise in ("absl::InitializeLog", "I0000", "(SlotWorker", "\x1b[", "repeated"):
        assert noise not in done.stderr, f"{noise!r} in the actors' output:\n{done.stderr[-3000:]}"
    missing = next(line for line in done.stdout.splitlines() if line.startswith("MISSING"))
    expected_tail = MAIN_NOT_ON_NODE.split("{path}")[1].split("{node}")[0]
    assert "Can't get attribute 'double'" in missing and "/nonexistent/moved.py" + expected_tail in missing


def test_an_unguarded_script_is_refused_as_locally(tmp_path):
    done = run_script(tmp_path, "unguarded.py", UNGUARDED.format(tests=TESTS))
    refused = next((line for line in done.stdout.splitlines() if line.startswith("REFUSED")), "")
    assert refused.startswith("REFUSED WorkerStartupError"), done.stdout + done.stderr[-3000:]
    path = str(tmp_path / "unguarded.py")
    assert MAIN_NOT_GUARDED.format(path=path) in refused


def test_actor_lines_are_filtered_and_prefixed_other_lines_left_to_ray(capsys, monkeypatch):
    monkeypatch.delenv("PYTEST_KERASMP_TF_LOGS", raising=False)
    cpu, gpu = DeviceSlot(index=0, kind="CPU", cores=(0,)), DeviceSlot(index=1, kind="GPU", gpu="0")
    _ray_output.register("p w0", cpu)
    _ray_output.register("p w1", gpu)
    passed: list[dict] = []
    printer = _ray_output._Printer(passed.append)
    cuda = "E0000 00:00:1.0 1 cuda_executor.cc:1] failed call to cuInit: UNKNOWN ERROR (303)"
    chatter = ["WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
               "I0000 00:00:1796.1 12 port.cc:153] oneDNN custom operations are on."]
    printer({"actor_name": _ray_output.label("p w0", cpu), "pid": 11, "lines": [*chatter, cuda, "hello"]})
    printer({"actor_name": _ray_output.label("p w1", gpu), "pid": 12, "lines": [cuda]})
    other = {"actor_name": "SomeoneElse", "pid": 13, "lines": ["theirs"]}
    printer(other)
    assert capsys.readouterr().err.splitlines() == [
        "[kerasmp-p-w0 slot0 pid 11] hello",
        f"[kerasmp-p-w1 slot1 pid 12] {cuda}",  # on a GPU slot it says why there is no GPU
    ]
    assert passed == [other]
    monkeypatch.setenv("PYTEST_KERASMP_TF_LOGS", "1")
    printer({"actor_name": _ray_output.label("p w0", cpu), "pid": 11, "lines": chatter})
    assert capsys.readouterr().err.splitlines() == [f"[kerasmp-p-w0 slot0 pid 11] {line}" for line in chatter]
