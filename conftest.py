"""Repo-only settings for running this repository's own suites (the plugin itself is
registered by its pytest11 entry point, never here), and the runner that makes every Python
block of README.md and docs/*.md a test (``pytest README.md docs``, part of ``dev.py test``).

How a block runs is said by an HTML comment right before it (invisible on GitHub and in
the docs site):

- ``<!-- kerasmp: pytest ARGS -->``: the block is a whole test module. It is written to a
  fresh directory as ``test_example.py`` and run by ``python -m pytest ARGS`` in a child
  process (the plugin comes from its entry point, as in a user's suite); the example passes
  when that run does.
- ``<!-- kerasmp: script -->``: the block is a script, run as ``python example.py`` in a
  fresh directory: functions it defines must be importable by spawned workers (they import
  the script as ``__mp_main__``), which ``exec`` could not give them.
- no comment: the block runs in this process (Sybil's Python evaluator, one namespace per
  page), for examples that start no process.
- ``<!-- skip: next "why" -->`` (Sybil's own): the block needs what CI has not (a GPU, a
  Ray cluster on other machines) and is skipped with that reason.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

try:
    from sybil import Example, Sybil
    from sybil.evaluators.python import PythonEvaluator
    from sybil.parsers.markdown import CodeBlockParser, SkipParser
except ImportError:  # an environment without the test extra (the harness still runs)
    Sybil = None

# TensorFlow's C++ start-up chatter would bury test output in every spawned process.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: Bound on one example run in a child process (its pytest run or script).
EXAMPLE_TIMEOUT_S = 240
_MODE = re.compile(r"<!--\s*kerasmp:\s*(?P<mode>pytest|script)(?P<args>[^>]*?)\s*-->\s*$")


def _child_env() -> dict[str, str]:
    """This process's environment without what a pytest session of ours sets for its children:
    an example states every option it needs."""
    drop = ("PYTEST_KERASMP_", "PYTEST_XDIST_", "PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _run_child(example: Example, mode: str, args: str) -> None:
    with tempfile.TemporaryDirectory(prefix="kerasmp-example-") as tmp:
        if mode == "pytest":
            Path(tmp, "test_example.py").write_text(example.parsed)
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.split(), "test_example.py"]
        else:
            Path(tmp, "example.py").write_text(example.parsed)
            cmd = [sys.executable, "example.py", *args.split()]
        proc = subprocess.Popen(
            cmd, cwd=tmp, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: a run past the bound is ended whole
        )
        try:
            out, _ = proc.communicate(timeout=EXAMPLE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise AssertionError(f"{' '.join(cmd[1:])} ran past {EXAMPLE_TIMEOUT_S} s:\n{out[-6000:]}") from None
        if proc.returncode != 0:
            where = f"{example.path}:{example.line}"
            raise AssertionError(f"the example at {where} failed: {' '.join(cmd[1:])} exited {proc.returncode}:\n{out[-6000:]}")


def evaluate_python(example: Example) -> object:
    """Run one Python block as the comment before it says (see the module docstring)."""
    mode = _MODE.search(example.document.text[: example.region.start])
    if mode is None:
        return PythonEvaluator()(example)
    _run_child(example, mode["mode"], mode["args"])
    return None


if Sybil is not None:
    pytest_collect_file = Sybil(
        parsers=[CodeBlockParser("python", evaluate_python), SkipParser()],
        patterns=["README.md", "docs/*.md", "docs/*/*.md"],
    ).pytest()
else:

    def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> None:
        if file_path.suffix == ".md":
            raise pytest.UsageError(f"{file_path.name}: its examples run with sybil, which is not installed: pip install -e '.[test]'")
