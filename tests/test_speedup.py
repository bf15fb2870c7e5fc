"""The kerasmp_speedup fixture, as an outside suite uses it (pytester)."""

from __future__ import annotations

import pytest

SUITE = """
import time

def serial():
    time.sleep(0.02)
    return 1

def parallel():
    time.sleep(0.005)
    return 1

def test_fast(kerasmp_speedup):
    c = kerasmp_speedup(serial, parallel, workers=2, rounds=3, variant="sleep",
                        check=lambda a, b: None)
    assert len(c.serial_s) == len(c.parallel_s) == 3
    assert c.speedup > 1

def test_wrong(kerasmp_speedup):
    def check(a, b):
        assert a != b, "serial and parallel disagree"
    kerasmp_speedup(serial, parallel, workers=2, rounds=1, variant="broken", check=check)
"""


@pytest.mark.parametrize("extra", [[], ["--benchmark-disable"]], ids=["benchmark", "disabled"])
def test_speedup_is_measured_and_summarised(pytester, run_pytest, extra):
    pytester.makepyfile(test_sleepy=SUITE)
    result = run_pytest(*extra)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*kerasmp: serial vs parallel*",
            "scenario*variant*workers*serial*parallel*speedup*efficiency*correct",
            "sleepy*sleep*2*ms*ms*x*%*equal",
            "sleepy*broken*2*-*-*-*-*DIFFERENT",
        ]
    )
    if not extra:
        result.stdout.fnmatch_lines(["*benchmark 'sleepy:sleep (test_fast)'*"])


def test_speedup_rejects_bad_rounds(pytester, run_pytest):
    pytester.makepyfile(
        """
        def test_bad(kerasmp_speedup):
            kerasmp_speedup(lambda: 1, lambda: 1, workers=0)
        """
    )
    result = run_pytest()
    result.stdout.fnmatch_lines(["*ValueError: rounds=5 and workers=0 must be positive*"])
