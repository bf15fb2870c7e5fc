"""The CPU slots the package's own tests run on: this process's first and last usable core.

One place for what ten test files wrote each (``CORES``, ``CPU0``, ``CPU1``); on a one-core
machine both slots are that core.
"""

from __future__ import annotations

import os

from pytest_kerasmp import DeviceSlot

#: The cores this process may run on, in order.
CORES = sorted(os.sched_getaffinity(0))
CPU0 = DeviceSlot(index=0, kind="CPU", cores=(CORES[0],))
CPU1 = DeviceSlot(index=1, kind="CPU", cores=(CORES[-1],))
TWO_CORES = len(CORES) >= 2
