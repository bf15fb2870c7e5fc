"""The pytest11 plugin ``kerasmp``: options, pinning of pytest processes, markers, header.

This module decides; it imports no TensorFlow and does no heavy work. Pinning happens in
``pytest_load_initial_conftests`` (tryfirst), before any conftest or test module is imported,
so a root ``conftest.py`` that imports TensorFlow at module level is already pinned.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any

import pytest

from pytest_kerasmp.errors import NETWORK_REQUIRE_FAILED, NETWORK_SUMMARY, KerasMPError, KerasMPWarning
from pytest_kerasmp.measure.comparison import Comparison
from pytest_kerasmp.plugin import config as cfg
from pytest_kerasmp.plugin import leasing, markers, speedgate
from pytest_kerasmp.plugin.fixtures import (  # noqa: F401  (fixtures registered with the plugin)
    kerasmp_device,
    kerasmp_inference_server,
    kerasmp_keras_cluster,
    kerasmp_load_generator,
    kerasmp_pool,
    kerasmp_pool_factory,
    kerasmp_ray,
    kerasmp_scale,
    kerasmp_seed,
    kerasmp_slots,
    kerasmp_speedup,
    kerasmp_tf_cluster,
    kerasmp_worker_slots,
)
from pytest_kerasmp.plugin.sessionguard import SessionGuard
from pytest_kerasmp.plugin.speedup import COMPARISONS_KEY
from pytest_kerasmp.slots import placement, seeding
from pytest_kerasmp.slots.devices import (
    ADVICE_SESSION,
    DeviceSlot,
    cores_reused,
    detect_gpus,
    plan_slots,
    plural,
    set_scope,
    usable_cores,
)
from pytest_kerasmp.slots.pinning import pin_process

SESSION_DIR_KEY = pytest.StashKey[str]()
NETWORK_ENV_BEFORE_KEY = pytest.StashKey[str | None]()
NOTICES_KEY = pytest.StashKey[leasing.WaitNotices]()
LEASE_SUMMARY_KEY = pytest.StashKey[dict[str, Any]]()
WINDOWS_KEY = pytest.StashKey[placement.Windows]()
#: Above this many processes the terminal shows one line per slot (-v: the whole table).
FULL_TABLE_ROWS = 20
PLACEMENT_IN_FULL = "(one row per process: -v, or the report's placement section, --kerasmp-report)"
PLACEMENT_KEY = pytest.StashKey[list[dict[str, Any]]]()
CALL_WINDOW_KEY = pytest.StashKey[tuple[float, float]]()

GUARD_NAME = "kerasmp-session-guard"

#: Set by the xdist controller for its workers: the plan and the controller's pid.
PLAN_ENV = "PYTEST_KERASMP_PLAN"

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
    group.addoption(cfg.RAY_OPTION, dest="kerasmp_ray", metavar="ADDRESS|local", help=cfg.RAY_HELP)
    group.addoption(cfg.RAY_TIMEOUT_OPTION, dest="kerasmp_ray_timeout", metavar="SECONDS", help=cfg.RAY_TIMEOUT_HELP)
    group.addoption(
        "--kerasmp-scale", dest="kerasmp_scale", metavar="F", default="1",
        help="Scale the scenarios' workloads by F (e.g. 0.25 for a quick CI pass, 4 on a GPU "
        "machine); the kerasmp_scale fixture. Default: 1",
    )
    group.addoption(cfg.BACKEND_OPTION, dest="kerasmp_keras_backend", metavar="NAME", help=cfg.BACKEND_HELP)
    group.addoption(
        cfg.PRIVATE_NETWORK_OPTION, dest="kerasmp_private_network", metavar="auto|require|off", help=cfg.PRIVATE_NETWORK_HELP
    )
    parser.addini(cfg.PRIVATE_NETWORK_INI, cfg.PRIVATE_NETWORK_HELP, type="string", default="")
    group.addoption(cfg.LEASES_OPTION, dest="kerasmp_leases", metavar="per-test|off", help=cfg.LEASES_HELP)
    group.addoption(cfg.LEASE_TIMEOUT_OPTION, dest="kerasmp_lease_timeout", metavar="SECONDS", help=cfg.LEASE_TIMEOUT_HELP)
    parser.addini(cfg.LEASES_INI, cfg.LEASES_HELP, type="string", default="")
    parser.addini(cfg.LEASE_TIMEOUT_INI, cfg.LEASE_TIMEOUT_HELP, type="string", default="")
    parser.addini(cfg.BACKEND_INI, cfg.BACKEND_HELP, type="string", default="")
    parser.addini(cfg.GPUS_INI, cfg.GPUS_HELP, type="string", default="")
    parser.addini(cfg.MEMORY_INI, cfg.MEMORY_HELP, type="string", default="")
    parser.addini(cfg.REQUIRE_INI, cfg.REQUIRE_HELP, type="string", default="")
    parser.addini(cfg.RAY_TIMEOUT_INI, cfg.RAY_TIMEOUT_HELP, type="string", default="")


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


def slot_for_worker(worker_id: str, slots: Sequence[DeviceSlot], workers: int = 0) -> DeviceSlot:
    """The slot xdist worker ``gwK`` is pinned to: the first of its part (``placement``)."""
    return placement.part_of(slots, worker_id, workers or len(slots))[0]


def _plan(early_config: pytest.Config, settings: cfg.Settings) -> tuple[tuple[DeviceSlot, ...], int]:
    gpus = detect_gpus()
    cfg.check_required_gpus(settings, len(gpus))
    cores = usable_cores()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")  # reworded below, at the option rather than here
        try:
            slots = plan_slots(settings.gpus, gpus=gpus, cores=cores, memory_limit_mb=settings.gpu_memory_mb)
        except ValueError as exc:
            raise pytest.UsageError(f"kerasmp: cannot plan slots: {exc}") from None
    if not gpus and len(slots) > len(cores):
        message = cores_reused(
            len(slots), cores, "the session's usable cores", ADVICE_SESSION, what=f"{cfg.GPUS_OPTION}={settings.gpus}"
        )
        warn_at_option(early_config, KerasMPWarning(message), cfg.GPUS_INI, settings.gpus_source)
    return slots, len(gpus)


def warn_at_option(config: pytest.Config, warning: Warning, ini_name: str, source: str) -> None:
    """A configure-time warning whose location is the option that caused it (the ini file's
    line, or the command line or environment variable), not a line of this plugin."""
    where, line = source, 1
    if source.startswith("ini ") and config.inipath is not None:
        where = str(config.inipath)
        lines = config.inipath.read_text().splitlines()
        line = next((i + 1 for i, text in enumerate(lines) if text.strip().startswith(ini_name)), 1)
    code = compile("\n" * (line - 1) + "config.issue_config_time_warning(warning, stacklevel=2)", where, "exec")
    exec(code, {"config": config, "warning": warning})


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    settings = cfg.resolve_settings(
        vars(early_config.known_args_namespace), os.environ, early_config.getini
    )
    early_config.stash[cfg.SETTINGS_KEY] = settings
    early_config.stash[NETWORK_ENV_BEFORE_KEY] = cfg.export_private_network(settings)
    cfg.apply_backend(settings)  # before any conftest imports keras, and before pinning
    speedgate.export_seed(early_config)  # before pinning: pin_process seeds from it
    if not settings.requested:
        seeding.seed_process(None)
        return
    inherited = _inherited_plan()
    worker_id = os.environ.get("PYTEST_XDIST_WORKER")
    try:
        if inherited is not None and worker_id:
            slots, found = inherited
            workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
            part = placement.part_of(slots, worker_id, workers)
            # Pinned to the first slot of its part; what it starts defaults to the whole part.
            pin_process(part[0])
            set_scope(part, f"xdist worker {worker_id}'s part of the session ({placement.describe_part(part)})")
            placement.record("pytest", part[0], label=worker_id, part=part)
            plan = cfg.SessionPlan(slots, found, "worker", part[0], worker_id, part, workers)
        elif _uses_xdist(early_config):
            slots, found = _plan(early_config, settings)
            early_config.stash[SESSION_DIR_KEY] = str(placement.open_session())
            os.environ[PLAN_ENV] = json.dumps(
                {"controller": os.getpid(), "gpus_found": found, "slots": [s.to_json() for s in slots]}
            )
            plan = cfg.SessionPlan(slots, found, "controller")
        else:
            slots, found = _plan(early_config, settings)
            early_config.stash[SESSION_DIR_KEY] = str(placement.open_session())
            pin_process(slots[0])
            set_scope(slots, f"the session's {plural(len(slots), 'slot')} ({placement.describe_part(slots)})")
            placement.record("pytest", slots[0], label="main", part=slots)
            plan = cfg.SessionPlan(slots, found, "main", slots[0], part=slots)
    except KerasMPError as exc:
        raise pytest.UsageError(str(exc)) from exc
    early_config.stash[cfg.PLAN_KEY] = plan
    if plan.pinned is None:
        seeding.seed_process(None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", markers.MARKER_HELP)
    config.addinivalue_line("markers", leasing.MARKER_HELP)
    if leasing.active(config):
        config.pluginmanager.register(leasing.Leasing(config), "kerasmp-leasing")
    plan = config.stash.get(cfg.PLAN_KEY, None)
    directory = config.stash.get(SESSION_DIR_KEY, None)
    if plan is not None and plan.role == "controller" and directory and cfg.session_settings(config).leases == "per-test":
        config.stash[NOTICES_KEY] = leasing.WaitNotices(config, pathlib.Path(directory), [s.name for s in plan.slots])
    if config.getoption("kerasmp_ray", None) == "local" and _xdist_workers(config):
        raise pytest.UsageError(cfg.RAY_LOCAL_XDIST)
    _probe_ray_address(config)
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(_WorkerComparisons(config), "kerasmp-worker-comparisons")
    config.pluginmanager.register(SessionGuard(config), GUARD_NAME)
    speedgate.configure(config)
    raw = config.getoption("kerasmp_scale")
    try:
        scale = float(raw)
    except (TypeError, ValueError):
        scale = float("nan")
    if not scale > 0:
        raise pytest.UsageError(f"--kerasmp-scale={raw!r} is invalid: use a positive number, e.g. 0.25 or 4")


def _probe_ray_address(config: pytest.Config) -> None:
    """A --kerasmp-ray address that does not resolve, refuses or does not answer stops the
    session now, in one line (the fixtures connect later, within the same bound)."""
    address = config.getoption("kerasmp_ray", None)
    if not address or address == "local" or hasattr(config, "workerinput"):
        return
    from pytest_kerasmp.errors import RAY_OPTION_UNREACHABLE, RayConnectError
    from pytest_kerasmp.ray.connect import probe

    settings = cfg.session_settings(config)
    try:
        probe(address, settings.ray_timeout_s)
    except RayConnectError as exc:
        raise pytest.UsageError(RAY_OPTION_UNREACHABLE.format(
            option=cfg.RAY_OPTION, address=address, source="the command line", error=exc.worded_for(cfg.RAY_TIMEOUT_OPTION),
        )) from None


#: The attribute of a test report that carries an xdist worker's comparisons to the controller.
REPORT_ATTR = "kerasmp_comparisons"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if call.when == "call":
        item.stash[CALL_WINDOW_KEY] = (call.start, call.stop)
    if call.when == "teardown" and hasattr(item.config, "workerinput"):
        mine = [c for c in item.config.stash.get(COMPARISONS_KEY, []) if c.nodeid == item.nodeid]
        if mine:
            competed = _competition(item)
            for c in mine:
                c.competed = competed
            setattr(report, REPORT_ATTR, [c.to_json() for c in mine])
    return report


def _competition(item: pytest.Item) -> str:
    """Who competed with this xdist worker's slots while the test ran ("" if no one)."""
    config = item.config
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not cfg.session_settings(config).requested:
        return placement.UNPINNED_COMPETED if workers > 1 else ""
    plan = cfg.session_plan(config)
    start, stop = item.stash.get(CALL_WINDOW_KEY, (0.0, float("inf")))
    leased = leasing.slots_of(item)  # a leased test times on its leased slots
    windows = leasing.windows(config)  # under leases, others compute only while they hold slots
    others = placement.competitors(
        placement.read(), plan.worker_id or "main", placement.resources_of(leased or plan.own_slots), start, stop, windows,
    )
    return ", ".join(others)


