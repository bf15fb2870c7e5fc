#!/usr/bin/env python3
"""Set-up and entry point for the README's two commands (and the docs); needs only Python 3.11+.

    python3 dev.py harness [pytest args]   # the scenarios, with their report (./kerasmp-report/)
    python3 dev.py test    [pytest args]   # the test suite and the examples of README.md and docs/
    python3 dev.py docs    [mkdocs args]   # the documentation site, into ./site/ (warnings are errors)

Each creates ./.venv and installs the project into it (editable, with the test, plot, ray,
peers, docs, jax and torch extras) when missing or when pyproject.toml changed, then runs pytest (or mkdocs) from it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".kerasmp-installed"
EXTRAS = "test,plot,ray,peers,docs,jax,torch"

COMMANDS = {
    # README.md and docs/: every Python block there is a test (Sybil, see conftest.py). Two
    # xdist workers: most tests wait on processes they start (10.4 -> 6.5 min on 2 cores), and
    # the suite runs under -n as its users' suites do. Not -n auto: each test starts several
    # TensorFlow processes, and the fault tests' bounds are set for a 2-core machine's load.
    # loadfile: a document's examples run in order in one worker (a Sybil "skip: next" is
    # state carried from one example of a document to the next).
    "test": ["-m", "pytest", "-n", "2", "--dist", "loadfile", "tests", "README.md", "docs"],
    "harness": ["-m", "pytest", "scenarios", "--kerasmp-gpus=auto", "--kerasmp-report=kerasmp-report"],
    "docs": ["-m", "mkdocs", "build", "--strict", "-d", "site"],
}


def ensure_venv() -> None:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + EXTRAS.encode()).hexdigest()
    if PYTHON.exists() and STAMP.exists() and STAMP.read_text() == digest:
        return
    if not PYTHON.exists():
        print(f"dev.py: creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print("dev.py: installing pytest-kerasmp and its dependencies into .venv", flush=True)
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[{EXTRAS}]"], check=True)
    STAMP.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    cmd = [str(PYTHON), *COMMANDS[argv[0]], *argv[1:]]
    print("dev.py: " + " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", "NO_MKDOCS_2_WARNING": "1"})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
