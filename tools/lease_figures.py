#!/usr/bin/env python3
"""Figures of slot leases on this machine, from outside (whole pytest runs):

    python3 tools/lease_figures.py cost [PAIRS]   # 500 trivial tests, -n 2 --kerasmp-gpus=2,
                                                  # leases per test vs off, in alternating pairs
    python3 tools/lease_figures.py mixed          # 8 one-slot tests of ~1 s and 3 two-slot tests
                                                  # under no -n, -n 2 and -n auto

``cost`` prints each side's median wall time and the per-test cost of a lease, (with - off) /
500, per pair (median and range): what an uncontended lease adds to a test. ``mixed`` prints
wall time, slot use and the longest wait from each run's report. Run from the repository
root with the project's environment (python3 dev.py test makes .venv).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = 500
TRIVIAL = f"""
import pytest

@pytest.mark.parametrize("i", range({TESTS}))
def test_trivial(i):
    pass
"""
MIXED = """
import time
import pytest

@pytest.mark.parametrize("i", range(8))
def test_one_slot(kerasmp_slots, i):
    assert len(kerasmp_slots) == 1
    time.sleep(1)

@pytest.mark.kerasmp_slots(2)
@pytest.mark.parametrize("i", range(3))
def test_two_slots(kerasmp_slots, i):
    assert len(kerasmp_slots) == 2
    time.sleep(1)
"""


def run(directory: Path, *args: str) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=directory, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"pytest {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall


def cost(pairs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "test_trivial.py").write_text(TRIVIAL)
        common = ("-n", "2", "--kerasmp-gpus=2")
        run(directory, *common)  # warm-up: caches, bytecode
        on, off = [], []
        for _ in range(pairs):
            on.append(run(directory, *common, "--kerasmp-leases=per-test"))
            off.append(run(directory, *common, "--kerasmp-leases=off"))
        per_test = sorted((a - b) / TESTS * 1e3 for a, b in zip(on, off, strict=True))
        print(f"{TESTS} trivial tests, -n 2 --kerasmp-gpus=2, {pairs} pairs (A B A B ...):")
        print(f"  leases per test: median {statistics.median(on):.2f} s [{min(on):.2f}, {max(on):.2f}]")
        print(f"  leases off:      median {statistics.median(off):.2f} s [{min(off):.2f}, {max(off):.2f}]")
        print(f"  per test, (with - off) / {TESTS}: median {statistics.median(per_test):.3f} ms "
              f"[{per_test[0]:.3f}, {per_test[-1]:.3f}] over the pairs")


def mixed() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "test_mixed.py").write_text(MIXED)
        for label, args in (("no -n", ()), ("-n 2", ("-n", "2")), ("-n auto", ("-n", "auto"))):
            report = directory / f"report-{label.replace(' ', '')}"
            wall = run(directory, *args, "--kerasmp-gpus=2", f"--kerasmp-report={report}")
            summary = json.loads((report / "kerasmp-report.json").read_text())["lease_summary"]
            print(f"{label:8} --kerasmp-gpus=2: wall {wall:.1f} s, {summary['leases']} leases over "
                  f"{summary['span_s']:.1f} s, slot use {summary['slot_use']:.0%}, longest wait "
                  f"{summary['longest_wait_s']:.1f} s ({summary['longest_wait']})")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("cost", "mixed"):
        sys.exit(__doc__)
    if sys.argv[1] == "cost":
        cost(int(sys.argv[2]) if len(sys.argv) > 2 else 5)
    else:
        mixed()