class _WorkerComparisons:
    """On the xdist controller: collects the comparisons its workers made."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for data in getattr(report, REPORT_ATTR, None) or []:
            self.config.stash.setdefault(COMPARISONS_KEY, []).append(Comparison.from_json(data))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After session fixtures are torn down (trylast), so the pools' ends are recorded."""
    config = session.config
    if hasattr(config, "workerinput"):
        placement.release(os.getpid())  # this worker's own end, for the placement table
        return  # the controller gates and reports what its workers measured
    records = placement.read() if config.stash.get(SESSION_DIR_KEY, None) else []
    config.stash[PLACEMENT_KEY] = records
    windows = leasing.windows(config)
    if windows is not None:
        config.stash[WINDOWS_KEY] = windows
    extra: dict[str, Any] = {"placement": placement.to_json(records, windows)} if records else {}
    notices = config.stash.get(NOTICES_KEY, None)
    if notices is not None:
        notices.stop()
    directory = config.stash.get(SESSION_DIR_KEY, None)
    if directory and cfg.session_settings(config).leases == "per-test":
        slot_count = len(cfg.session_plan(config).slots)
        history, summary = leasing.session_summary(pathlib.Path(directory), slot_count)
        if history:
            extra.update(leases=history, lease_summary=summary, slot_names=[s.name for s in cfg.session_plan(config).slots])
            config.stash[LEASE_SUMMARY_KEY] = summary
    if placement.exposures(records) and cfg.session_settings(config).private_network == "require":
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED  # said in the terminal summary
    speedgate.finish(session, cfg.session_plan(config).slots, _xdist_workers(config), record_extra=extra or None)


