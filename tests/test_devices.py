"""Unit tests of device detection and slot planning (pure; GPU detection is faked)."""

from __future__ import annotations

import json
import os
import pickle
import stat
import warnings

import pytest

from pytest_kerasmp.slots import devices
from pytest_kerasmp.slots.devices import GPU, DeviceSlot, apply_visible_devices, detect_gpus, plan_slots
from pytest_kerasmp.errors import KerasMPWarning

SMI_OUTPUT = """\
GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-aaaaaaaa-1111)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-bbbbbbbb-2222)
  MIG 1g.10gb     Device  0: (UUID: MIG-cccccccc)
"""


def gpus(n: int) -> list[GPU]:
    return [GPU(id=str(i), name=f"G{i}", uuid=f"GPU-u{i}") for i in range(n)]


def test_parse_nvidia_smi_reads_gpus_and_skips_mig_lines():
    found = devices.parse_nvidia_smi(SMI_OUTPUT)
    assert found == [
        GPU("0", "NVIDIA A100-SXM4-80GB", "GPU-aaaaaaaa-1111"),
        GPU("1", "NVIDIA A100-SXM4-80GB", "GPU-bbbbbbbb-2222"),
    ]


@pytest.mark.parametrize(
    ("visible", "expected_ids"),
    [
        (None, ["0", "1", "2", "3", "4", "5"]),
        ("3,5", ["3", "5"]),
        ("5,3", ["5", "3"]),
        ("", []),
        ("-1", []),
        ("1,nope,2", ["1"]),  # CUDA stops at the first entry that names no GPU
        ("GPU-u4", ["GPU-u4"]),
        ("9", []),
    ],
)
def test_outer_cuda_visible_devices_is_indexed_not_renumbered(visible, expected_ids):
    chosen = apply_visible_devices(gpus(6), visible)
    assert [g.id for g in chosen] == expected_ids
    if visible == "GPU-u4":
        assert chosen[0].name == "G4"


def test_detect_gpus_fakes_by_count_and_by_names():
    assert [g.name for g in detect_gpus({"PYTEST_KERASMP_FAKE_GPUS": "2"})] == [
        "Fake GPU 0",
        "Fake GPU 1",
    ]
    found = detect_gpus({"PYTEST_KERASMP_FAKE_GPUS": "A100,H100", "CUDA_VISIBLE_DEVICES": "1"})
    assert [(g.id, g.name) for g in found] == [("1", "H100")]
    assert detect_gpus({"PYTEST_KERASMP_FAKE_GPUS": "0"}) == []


def _fake_smi(tmp_path, monkeypatch, body: str) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + body)
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("PYTEST_KERASMP_FAKE_GPUS")


