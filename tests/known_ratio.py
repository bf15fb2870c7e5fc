"""Sleep-based workloads whose true ratio is known, with injected heavy-tailed noise.

``SUITE`` is a test module (for pytester, or for ``gate_rates.py``): ``test_two`` is a true
2x (serial sleeps twice as long as parallel), ``test_one`` a true 1x. Every call sleeps its
base time times a log-normal factor, and one call in ten also gets a Pareto-tailed spike, so
a median of a few rounds can land far from the truth. The CPU does not matter: only sleeps.
Env ``KNOWN_RATIO_COPIES`` parametrizes each test that many times (default 1);
``KNOWN_RATIO_BASE_MS`` sets the parallel side's base (default 4 ms).
"""

SUITE = '''
import os, random, time
import pytest

COPIES = int(os.environ.get("KNOWN_RATIO_COPIES", "1"))
BASE = float(os.environ.get("KNOWN_RATIO_BASE_MS", "4")) / 1e3
rng = random.Random(os.environ.get("KNOWN_RATIO_SEED"))  # unset: a new draw every session


def noisy_sleep(seconds):
    factor = rng.lognormvariate(0.0, 0.3)
    if rng.random() < 0.1:
        factor *= 1.0 + rng.paretovariate(1.5)
    time.sleep(seconds * factor)


@pytest.mark.parametrize("copy", range(COPIES))
def test_two(kerasmp_speedup, copy):
    kerasmp_speedup(lambda: noisy_sleep(2 * BASE), lambda: noisy_sleep(BASE), workers=2, variant="two")


@pytest.mark.parametrize("copy", range(COPIES))
def test_one(kerasmp_speedup, copy):
    kerasmp_speedup(lambda: noisy_sleep(BASE), lambda: noisy_sleep(BASE), workers=2, variant="one")
'''
