"""pytest-xdist workers are pinned to slots before any test module or conftest imports TF."""

from __future__ import annotations

import os

import pytest

from pytest_kerasmp.slots import placement


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 usable cores")
@pytest.mark.parametrize("conftest_imports_tf", [False, True], ids=["plain", "conftest-imports-tf"])
def test_two_workers_get_disjoint_cores_and_capped_tf_threads(
    run_pytest, pytester, probe, monkeypatch, conftest_imports_tf
):
    if conftest_imports_tf:
        pytester.makeconftest("import tensorflow as tf\n")
    monkeypatch.setenv("PROBE_TF", "1")
    result = run_pytest("-n", "2", "--dist", "each", "--kerasmp-gpus=2")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["kerasmp: --kerasmp-gpus=2 *; xdist workers gw0->slot0, gw1->slot1"])
    records = probe()
    assert sorted(records) == ["gw0", "gw1"]
    seen = []
    for worker, rec in records.items():
        assert rec["slot"]["index"] == int(worker[2:])
        assert rec["cores"] == rec["slot"]["cores"]
        # TensorFlow's own view inside the worker: capped threads, CPU only.
        assert rec["intra"] == rec["inter"] == len(rec["cores"])
        assert rec["tf_gpus"] == 0 and rec["cuda_visible"] == "-1"
        assert rec["n_slots"] == 1  # its own part of the session: one slot each
        seen.append(set(rec["cores"]))
    assert not seen[0] & seen[1], f"workers share cores: {seen}"
    print({w: (r["cores"], r["intra"], r["inter"]) for w, r in records.items()})


def test_more_workers_than_slots_share_gpus_with_memory_growth(run_pytest, probe, monkeypatch):
    monkeypatch.setenv("PYTEST_KERASMP_FAKE_GPUS", "4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    result = run_pytest("-n", "3", "--dist", "each", "--kerasmp-gpus=2")
    result.assert_outcomes(passed=3)
    records = probe()
    assert {w: r["cuda_visible"] for w, r in records.items()} == {"gw0": "2", "gw1": "3", "gw2": "2"}
    assert all(r["growth"] == "true" for r in records.values())  # gw0 and gw2 share GPU 2


def test_unrequested_xdist_workers_are_not_pinned(run_pytest, probe):
    result = run_pytest("-n", "2", "--dist", "each")
    result.assert_outcomes(passed=2)
    records = probe()
    for rec in records.values():
        assert rec["slot"] is None and rec["cuda_visible"] is None
        assert rec["cores"] == sorted(os.sched_getaffinity(0))
    # Unpinned, but their fixtures still split the 'auto' slots: pools do not pile up.
    assert sum(r["n_slots"] for r in records.values()) == max(2, len(os.sched_getaffinity(0)))


def test_unpinned_xdist_comparisons_are_marked_competed(run_pytest, pytester):
    pytester.makepyfile(
        test_cmp="""
        import time
        def test_cmp(kerasmp_speedup):
            kerasmp_speedup(lambda: time.sleep(0.002), lambda: time.sleep(0.001), workers=1, rounds=2)
        """
    )
    result = run_pytest("-n", "2", "--dist", "each")
    result.assert_outcomes(passed=2)
    rows = [line for line in result.stdout.lines if line.startswith("cmp ")]
    assert len(rows) == 2 and all(("]*" in r or "x*" in r) for r in rows), rows
    result.stdout.fnmatch_lines([placement.COMPETED_NOTE, f"  cmp: {placement.UNPINNED_COMPETED}"])


def test_nested_pytest_inside_a_worker_does_not_take_the_outer_plan(run_pytest, pytester):
    # The plan travels to workers through the environment; a pytest started *by* a worker
    # (pytester, a subprocess) is not the controller's worker and must not pin itself by it.
    pytester.makepyfile(
        test_outer="""
        import os, subprocess, sys

        def test_nested(tmp_path):
            (tmp_path / "test_inner.py").write_text(
                "import os\\n"
                "from pytest_kerasmp import current_slot\\n"
                "def test_inner():\\n"
                "    assert current_slot() is None\\n"
                "    assert 'PYTEST_KERASMP_SLOT' not in os.environ or os.environ['CUDA_VISIBLE_DEVICES'] == '-1'\\n"
            )
            env = {k: v for k, v in os.environ.items() if k != "PYTEST_KERASMP_GPUS"}
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                                  env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stdout + done.stderr
        """
    )
    run_pytest("-n", "1", "--kerasmp-gpus=1").assert_outcomes(passed=1)
