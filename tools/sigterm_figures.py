#!/usr/bin/env python3
"""How long each process of a busy ``-n 2 --kerasmp-gpus=2`` session lives after SIGTERM.

    .venv/bin/python tools/sigterm_figures.py [TRIALS] [--busy]

Writes a two-test suite whose session pools run a long task each, starts it under pytest
(``-n 2 --kerasmp-gpus=2``), waits until both tasks run, sends SIGTERM to the controller and
polls every process of its tree every 5 ms: each line is the time it was gone (or a zombie
waiting for its parent), the last line of a trial the session's end. ``--busy`` keeps both
cores busy with two spinning processes meanwhile (a loaded CI machine).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

TASKS = """
import os, time
def sleep_marked(seconds, path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
"""
TEST = """
import os, tasks

def test_long_{k}(kerasmp_pool):
    kerasmp_pool.map(tasks.sleep_marked, [1000], [os.environ["MARK_DIR"] + "/m{k}"])
"""


def trial(suite: Path) -> dict[int, tuple[float, str]]:
    marks = Path(tempfile.mkdtemp(prefix="marks-", dir=suite))
    env = {**os.environ, "MARK_DIR": str(marks), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(suite)}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "2", "--kerasmp-gpus=2"]
    proc = subprocess.Popen(cmd, cwd=suite, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(list(marks.iterdir())) < 2:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit("the session did not start its tasks:\n" + proc.communicate()[0][-2000:])
        time.sleep(0.05)
    time.sleep(0.5)
    root = psutil.Process(proc.pid)
    tree = {p.pid: " ".join(p.cmdline())[-50:] for p in [root, *root.children(recursive=True)]}
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    gone: dict[int, tuple[float, str]] = {}
    while len(gone) < len(tree) and time.monotonic() - t0 < 30:
        for pid, name in tree.items():
            if pid in gone:
                continue
            try:
                ended = pid != proc.pid and psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                ended = True
            if ended or (pid == proc.pid and proc.poll() is not None):
                gone[pid] = (time.monotonic() - t0, name)
        time.sleep(0.005)
    proc.communicate()
    return gone


def main(argv: list[str]) -> None:
    trials = int(next((a for a in argv if a.isdigit()), "3"))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)] if "--busy" in argv else []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            suite = Path(tmp)
            (suite / "tasks.py").write_text(TASKS)
            for k in (1, 2):
                (suite / f"test_long{k}.py").write_text(TEST.format(k=k))
            lasts = []
            for n in range(trials):
                gone = trial(suite)
                lasts.append(max(t for t, _ in gone.values()))
                print(f"trial {n}: every process gone {lasts[-1]:.2f} s after SIGTERM")
                for pid, (t, name) in sorted(gone.items(), key=lambda kv: kv[1][0]):
                    print(f"  {t:5.2f} s  pid {pid}  {name}")
            lasts.sort()
            print(f"last process gone: median {lasts[len(lasts) // 2]:.2f} s, range {lasts[0]:.2f}-{lasts[-1]:.2f} s ({trials} trials"
                  + (", both cores kept busy)" if spinners else ")"))
    finally:
        for s in spinners:
            s.kill()


if __name__ == "__main__":
    main(sys.argv[1:])
