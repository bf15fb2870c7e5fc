"""For the tests that Ctrl-C an owner script: the script's first lines, and the bounded wait."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

#: The first lines of an owner script. A suite started in the background by a non-interactive
#: shell (`cmd &`) ignores SIGINT, and children inherit that: the owner takes Ctrl-C as a
#: terminal's foreground process would. SIGUSR1 prints its stacks (see :func:`wait_or_fail`).
PREAMBLE = """
import faulthandler, signal
faulthandler.register(signal.SIGUSR1)
signal.signal(signal.SIGINT, signal.default_int_handler)
"""


def wait_or_fail(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Wait for the interrupted owner to end; past ``timeout``, fail with its Python stacks."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        proc.kill()
        pytest.fail(f"the owner did not end within {timeout:g} s of Ctrl-C (SIGINT here: {signal.getsignal(signal.SIGINT)}); "
                    f"its stacks and output:\n{proc.communicate()[1]}")
