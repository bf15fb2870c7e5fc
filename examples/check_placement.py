"""Check a run's placement from its --kerasmp-report JSON (what every process recorded about
itself): processes of different xdist workers never shared a core set or GPU, every GPU
process had memory growth or a cap, and no comparison was measured while others competed.

    python check_placement.py REPORT_DIR [--roles pytest,pool worker,server]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    record = json.loads((Path(argv[0]) / "kerasmp-report.json").read_text())
    placed = record["placement"]
    problems = []
    for p in placed:
        who = f"{p['owner']}/{p['label']} (pid {p['pid']})"
        if p["competed_with"]:
            problems.append(f"{who} shared its slot with another worker's {p['competed_with']}")
        if p["slot"]["kind"] == "GPU" and not (p["memory_growth"] or p["memory_limit_mb"]):
            problems.append(f"{who} had neither memory growth nor a cap on GPU {p['cuda_visible_devices']}")
    problems += [f"comparison {c['scenario']}:{c['variant']} competed with {c['competed']}"
                 for c in record["comparisons"] if c.get("competed")]
    roles = {p["role"] for p in placed}
    for wanted in (argv[2].split(",") if len(argv) > 2 and argv[1] == "--roles" else []):
        if wanted not in roles:
            problems.append(f"no {wanted!r} process in the placement table")
    print(f"check_placement: {len(placed)} processes, roles {sorted(roles)}: "
          + ("OK" if not problems else f"{len(problems)} problem(s)"))
    for line in problems:
        print("  " + line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
