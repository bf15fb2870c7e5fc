"""The pytest11 plugin ``kerasmp``: options, pinning of pytest processes, markers, header.

This module decides; it imports no TensorFlow and does no heavy work. Pinning happens in
``pytest_load_initial_conftests`` (tryfirst), before any conftest or test module is imported,
so a root ``conftest.py`` that imports TensorFlow at module level is already pinned.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence

import pytest

from pytest_kerasmp import config as cfg
from pytest_kerasmp import seeding, speedgate
from pytest_kerasmp.comparison import Comparison
from pytest_kerasmp.devices import DeviceSlot, detect_gpus, plan_slots
from pytest_kerasmp.errors import KerasMPError
from pytest_kerasmp.fixtures import (  # noqa: F401  (fixtures registered with the plugin)
    kerasmp_device,
    kerasmp_inference_server,
    kerasmp_pool,
    kerasmp_pool_factory,
    kerasmp_scale,
    kerasmp_seed,
    kerasmp_slots,
    kerasmp_speedup,
)
from pytest_kerasmp.pinning import pin_process
from pytest_kerasmp.speedup import COMPARISONS_KEY

#: Set by the xdist controller for its workers: the plan and the controller's pid.
PLAN_ENV = "PYTEST_KERASMP_PLAN"

MARKER_HELP = (
    "kerasmp_gpus(n): the test needs n GPUs; it is skipped when fewer exist, "
    "or fails under --kerasmp-require-gpu"
)
MARKER_BAD = "@pytest.mark.kerasmp_gpus needs one positive integer, e.g. kerasmp_gpus(2); got {args!r}"
MARKER_SKIP = (
    "needs {n} GPU(s), {found} found (kerasmp_gpus marker); run it on a machine with {n} GPUs, "
    "or pass --kerasmp-require-gpu to fail instead of skipping"
)
MARKER_FAIL = (
    "needs {n} GPU(s) but {found} found and --kerasmp-require-gpu is set; run this test on a "
    "machine with {n} GPUs"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kerasmp", "multiprocess Keras: device slots, pools, servers")
    group.addoption(cfg.GPUS_OPTION, dest="kerasmp_gpus", metavar="N|auto", help=cfg.GPUS_HELP)
    group.addoption(
        cfg.MEMORY_OPTION, dest="kerasmp_gpu_memory", metavar="MB", help=cfg.MEMORY_HELP
    )
    group.addoption(
        cfg.REQUIRE_OPTION, dest="kerasmp_require_gpu", action="store_true", help=cfg.REQUIRE_HELP
    )
    speedgate.addoptions(group)
    group.addoption(
        "--kerasmp-scale", dest="kerasmp_scale", metavar="F", default="1",
        help="Scale the scenarios' workloads by F (e.g. 0.25 for a quick CI pass, 4 on a GPU "
        "machine); the kerasmp_scale fixture. Default: 1",
    )
    parser.addini(cfg.GPUS_INI, cfg.GPUS_HELP, type="string", default="")
    parser.addini(cfg.MEMORY_INI, cfg.MEMORY_HELP, type="string", default="")
    parser.addini(cfg.REQUIRE_INI, cfg.REQUIRE_HELP, type="bool", default=False)


def _uses_xdist(early_config: pytest.Config) -> bool:
    ns = early_config.known_args_namespace
    return bool(getattr(ns, "numprocesses", None) or getattr(ns, "tx", None))


def _inherited_plan() -> tuple[tuple[DeviceSlot, ...], int] | None:
    """The controller's plan, if this process is one of its xdist workers."""
    raw = os.environ.get(PLAN_ENV)
    if not raw or not os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    data = json.loads(raw)
    if data["controller"] != os.getppid():  # a nested pytest, not the controller's worker
        return None
    return tuple(DeviceSlot.from_json(d) for d in data["slots"]), int(data["gpus_found"])


def slot_for_worker(worker_id: str, slots: Sequence[DeviceSlot]) -> DeviceSlot:
    """xdist worker ``gwK`` gets slot K mod N."""
    return slots[int(worker_id.removeprefix("gw")) % len(slots)]


