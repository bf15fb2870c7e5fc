"""The report's plot: a forest plot of every comparison's interval, one panel per kind. No pytest.

Each row is one comparison: a dot at its estimate and a line over its 95% interval on a log
axis centred on 1x, the value printed beside it, its floors drawn as black ticks, coloured by
its gate outcome; a comparison that was never timed (check failed, a side raised, skipped)
keeps its row with the reason in red. Overheads are drawn as cost over reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_kerasmp.measure.comparison import KIND, Comparison
from pytest_kerasmp.measure.gate import Floor, Verdict, outcomes_by_name

COLOURS = {"met": "tab:green", "missed": "tab:red", "inconclusive": "tab:orange", "unmeasured": "tab:red",
           "skipped": "tab:gray", "-": "tab:blue"}


def _floors(record: Mapping[str, Any]) -> list[Floor]:
    seen = {v["floor"] for v in record["gate"]["verdicts"]}
    floors = []
    for text in seen:
        pattern, _, number = text.rpartition(":")
        floors.append(Floor(pattern, float(number)))
    return floors


def plot(path: Path, record: Mapping[str, Any]) -> Path | None:
    """Draw the record's comparisons into ``path``; None without matplotlib or comparisons."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return None

    comparisons = [Comparison.from_json(c) for c in record["comparisons"]]
    if not comparisons:
        return None
    outcomes = outcomes_by_name([Verdict(**v) for v in record["gate"]["verdicts"]])
    floors = _floors(record)
    groups = [(k, [c for c in comparisons if c.kind == k]) for k in KIND]
    groups = [(k, g) for k, g in groups if g]
    heights = [len(g) + 1.2 for _, g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(12, 0.38 * sum(heights) + 1.4),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (kind, group) in zip(axes[:, 0], groups, strict=True):
        words = KIND[kind]
        invert = words.inverted
        values = []
        for y, c in enumerate(group):
            colour = COLOURS.get(outcomes.get(c.name, "-"), "tab:blue")
            if not c.timed:
                ax.text(1.0, y, f"  {c.error or c.headline()}", color="tab:red",
                        va="center", fontsize=7, clip_on=False)
                continue
            iv = c.interval
            est, low, high = words.shown(iv.estimate, iv.low, iv.high)
            values += [low, high]
            ax.plot([low, high], [y, y], color=colour, linewidth=2.5, solid_capstyle="butt")
            ax.plot([est], [y], "o", color=colour, markersize=6)
            marks = [1 / f.minimum if invert else f.minimum for f in floors if f.matches(c)]
            for x in marks:
                values.append(x)
                ax.plot([x], [y], marker="|", color="black", markersize=14, markeredgewidth=2)
            label = c.figure_text() + f"  n={iv.rounds}" + ("" if iv.complete else f" ({iv.level:.0%})")
            ax.annotate(label, (max([high, *marks]), y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=7)
        values += [1.0]
        lo, hi = min(values), max(values)
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.6, hi * 5)  # room on the right for the printed values
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yticks(range(len(group)), [c.name for c in group], fontsize=7)
        ax.set_ylim(len(group) - 0.4, -0.8)
        ax.set_title(f"{words.ratio} ({len(group)})", fontsize=9, loc="left")
        ax.set_xlabel(words.axis, fontsize=8)
        ax.grid(axis="x", which="both", alpha=0.25)
        fmt = lambda v, _, words=words: words.tick(v)  # noqa: E731
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(fmt))
        ax.tick_params(axis="x", labelsize=7)
        if math.log10(hi / lo) < 1.3:  # few decades: label the minor ticks too
            ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(fmt))
            ax.tick_params(axis="x", which="minor", labelsize=6)
    handles = [Line2D([], [], color=c, marker="o", linewidth=2.5, label=o) for o, c in COLOURS.items() if o in ("met", "missed", "inconclusive")]
    handles.append(Line2D([], [], color="tab:blue", marker="o", linewidth=2.5, label="no floor"))
    handles.append(Line2D([], [], color="black", marker="|", linestyle="", markersize=12, markeredgewidth=2, label="floor"))
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncols=5, frameon=False)
    verdict = record["gate"]["verdict"] or "no floors set"
    fig.suptitle(f"{title(record)}\n{verdict}; dots: median of paired ratios, lines: 95% interval", fontsize=9, x=0.01, ha="left")
    fig.tight_layout(rect=(0.01, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def title(record: Mapping[str, Any]) -> str:
    """Names the run: when, where, slots, -n, seed."""
    env = record["environment"]
    parts = [record["created"].replace("T", " ").removesuffix("+00:00") + " UTC", f"{env['host']} ({env['cpu_count']} CPUs)",
             f"{len(record['slots'])} slot(s)"]
    if env.get("xdist_workers"):
        parts.append(f"-n {env['xdist_workers']}")
    if record.get("seeds"):
        parts.append(f"seed {record['seeds']['base']}")
    return "pytest-kerasmp: " + ", ".join(parts)


def timeline(path: Path, record: Mapping[str, Any]) -> Path | None:
    """Draw the session's slot leases into ``path``: one row per slot, time from the first
    request across, each lease a bar (coloured by its pytest process, labelled with its
    test), each wait before a grant a thin line; None without matplotlib or leases."""
    leases = record.get("leases") or []
    names = record.get("slot_names") or sorted({n for r in leases for n in r["slots"]})
    if not leases or not names:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    origin = min(r["requested"] for r in leases)
    owners = sorted({r["owner"] for r in leases})
    colours = {o: f"C{i % 10}" for i, o in enumerate(owners)}
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(names) + 1.8))
    row = {n: i for i, n in enumerate(names)}
    for r in leases:
        start, end, asked = r["granted"] - origin, r["released"] - origin, r["requested"] - origin
        for n in r["slots"]:
            y = row[n]
            ax.barh(y, end - start, left=start, height=0.6, color=colours[r["owner"]], edgecolor="black", linewidth=0.4)
            if start - asked > 0.05:  # the wait: a line under the row, from the request to the grant
                ax.plot([asked, start], [y + 0.38, y + 0.38], color=colours[r["owner"]], linewidth=1.2, linestyle=":")
                ax.plot([asked], [y + 0.38], marker="|", color=colours[r["owner"]], markersize=7)
        if end - start > 0.02 * max(1e-9, max(x["released"] for x in leases) - origin):
            label = r["test"].rsplit("::", 1)[-1][:24]
            ax.text(start + (end - start) / 2, row[r["slots"][0]], label, ha="center", va="center", fontsize=6, clip_on=True)
    summary = record.get("lease_summary") or {}
    use = summary.get("slot_use")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(len(names) - 0.4 + 0.2, -0.6)
    ax.set_xlabel("seconds since the first request (bars: leases, dotted: waits)", fontsize=8)
    handles = [matplotlib.patches.Patch(color=colours[o], label=o) for o in owners]
    ax.legend(handles=handles, loc="upper right", fontsize=7, ncols=min(len(owners), 8), frameon=False)
    heading = f"{len(leases)} leases on {len(names)} slots"
    if use is not None:
        heading += (f": slot use {use:.0%} (busy slot-seconds / (slots x {summary['span_s']:.1f} s)), "
                    f"longest wait {summary['longest_wait_s']:.1f} s")
    ax.set_title(f"{title(record)}\n{heading}", fontsize=9, loc="left")
    ax.grid(axis="x", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_curves(path: Path, record: Mapping[str, Any]) -> Path | None:
    """Draw latency against offered rate for every comparison that carries ``load_curves``
    (one panel per model: p50 and p99 of each server with their bounds, on log axes, the
    latency bound as a line); None without matplotlib or such comparisons."""
    panels = [c for c in record["comparisons"] if (c.get("extra") or {}).get("load_curves")]
    if not panels:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, c in zip(axes[0], panels, strict=True):
        extra = c["extra"]
        for i, (server, points) in enumerate(extra["load_curves"].items()):
            points = sorted(points, key=lambda p: p["offered_rate"])
            for q, style in (("50", "--"), ("99", "-")):
                shown = [p for p in points if q in p["quantiles"]]
                rates = [p["offered_rate"] for p in shown]
                est = [p["quantiles"][q]["estimate"] * 1e3 for p in shown]
                low = [(p["quantiles"][q]["low"] or p["quantiles"][q]["estimate"]) * 1e3 for p in shown]
                high = [(p["quantiles"][q]["high"] or p["quantiles"][q]["estimate"]) * 1e3 for p in shown]
                ax.plot(rates, est, style, marker="o", markersize=3, color=f"C{i}", label=f"{server} p{q}")
                ax.fill_between(rates, low, high, color=f"C{i}", alpha=0.15, linewidth=0)
        ax.axhline(extra["bound_ms"], color="black", linewidth=0.8, linestyle=":")
        ax.text(0.01, extra["bound_ms"], f"p99 bound {extra['bound_ms']:.3g} ms", fontsize=7, va="bottom",
                transform=ax.get_yaxis_transform())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered rate (requests/s, Poisson arrivals)", fontsize=8)
        ax.set_ylabel("latency (ms; bands: 95% bounds)", fontsize=8)
        ax.set_title(c["variant"].split("-")[0], fontsize=9, loc="left")
        ax.grid(alpha=0.25, which="both")
        ax.legend(fontsize=6, ncols=2, frameon=False)
    fig.suptitle(f"{title(record)}\nlatency vs offered rate", fontsize=9, x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
