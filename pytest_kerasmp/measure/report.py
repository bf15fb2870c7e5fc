"""What a run leaves behind: the JSON run record, its Markdown summary, the machine's noise.

The record keeps every comparison, including those whose check failed, whose side raised or
whose rounds were skipped; the gate's verdicts; the seeds; and how busy the machine was before
and after (a shared machine makes intervals wide, and the report says so).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_kerasmp import frameworks
from pytest_kerasmp.measure.comparison import KIND, Comparison, check_text, rounds_text, seconds_text
from pytest_kerasmp.measure.gate import Verdict, comparison_lines, outcomes_by_name
from pytest_kerasmp.measure.plot import load_curves, plot, timeline, title
from pytest_kerasmp.slots.devices import DeviceSlot

REPORT_JSON = "kerasmp-report.json"
REPORT_MD = "kerasmp-report.md"
REPORT_PNG = "kerasmp-speedup.png"
LEASES_PNG = "kerasmp-leases.png"
LOAD_PNG = "kerasmp-load.png"
SUMMARY_ENV = "GITHUB_STEP_SUMMARY"
NOISE_WARNING = (
    "kerasmp: the machine was busy during this run ({reasons}); intervals are wider and verdicts "
    "less certain than on a quiet machine: rerun when it is idle, or on a dedicated runner"
)
#: A process other than this run's that uses at least this much of a core counts as busy.
BUSY_PERCENT = 50.0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _governors() -> list[str]:
    found = set()
    for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_governor"):
        try:
            found.add(cpu.read_text().strip())
        except OSError:
            pass
    return sorted(found)


def machine_noise(sample_s: float = 0.3) -> dict[str, Any]:
    """Load average, busy processes outside this run (by CPU over ``sample_s``), CPU governor."""
    import psutil

    me = psutil.Process()
    ours = {me.pid, *(p.pid for p in me.children(recursive=True))}
    procs = [p for p in psutil.process_iter(["pid", "name"]) if p.pid not in ours]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(sample_s)
    busy = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
        except psutil.Error:
            continue
        if cpu >= BUSY_PERCENT:
            busy.append({"pid": p.pid, "name": p.info["name"], "cpu_percent": round(cpu)})
    return {
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "busy_processes": sorted(busy, key=lambda b: -b["cpu_percent"])[:10],
        "cpu_governor": _governors() or None,
    }


def disturbed(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> list[str]:
    """Why the run counts as disturbed (empty: it was quiet)."""
    reasons = []
    cpus = os.cpu_count() or 1
    if before and before["loadavg"][0] > 0.5 * cpus:
        reasons.append(f"load average {before['loadavg'][0]:g} on {cpus} CPUs before the run")
    for when, noise in (("before", before), ("after", after)):
        if noise and noise["busy_processes"]:
            names = ", ".join(f"{b['name']} ({b['cpu_percent']}%)" for b in noise["busy_processes"][:3])
            reasons.append(f"busy processes {when} it: {names}")
    if before and before.get("cpu_governor") and set(before["cpu_governor"]) - {"performance"}:
        reasons.append(f"CPU governor {'/'.join(before['cpu_governor'])}, not performance")
    return reasons


def run_record(
    comparisons: Sequence[Comparison],
    slots: Sequence[DeviceSlot],
    *,
    args: Sequence[str],
    exit_status: int,
    verdicts: Sequence[Verdict] = (),
    verdict: str = "",
    noise: Mapping[str, Any] | None = None,
    seeds: Mapping[str, Any] | None = None,
    against: Mapping[str, Any] | None = None,
    xdist_workers: int = 0,
) -> dict[str, Any]:
    """Every figure of the run plus what is needed to reproduce it (no TensorFlow import)."""
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["pytest", *args]),
        "cwd": os.getcwd(),
        "exit_status": exit_status,
        "environment": {
            "host": socket.gethostname(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "cores_of_this_process": sorted(os.sched_getaffinity(0)),  # after pinning, if pinned
            "xdist_workers": xdist_workers,
            "keras_backend": frameworks.backend_name()[0],
            **{name: _version(name) for name in ("tensorflow", "jax", "torch", "keras", "numpy", "pytest", "pytest-xdist", "pytest-benchmark")},
        },
        "slots": [{**s.to_json(), "describe": s.describe()} for s in slots],
        "gpus": sorted({s.gpu_name for s in slots if s.gpu_name}),
        "comparisons": [c.to_json() for c in comparisons],
        "gate": {"verdict": verdict, "verdicts": [v.to_json() for v in verdicts]},
        "gate_failures": [v.message for v in verdicts if v.outcome not in ("met", "skipped")],
        "noise": dict(noise or {}),
        "seeds": dict(seeds) if seeds else None,
        "against": dict(against) if against else None,
    }


def markdown(record: Mapping[str, Any]) -> str:
    """The run record as a Markdown summary: verdict, one table per kind, noise, gate lines."""
    gate = record["gate"]
    outcomes = outcomes_by_name([Verdict(**v) for v in gate["verdicts"]])
    lines = [f"## {title(record)}", "", f"**{gate['verdict'] or 'kerasmp gate: no floors set'}**", "",
             f"`{record['command']}`", ""]
    comparisons = [Comparison.from_json(c) for c in record["comparisons"]]
    for kind, words in KIND.items():
        group = [c for c in comparisons if c.kind == kind]
        if not group:
            continue
        lines += [f"### {words.ratio}", "",
                  f"| comparison | workers | {words.baseline} | {words.candidate} | {words.ratio} [95% interval] | rounds | check | gate |",
                  "| --- | ---: | ---: | ---: | --- | ---: | --- | --- |"]
        for c in group:
            times = (seconds_text(c.serial_median_s), seconds_text(c.parallel_median_s)) if c.timed else ("-", "-")
            figure = c.figure_text() if c.timed else c.headline()
            if c.timed and words.efficiency:
                figure += f", efficiency {c.efficiency:.0%}"
            check = check_text(c) + (f": {c.error}" if c.error else "")
            lines.append(f"| `{c.name}` | {c.workers} | {times[0]} | {times[1]} | {figure} | "
                         f"{rounds_text(c)} | {check.replace('|', '/')} | {outcomes.get(c.name, '-')} |")
        lines.append("")
    if gate["verdicts"]:
        lines += ["### gate", ""] + [f"- {v['outcome']}: {v['message']}" for v in gate["verdicts"]] + [""]
    if record.get("against"):
        lines += [f"### against {record['against']['path']}", ""] + [f"- {x}" for x in comparison_lines(record["against"]["rows"])] + [""]
    noise = record.get("noise") or {}
    if noise:
        b, a = noise.get("before") or {}, noise.get("after") or {}
        lines += ["### machine", "", f"- load average before {b.get('loadavg')}, after {a.get('loadavg')}; "
                  f"CPU governor {b.get('cpu_governor') or 'unreadable'}"]
        for reason in noise.get("disturbed", []):
            lines.append(f"- warning: {reason}")
        lines.append("")
    summary = record.get("lease_summary")
    if summary and summary.get("leases"):
        lines += ["### slot leases", "",
                  f"- {summary['leases']} leases over {summary['span_s']:.1f} s: slot use {summary['slot_use']:.0%} "
                  f"(busy slot-seconds / (slots x span)); longest wait {summary['longest_wait_s']:.1f} s "
                  f"({summary['longest_wait']})"]
        if record.get("leases_plot"):
            lines.append(f"- timeline: ![slot leases]({record['leases_plot']})")
        lines.append("")
    lines += load_lines(comparisons, record.get("load_plot"))
    if record.get("seeds"):
        s = record["seeds"]
        lines += [f"Seed: `--kerasmp-seed={s['base']}`" + (" `--kerasmp-deterministic`" if s["deterministic"] else ""), ""]
    return "\n".join(lines)


def load_lines(comparisons: Sequence[Comparison], load_plot: str | None) -> list[str]:
    """The served-load section: per model, each server's rate under the latency bound (median
    of rounds, with every round's bracket) and the plot."""
    lines: list[str] = []
    for c in comparisons:
        extra = c.extra
        if not extra.get("load_curves"):
            continue
        model = c.variant.split("-")[0]
        lines += [f"### served load: {model}", "",
                  f"p99 bound {extra['bound_ms']:.3g} ms ({extra['bound_ms'] / extra['single_sample_ms']:.0f}x the in-process "
                  f"single-sample latency, {extra['single_sample_ms']:.3g} ms); in-process full batches "
                  f"{extra['full_batch_rows_per_s']:.0f} rows/s", "",
                  "| server | rate under the bound | rounds: [held, failed at] | limited by |", "| --- | ---: | --- | --- |"]
        for server, rates in extra["rates"].items():
            brackets = ", ".join(f"[{a:.0f}, {'-' if b is None else f'{b:.0f}'}]" for a, b in extra["brackets"][server])
            lines.append(f"| {server} | {statistics.median(rates):.0f}/s | {brackets} | {', '.join(extra['limited_by'][server])} |")
        lines.append("")
    if lines and load_plot:
        lines += [f"- latency vs offered rate: ![served load]({load_plot})", ""]
    return lines


def write_report(directory: str | os.PathLike[str], record: dict[str, Any]) -> list[Path]:
    """Write the JSON record, its Markdown summary and, with matplotlib, the plot; append the
    Markdown to ``$GITHUB_STEP_SUMMARY`` when that is set."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(out / REPORT_PNG, record)
    record["plot"] = png.name if png else None
    leases_png = timeline(out / LEASES_PNG, record)
    record["leases_plot"] = leases_png.name if leases_png else None
    load_png = load_curves(out / LOAD_PNG, record)
    record["load_plot"] = load_png.name if load_png else None
    (out / REPORT_JSON).write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(record) + "\n"
    (out / REPORT_MD).write_text(text)
    summary = os.environ.get(SUMMARY_ENV)
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(text)
    return [out / REPORT_JSON, out / REPORT_MD] + [p for p in (png, leases_png, load_png) if p]