def _plan(early_config: pytest.Config, settings: cfg.Settings) -> tuple[tuple[DeviceSlot, ...], int]:
    gpus = detect_gpus()
    cfg.check_required_gpus(settings, len(gpus))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            slots = plan_slots(settings.gpus, gpus=gpus, memory_limit_mb=settings.gpu_memory_mb)
        except ValueError as exc:
            raise pytest.UsageError(f"kerasmp: cannot plan slots: {exc}") from None
    for w in caught:
        early_config.issue_config_time_warning(w.message, stacklevel=2)  # type: ignore[arg-type]
    return slots, len(gpus)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    settings = cfg.resolve_settings(
        vars(early_config.known_args_namespace), os.environ, early_config.getini
    )
    early_config.stash[cfg.SETTINGS_KEY] = settings
    speedgate.export_seed(early_config)  # before pinning: pin_process seeds from it
    if not settings.requested:
        seeding.seed_process(None)
        return
    inherited = _inherited_plan()
    worker_id = os.environ.get("PYTEST_XDIST_WORKER")
    try:
        if inherited is not None and worker_id:
            slots, found = inherited
            slot = slot_for_worker(worker_id, slots)
            workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
            pin_process(slot, memory_growth=slot.shared or workers > len(slots))
            plan = cfg.SessionPlan(slots, found, "worker", slot, worker_id)
        elif _uses_xdist(early_config):
            slots, found = _plan(early_config, settings)
            os.environ[PLAN_ENV] = json.dumps(
                {"controller": os.getpid(), "gpus_found": found, "slots": [s.to_json() for s in slots]}
            )
            plan = cfg.SessionPlan(slots, found, "controller")
        else:
            slots, found = _plan(early_config, settings)
            # Slot 0 is shared with the first worker this process starts: memory growth on.
            pin_process(slots[0], memory_growth=True)
            plan = cfg.SessionPlan(slots, found, "main", slots[0])
    except KerasMPError as exc:
        raise pytest.UsageError(str(exc)) from exc
    early_config.stash[cfg.PLAN_KEY] = plan
    if plan.pinned is None:
        seeding.seed_process(None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(_WorkerComparisons(config), "kerasmp-worker-comparisons")
    speedgate.configure(config)
    raw = config.getoption("kerasmp_scale")
    try:
        scale = float(raw)
    except (TypeError, ValueError):
        scale = float("nan")
    if not scale > 0:
        raise pytest.UsageError(f"--kerasmp-scale={raw!r} is invalid: use a positive number, e.g. 0.25 or 4")


#: The attribute of a test report that carries an xdist worker's comparisons to the controller.
REPORT_ATTR = "kerasmp_comparisons"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if call.when == "teardown" and hasattr(item.config, "workerinput"):
        made = [c.to_json() for c in item.config.stash.get(COMPARISONS_KEY, []) if c.nodeid == item.nodeid]
        if made:
            setattr(report, REPORT_ATTR, made)
    return report


class _WorkerComparisons:
    """On the xdist controller: collects the comparisons its workers made."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for data in getattr(report, REPORT_ATTR, None) or []:
            self.config.stash.setdefault(COMPARISONS_KEY, []).append(Comparison.from_json(data))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):
        return  # the controller gates and reports what its workers measured
    speedgate.finish(session, cfg.session_plan(session.config).slots, _numprocesses(session.config))


def pytest_unconfigure(config: pytest.Config) -> None:
    plan = config.stash.get(cfg.PLAN_KEY, None)
    if plan is not None and plan.role == "controller":
        os.environ.pop(PLAN_ENV, None)
    if not hasattr(config, "workerinput"):
        speedgate.last_line(config)  # after pytest's "N passed" line: the run's last word
    speedgate.unexport_seed()


def describe_plan(settings: cfg.Settings, plan: cfg.SessionPlan, workers: int = 0) -> str:
    """The header line: the options that reproduce the plan, then the plan."""
    slots = plan.slots
    if slots[0].kind == "GPU":
        gpus = sorted({s.gpu for s in slots}, key=str)
        kind = f"{len(slots)} GPU slot(s) on {len(gpus)} GPU(s)"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") if plan.role == "controller" else None
        notes = [f"outer CUDA_VISIBLE_DEVICES={visible}"] if visible else []
        if any(s.shared for s in slots):
            notes.append("shared GPUs with memory growth on")
        if settings.gpu_memory_mb:
            notes.append(f"{settings.gpu_memory_mb} MB cap per slot")
    else:
        kind = f"{len(slots)} CPU slot(s)"
        notes = ["no GPU found"]
    detail = f" ({'; '.join(notes)})" if notes else ""
    line = (
        f"kerasmp: {settings.command_line()} (from {settings.gpus_source}) -> {kind}{detail}: "
        + ", ".join(s.describe() for s in slots)
    )
    if plan.role == "controller" and workers:
        pairs = (f"gw{k}->{slot_for_worker(f'gw{k}', slots).name}" for k in range(workers))
        line += "; xdist workers " + ", ".join(pairs)
    elif plan.pinned is not None:
        line += f"; this process pinned to {plan.pinned.name}"
    return line


def _numprocesses(config: pytest.Config) -> int:
    return int(config.getoption("numprocesses", None) or len(config.getoption("tx", None) or []) or 0)


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    plan = config.stash.get(cfg.PLAN_KEY, None)
    if plan is not None:
        lines.append(describe_plan(cfg.session_settings(config), plan, _numprocesses(config)))
    seed = speedgate.header(config)
    return lines + ([seed] if seed else [])


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    speedgate.mark_benchmark_users(config, items)


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("kerasmp_gpus")
    if marker is None:
        return
    args = marker.args
    if len(args) != 1 or not isinstance(args[0], int) or isinstance(args[0], bool) or args[0] < 1:
        pytest.fail(MARKER_BAD.format(args=args), pytrace=False)
    found = cfg.session_plan(item.config).gpus_found
    if found < args[0]:
        if cfg.session_settings(item.config).require_gpu:
            pytest.fail(MARKER_FAIL.format(n=args[0], found=found), pytrace=False)
        pytest.skip(MARKER_SKIP.format(n=args[0], found=found))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    speedgate.terminal_summary(terminalreporter, config)
