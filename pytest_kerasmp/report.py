"""What a run leaves behind: the speedup gate, the JSON run record and its plot.

The gate compares ratios measured within one run (speedups), never absolute times, so it
holds on CI machines of any speed: ``--kerasmp-min-speedup=augmentation:pool:1.5`` fails the
session when that comparison's measured speedup is below 1.5.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pytest_kerasmp.devices import DeviceSlot
from pytest_kerasmp.speedup import Comparison, seconds_text

REPORT_JSON = "kerasmp-report.json"
REPORT_PNG = "kerasmp-speedup.png"
FLOOR_FORMAT = "use SCENARIO[:VARIANT]:FLOOR, e.g. augmentation:pool:1.5"


@dataclasses.dataclass(frozen=True)
class Floor:
    """A minimum speedup for one scenario (all its variants) or one scenario:variant."""

    key: str
    minimum: float

    def matches(self, comparison: Comparison) -> bool:
        return self.key in (comparison.key, comparison.scenario)


def parse_floors(values: Iterable[str]) -> list[Floor]:
    """``["augmentation:pool:1.5,served_prediction:1.2"]`` -> floors; ValueError names the bad one."""
    floors = []
    for value in values:
        for item in filter(None, (v.strip() for v in value.split(","))):
            key, sep, number = item.rpartition(":")
            try:
                minimum = float(number)
            except ValueError:
                minimum = float("nan")
            if not sep or not key or not minimum > 0:
                raise ValueError(f"--kerasmp-min-speedup={item!r} is invalid: {FLOOR_FORMAT}")
            floors.append(Floor(key, minimum))
    return floors


def gate(comparisons: Sequence[Comparison], floors: Sequence[Floor]) -> list[str]:
    """One line per floor that the run missed (below it, or never measured)."""
    failures = []
    measured = sorted({c.key for c in comparisons if c.parallel_s})
    for floor in floors:
        hits = [c for c in comparisons if floor.matches(c) and c.parallel_s and c.serial_s]
        if not hits:
            failures.append(
                f"--kerasmp-min-speedup {floor.key}:{floor.minimum:g}: no comparison named "
                f"{floor.key!r} was measured in this run (measured: {', '.join(measured) or 'none'}); "
                "check the name or select that scenario"
            )
        for c in hits:
            if c.speedup < floor.minimum:
                failures.append(
                    f"--kerasmp-min-speedup {floor.key}:{floor.minimum:g}: {c.key} measured "
                    f"{c.speedup:.2f}x ({seconds_text(c.serial_median_s)} serial vs {seconds_text(c.parallel_median_s)} "
                    f"parallel, {c.workers} workers, median of {len(c.parallel_s)}), below its floor"
                )
    return failures


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_record(
    comparisons: Sequence[Comparison],
    slots: Sequence[DeviceSlot],
    *,
    args: Sequence[str],
    exit_status: int,
    gate_failures: Sequence[str],
) -> dict[str, Any]:
    """Every figure of the run plus what is needed to reproduce it (no TensorFlow import)."""
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["pytest", *args]),
        "cwd": os.getcwd(),
        "exit_status": exit_status,
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "cores_of_this_process": sorted(os.sched_getaffinity(0)),  # after pinning, if pinned
            **{name: _version(name) for name in ("tensorflow", "keras", "numpy", "pytest", "pytest-xdist", "pytest-benchmark")},
        },
        "slots": [{**s.to_json(), "describe": s.describe()} for s in slots],
        "gpus": sorted({s.gpu_name for s in slots if s.gpu_name}),
        "comparisons": [c.to_json() for c in comparisons if c.serial_s and c.parallel_s],
        "gate_failures": list(gate_failures),
    }


def write_report(directory: str | os.PathLike[str], record: dict[str, Any], comparisons: Sequence[Comparison]) -> list[Path]:
    """Write the JSON record and, when matplotlib is installed, the speedup plot."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / REPORT_JSON]
    png = plot(out / REPORT_PNG, [c for c in comparisons if c.serial_s and c.parallel_s])
    record["plot"] = png.name if png else None
    written[0].write_text(json.dumps(record, indent=2) + "\n")
    return written + ([png] if png else [])


def plot(path: Path, comparisons: Sequence[Comparison]) -> Path | None:
    """A horizontal bar per scenario:variant, speedup with a line at 1x; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not comparisons:
        return None
    labels = [c.key for c in comparisons]
    values = [c.speedup for c in comparisons]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.2))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(labels)), values, color=colors)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup: serial median / parallel median (log scale; 1 = no gain)")
    ax.set_title("pytest-kerasmp: measured side by side in one run", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
