"""False-pass and false-fail rates of the gate on the known-ratio workloads (not a test).

    python tests/gate_rates.py SESSIONS [pytest options...]

Runs SESSIONS pytest sessions of ``known_ratio.SUITE`` per case: the true 2x gated at 1.3
(a failing session is a false fail) and the true 1x gated at 1.25 (a passing session is a
false pass). Prints the counts and the median wall time of a session.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from known_ratio import SUITE  # noqa: E402

CASES = {"two": ("known:two:1.3", 0), "one": ("known:one:1.25", 1)}  # floor, correct exit code


def main(argv: list[str]) -> int:
    sessions, extra = int(argv[0]), argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "test_known.py").write_text(SUITE)
        for variant, (floor, good) in CASES.items():
            wrong, walls, codes = 0, [], []
            for _ in range(sessions):
                t0 = time.perf_counter()
                cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                       f"test_known.py::test_{variant}", "--benchmark-disable", f"--kerasmp-min-speedup={floor}", *extra]
                rc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True).returncode
                walls.append(time.perf_counter() - t0)
                codes.append(rc)
                wrong += rc != good
            kind = "false fails" if good == 0 else "false passes"
            print(f"true {variant} gated {floor}: {wrong}/{sessions} {kind}; exit codes {codes}; "
                  f"median session {statistics.median(walls):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
