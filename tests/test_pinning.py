"""pin_process in fresh interpreters: before, after and too late for TensorFlow."""

from __future__ import annotations

import json

PIN = """
import json, os, sys
from pytest_kerasmp import DeviceSlot, pin_process, current_slot
slot = DeviceSlot(index=1, kind="CPU", cores=(sorted(os.sched_getaffinity(0))[-1],))
"""

REPORT = """
import tensorflow as tf
tf.reduce_sum(tf.ones((8, 8))).numpy()
print(json.dumps({
    "intra": tf.config.threading.get_intra_op_parallelism_threads(),
    "inter": tf.config.threading.get_inter_op_parallelism_threads(),
    "cores": sorted(os.sched_getaffinity(0)),
    "slot_cores": list(slot.cores),
    "current": current_slot() == slot,
    "env": os.environ["PYTEST_KERASMP_SLOT"],
}))
"""


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_pin_before_import_configures_tensorflow_when_imported(run_python):
    done = run_python(PIN + "pin_process(slot)\nassert 'tensorflow' not in sys.modules\n" + REPORT)
    assert done.returncode == 0, done.stderr
    rec = _last_json(done.stdout)
    assert rec["intra"] == rec["inter"] == 1
    assert rec["cores"] == rec["slot_cores"] and rec["current"]
    assert json.loads(rec["env"])["index"] == 1


def test_pin_after_import_but_before_first_op_configures_at_once(run_python):
    done = run_python(PIN + "import tensorflow\npin_process(slot)\n" + REPORT)
    assert done.returncode == 0, done.stderr
    rec = _last_json(done.stdout)
    assert rec["intra"] == rec["inter"] == 1 and rec["cores"] == rec["slot_cores"]


def test_pin_after_tensorflow_initialised_raises_and_changes_nothing(run_python):
    done = run_python(
        PIN
        + """
import tensorflow as tf
tf.constant(1.0) + 1
before = dict(os.environ), sorted(os.sched_getaffinity(0))
from pytest_kerasmp import DeviceAlreadyInitializedError
try:
    pin_process(slot)
except DeviceAlreadyInitializedError as exc:
    assert (dict(os.environ), sorted(os.sched_getaffinity(0))) == before
    assert current_slot() is None
    print(exc)
"""
    )
    assert done.returncode == 0, done.stderr
    assert "TensorFlow had already initialised its devices in process" in done.stdout
    assert "slot1 cores" in done.stdout


def test_gpu_slot_environment_without_tensorflow(run_python):
    done = run_python(
        """
import json, os
from pytest_kerasmp import DeviceSlot, pin_process
pin_process(DeviceSlot(index=0, kind="GPU", gpu="5", shared=True))
print(json.dumps({k: os.environ.get(k) for k in
      ("CUDA_VISIBLE_DEVICES", "TF_FORCE_GPU_ALLOW_GROWTH", "CUDA_DEVICE_ORDER")}))
"""
    )
    assert done.returncode == 0, done.stderr
    assert _last_json(done.stdout) == {
        "CUDA_VISIBLE_DEVICES": "5",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