def pytest_keyboard_interrupt(excinfo: pytest.ExceptionInfo[BaseException]) -> None:
    """Ctrl-C: end every pool and server of this process now (before fixture teardown,
    which would otherwise wait for running tasks)."""
    from pytest_kerasmp.runtime.process import owners

    owners.terminate_all("interrupted (Ctrl-C)")


def pytest_unconfigure(config: pytest.Config) -> None:
    guard = config.pluginmanager.get_plugin(GUARD_NAME)
    if isinstance(guard, SessionGuard):
        guard.unconfigure()
    plan = config.stash.get(cfg.PLAN_KEY, None)
    if plan is not None and plan.role == "controller":
        os.environ.pop(PLAN_ENV, None)
    directory = config.stash.get(SESSION_DIR_KEY, None)
    if directory:
        placement.close_session(pathlib.Path(directory))
    if not hasattr(config, "workerinput"):
        speedgate.last_line(config)  # after pytest's "N passed" line: the run's last word
    speedgate.unexport_seed()
    if NETWORK_ENV_BEFORE_KEY in config.stash:
        before = config.stash[NETWORK_ENV_BEFORE_KEY]
        if before is None:
            os.environ.pop(cfg.PRIVATE_NETWORK_ENV, None)
        else:
            os.environ[cfg.PRIVATE_NETWORK_ENV] = before


