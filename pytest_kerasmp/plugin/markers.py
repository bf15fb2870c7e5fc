"""The ``kerasmp_gpus(n)`` marker: skip a test when fewer than n GPUs exist, or fail it under
``--kerasmp-require-gpu``."""

from __future__ import annotations

import pytest

from pytest_kerasmp.plugin import config as cfg
from pytest_kerasmp.slots.devices import plural

MARKER_HELP = (
    "kerasmp_gpus(n): the test needs n GPUs; it is skipped when fewer exist, "
    "or fails under --kerasmp-require-gpu"
)
MARKER_BAD = "@pytest.mark.kerasmp_gpus needs one positive integer, e.g. kerasmp_gpus(2); got {args!r}"
MARKER_SKIP = (
    "needs {gpus}, {found} found (kerasmp_gpus marker); run it on a machine with {gpus}, "
    "or pass --kerasmp-require-gpu to fail instead of skipping"
)
MARKER_FAIL = (
    "needs {gpus} but {found} found and --kerasmp-require-gpu is set (from {source}); run this "
    "test on a machine with {gpus}"
)


def _marker_gpus(item: pytest.Item) -> int | None:
    marker = item.get_closest_marker("kerasmp_gpus")
    if marker is None:
        return None
    args = marker.args
    if len(args) != 1 or not isinstance(args[0], int) or isinstance(args[0], bool) or args[0] < 1:
        return -1
    return int(args[0])


def skip_for_missing_gpus(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Add a skip marker to each test that needs more GPUs than the session found."""
    if cfg.session_settings(config).require_gpu:
        return  # they fail in setup instead
    for item in items:
        n = _marker_gpus(item)
        if n is None or n < 1:
            continue
        found = cfg.session_plan(config).gpus_found
        if found < n:
            item.add_marker(pytest.mark.skip(reason=MARKER_SKIP.format(gpus=plural(n, "GPU"), found=found)))


def check(item: pytest.Item) -> None:
    """At a test's setup: a bad marker fails it; too few GPUs under --kerasmp-require-gpu too."""
    n = _marker_gpus(item)
    if n is None:
        return
    if n < 1:
        marker = item.get_closest_marker("kerasmp_gpus")
        pytest.fail(MARKER_BAD.format(args=marker.args if marker else ()), pytrace=False)
    found = cfg.session_plan(item.config).gpus_found
    settings = cfg.session_settings(item.config)
    if found < n and settings.require_gpu:
        pytest.fail(MARKER_FAIL.format(gpus=plural(n, "GPU"), found=found, source=settings.require_source), pytrace=False)