def test_detect_gpus_runs_nvidia_smi_without_importing_tensorflow(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, f"cat <<'EOF'\n{SMI_OUTPUT}EOF\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    found = detect_gpus()
    assert [(g.id, g.uuid) for g in found] == [("1", "GPU-bbbbbbbb-2222")]


def test_detect_gpus_bounds_a_hanging_nvidia_smi(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, "exec sleep 30\n")
    monkeypatch.setattr(devices, "NVIDIA_SMI_TIMEOUT_S", 0.5)
    with pytest.warns(KerasMPWarning, match="treating this machine as having no GPU"):
        assert detect_gpus() == []


def test_detect_gpus_without_nvidia_smi_finds_none(monkeypatch, tmp_path):
    monkeypatch.delenv("PYTEST_KERASMP_FAKE_GPUS")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_gpus() == []


@pytest.mark.parametrize("g", [1, 2, 4])
@pytest.mark.parametrize("relation", ["N<G", "N=G", "N>G"])
def test_gpu_slots_use_gpu_i_mod_g(g, relation):
    n = {"N<G": max(1, g // 2), "N=G": g, "N>G": g + 1}[relation]
    if relation == "N<G" and g == 1:
        pytest.skip("no N < G with one GPU")
    slots = plan_slots(n, gpus=gpus(g))
    assert [s.gpu for s in slots] == [str(i % g) for i in range(n)]
    assert all(s.kind == "GPU" and s.cores == () and s.tf_device == "/GPU:0" for s in slots)
    shared = {s.gpu for s in slots if s.shared}
    assert shared == ({str(i) for i in range(n - g)} if n > g else set())
    for s in slots:
        env = s.environ()
        assert env["CUDA_VISIBLE_DEVICES"] == s.gpu
        assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"  # every GPU process, shared or not


def test_gpu_slots_keep_outer_names_and_memory_cap():
    visible = apply_visible_devices(gpus(8), "3,5")
    slots = plan_slots("auto", gpus=visible, memory_limit_mb=4096)
    assert [s.gpu for s in slots] == ["3", "5"]
    assert all(s.memory_limit_mb == 4096 for s in slots)
    # A memory limit replaces growth: TensorFlow refuses both on one device.
    assert "TF_FORCE_GPU_ALLOW_GROWTH" not in slots[0].environ(memory_growth=True)


@pytest.mark.parametrize(
    ("cores", "n", "expected"),
    [
        ((0, 1), 1, [(0, 1)]),
        ((0, 1), 2, [(0,), (1,)]),
        ((0, 1), "auto", [(0,), (1,)]),
        (tuple(range(8)), 3, [(0, 1, 2), (3, 4, 5), (6, 7)]),
        ((2, 5, 7), 2, [(2, 5), (7,)]),
    ],
)
def test_cpu_slots_split_usable_cores_disjointly(cores, n, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slots = plan_slots(n, gpus=[], cores=cores)
    assert [s.cores for s in slots] == expected
    assert not any(s.shared for s in slots)
    for s in slots:
        env = s.environ()
        assert env["CUDA_VISIBLE_DEVICES"] == "-1"
        assert env["TF_NUM_INTRAOP_THREADS"] == env["OMP_NUM_THREADS"] == str(len(s.cores))


def test_more_cpu_slots_than_cores_reuses_cores_with_a_warning():
    with pytest.warns(KerasMPWarning) as caught:
        slots = plan_slots(3, gpus=[], cores=(0, 1))
    assert str(caught[0].message) == devices.cores_reused(3, (0, 1), "the cores it was given", devices.ADVICE_OUTSIDE)
    assert caught[0].filename == __file__  # points at the caller, not at the plugin
    assert [s.cores for s in slots] == [(0,), (1,), (0,)]
    assert [s.shared for s in slots] == [True, False, True]


def test_plan_slots_in_a_scope_plans_over_it_and_says_so(monkeypatch):
    monkeypatch.setattr(devices, "_scope", None)
    four = plan_slots(4, gpus=gpus(4), memory_limit_mb=512)
    devices.set_scope(four[:2], "xdist worker gw0's part of the session (slot0, slot1)")
    assert devices.planning_scope() == "xdist worker gw0's part of the session (slot0, slot1)"
    planned = plan_slots(2)
    assert [s.gpu for s in planned] == ["0", "1"] and {s.memory_limit_mb for s in planned} == {512}
    devices.set_scope([DeviceSlot(index=0, kind="CPU", cores=(3,))], "its part (slot0)")
    with pytest.warns(KerasMPWarning, match=r"plan_slots\(2\) planned over its part \(slot0\), which has 1 core \{3\}"):
        assert [s.cores for s in plan_slots(2)] == [(3,), (3,)]
    assert [s.cores for s in plan_slots(1, gpus=[], cores=(0, 1))] == [(0, 1)]  # explicit wins


def test_auto_without_arguments_uses_this_process_affinity():
    slots = plan_slots()
    assert sorted(c for s in slots for c in s.cores) == sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize("bad", [0, -1, "two", "1.5", "", True, "0"])
def test_bad_slot_counts_are_refused(bad):
    with pytest.raises(ValueError, match="is not a positive integer or 'auto'"):
        plan_slots(bad, gpus=[], cores=(0, 1))


def test_slots_cross_processes_by_pickle_and_json():
    slot = DeviceSlot(index=1, kind="CPU", cores=(2, 3))
    assert pickle.loads(pickle.dumps(slot)) == slot
    assert DeviceSlot.from_json(json.loads(json.dumps(slot.to_json()))) == slot
    assert devices.loads_slots(devices.dumps_slots([slot])) == (slot,)
    assert slot.describe() == "slot1 cores {2, 3}"