def describe_plan(settings: cfg.Settings, plan: cfg.SessionPlan, workers: int = 0) -> str:
    """The header line: the options that reproduce the plan, then the plan, then who owns what."""
    slots = plan.slots
    if slots[0].kind == "GPU":
        gpus = sorted({s.gpu for s in slots}, key=str)
        kind = f"{plural(len(slots), 'GPU slot')} on {plural(len(gpus), 'GPU')}"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") if plan.role == "controller" else None
        notes = [f"outer CUDA_VISIBLE_DEVICES={visible}"] if visible else []
        for gpu in gpus:  # more slots than GPUs: say which slots share one
            sharing = [s.name for s in slots if s.gpu == gpu]
            if len(sharing) > 1:
                notes.append(f"{' and '.join(sharing)} share GPU {gpu}")
        # What pin_process applies (DeviceSlot.environ): a cap replaces growth.
        if settings.gpu_memory_mb:
            notes.append(f"{settings.gpu_memory_mb} MB cap per process, no memory growth")
        else:
            notes.append("memory growth on in every process")
    else:
        kind = plural(len(slots), "CPU slot")
        notes = ["no GPU found"]
    detail = f" ({'; '.join(notes)})" if notes else ""
    line = (
        f"kerasmp: {settings.command_line()} -> {kind}{detail}: "
        + ", ".join(s.describe() for s in slots)
    )
    if plan.role == "controller" and workers:
        parts = placement.partition(slots, workers)
        pairs = (f"gw{k}->{'+'.join(s.name for s in part)}" for k, part in enumerate(parts))
        line += "; xdist workers " + ", ".join(pairs)
        crowded = placement.oversubscription(slots, workers)
        if crowded:
            line += f"; OVERSUBSCRIBED: {crowded}"
    elif plan.pinned is not None:
        line += f"; this process pinned to {plan.pinned.name}"
    return line


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = cfg.session_settings(config)
    plan = config.stash.get(cfg.PLAN_KEY, None)
    lines = [cfg.backend_header(settings)] if plan is not None or cfg.backend_chosen(settings) else []
    if plan is not None:
        lines.append(describe_plan(settings, plan, _xdist_workers(config)))
        if settings.requested and settings.leases == "per-test" and not config.getoption("kerasmp_ray", None):
            mode = f"{cfg.LEASES_OPTION}=per-test, from {'the default' if not _leases_set(config) else 'the options'}"
            lines.append(leasing.HEADER.format(mode=mode, option=cfg.LEASE_TIMEOUT_OPTION, timeout=settings.lease_timeout_s))
        if config.stash.get(AUTO_WORKERS_KEY, None):
            lines.append(leasing.AUTO_WORKERS.format(n=config.stash[AUTO_WORKERS_KEY], option=f"{cfg.GPUS_OPTION}={settings.gpus}"))
    if config.getoption("kerasmp_ray", None):
        lines.append(cfg.RAY_HEADER.format(option=cfg.RAY_OPTION, address=config.getoption("kerasmp_ray")))
    seed = speedgate.header(config)
    return lines + ([seed] if seed else [])


def _leases_set(config: pytest.Config) -> bool:
    return bool(config.getoption("kerasmp_leases", None) or os.environ.get(cfg.LEASES_ENV) or config.getini(cfg.LEASES_INI))


AUTO_WORKERS_KEY = pytest.StashKey[int]()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` under ``--kerasmp-gpus``: one xdist worker per slot (each pinned to its own)."""
    settings = config.stash.get(cfg.SETTINGS_KEY, None)
    plan = config.stash.get(cfg.PLAN_KEY, None)
    if settings is None or not settings.requested or plan is None or config.getoption("kerasmp_ray", None):
        return None
    config.stash[AUTO_WORKERS_KEY] = len(plan.slots)
    return len(plan.slots)


def _xdist_workers(config: pytest.Config) -> int:
    numprocesses = config.getoption("numprocesses", None) or len(config.getoption("tx", None) or [])
    return int(numprocesses or 0)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip kerasmp_gpus-marked tests through a skip marker, so the skip points at the test,
    not here; and tell pytest-benchmark which tests time comparisons."""
    speedgate.mark_benchmark_users(config, items)
    markers.skip_for_missing_gpus(config, items)
    leasing.skip_too_many(config, items)


def pytest_runtest_setup(item: pytest.Item) -> None:
    markers.check(item)
    if item.config.pluginmanager.get_plugin("kerasmp-leasing") is None:
        leasing.check(item)  # (a leasing process checks before it waits)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    speedgate.terminal_summary(terminalreporter, config)
    comparisons = config.stash.get(COMPARISONS_KEY, [])
    competed = [c for c in comparisons if c.competed]
    if competed:
        terminalreporter.write_line(placement.COMPETED_NOTE, yellow=True)
        for c in competed:
            terminalreporter.write_line(f"  {c.name}: {c.competed}", yellow=True)
    lease_summary = config.stash.get(LEASE_SUMMARY_KEY, None)
    if lease_summary:
        terminalreporter.write_line(leasing.summary_line(lease_summary, len(cfg.session_plan(config).slots)))
    records = config.stash.get(PLACEMENT_KEY, [])
    if records:
        terminalreporter.write_sep("-", f"kerasmp: placement of the {plural(len(records), 'process')} pinned in this session")
        plan = config.stash.get(cfg.PLAN_KEY, None)
        windows = config.stash.get(WINDOWS_KEY, None)
        slots = plan.slots if plan else ()
        if len(records) <= FULL_TABLE_ROWS or config.get_verbosity() > 0:
            lines = placement.table_lines(records, session_slots=slots, windows=windows)
        else:  # a harness run pins 100 processes: one line per slot, the table in the report
            lines = [*placement.slot_lines(records, session_slots=slots, windows=windows), PLACEMENT_IN_FULL]
        for line in lines:
            terminalreporter.write_line(line)
        crowded = placement.oversubscription(plan.slots, _xdist_workers(config)) if plan else None
        if crowded and plan and config.stash.get(LEASE_SUMMARY_KEY, None):
            terminalreporter.write_line(f"kerasmp: {leasing.TAKE_TURNS.format(workers=_xdist_workers(config), slots=len(plan.slots))}")
        elif crowded:
            terminalreporter.write_line(f"kerasmp: OVERSUBSCRIBED: {crowded}", yellow=True)
        exposed = placement.exposures(records)
        if exposed and cfg.session_settings(config).private_network == "require":
            count = sum(1 for r in records if r.get("exposed"))
            who = f"{count} process{'es' if count > 1 else ''} listened"
            text = NETWORK_REQUIRE_FAILED.format(count=who, listeners="; ".join(exposed))
            terminalreporter.write_line(f"kerasmp: {text}", red=True)
        elif exposed:
            terminalreporter.write_line("kerasmp: " + NETWORK_SUMMARY.format(listeners="; ".join(exposed)), yellow=True)
        shared = sorted({name for r in records if r.get("competed_with") for name in [placement.name_of(r)]})
        if shared:
            text = placement.SHARED_ACROSS_WORKERS.format(who=", ".join(shared))
            terminalreporter.write_line(f"kerasmp: {text}", yellow=True)
