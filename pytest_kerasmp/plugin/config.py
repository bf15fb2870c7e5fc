"""Settings of a session, resolved once from CLI, environment and ini.

Precedence: command line > environment variable > ini file > default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import pytest

from pytest_kerasmp.ray.connect import CONNECT_TIMEOUT_S
from pytest_kerasmp.slots import network
from pytest_kerasmp.slots.devices import DeviceSlot, detect_gpus, parse_slot_count, plan_slots, plural
from pytest_kerasmp.slots.placement import part_of

GPUS_OPTION, GPUS_INI, GPUS_ENV = "--kerasmp-gpus", "kerasmp_gpus", "PYTEST_KERASMP_GPUS"
MEMORY_OPTION, MEMORY_INI, MEMORY_ENV = (
    "--kerasmp-gpu-memory",
    "kerasmp_gpu_memory",
    "PYTEST_KERASMP_GPU_MEMORY",
)
REQUIRE_OPTION, REQUIRE_INI, REQUIRE_ENV = (
    "--kerasmp-require-gpu",
    "kerasmp_require_gpu",
    "PYTEST_KERASMP_REQUIRE_GPU",
)

RAY_OPTION = "--kerasmp-ray"
RAY_HELP = (
    "Run the kerasmp_pool, kerasmp_pool_factory and kerasmp_inference_server fixtures on Ray: "
    "the address of a running cluster, or 'local' for a cluster on this machine's loopback "
    "that the session starts and ends. Slots are planned from the cluster's nodes "
    "(plan_ray_slots). Needs pytest-kerasmp[ray]. Default: off (local processes)"
)
RAY_TIMEOUT_OPTION, RAY_TIMEOUT_INI, RAY_TIMEOUT_ENV = (
    "--kerasmp-ray-timeout",
    "kerasmp_ray_timeout",
    "PYTEST_KERASMP_RAY_TIMEOUT",
)
RAY_TIMEOUT_HELP = (
    f"Bound in seconds on connecting to the {RAY_OPTION} cluster (name lookup, TCP, ray.init); "
    "past it, or at once when the host does not resolve or the port refuses, the session stops "
    f"with one line that says what was tried. Also ini {RAY_TIMEOUT_INI}, env {RAY_TIMEOUT_ENV}. "
    f"Default: {CONNECT_TIMEOUT_S:g}"
)
RAY_TIMEOUT_VALID = "use a positive number of seconds, e.g. 30"
RAY_LOCAL_XDIST = (
    "--kerasmp-ray=local with -n would start one Ray cluster per xdist worker, each on every "
    "core; start one cluster (ray start --head --node-ip-address=127.0.0.1) and pass its "
    "address, e.g. --kerasmp-ray=127.0.0.1:6379, or drop -n"
)
RAY_HEADER = (
    "kerasmp: {option}={address} -> pools and servers are Ray actors; slots planned from the "
    "cluster's nodes when a fixture first needs them"
)

BACKEND_OPTION, BACKEND_INI, BACKEND_ENV = (
    "--kerasmp-keras-backend",
    "kerasmp_keras_backend",
    "PYTEST_KERASMP_KERAS_BACKEND",
)
BACKEND_CHOICES = ("tensorflow", "jax", "torch")
BACKEND_HELP = (
    "Keras backend of the session and of every process it starts: tensorflow, jax or torch "
    "(sets KERAS_BACKEND before Keras is imported). "
    f"Also ini {BACKEND_INI}, env {BACKEND_ENV}. Default: Keras's own choice (KERAS_BACKEND, "
    "else ~/.keras/keras.json, else tensorflow)"
)
BACKEND_VALID = "use one of " + ", ".join(BACKEND_CHOICES)
BACKEND_NOT_INSTALLED = (
    "the Keras backend {name!r} (from {source}) is not installed: {module!r} cannot be imported; "
    "pip install 'pytest-kerasmp[{extra}]' or choose another with {option}"
)
BACKEND_TOO_LATE = (
    "Keras was imported on backend {imported!r} before kerasmp could set {name!r} (from "
    "{source}); a plugin or conftest imported keras first: set KERAS_BACKEND={name} in the "
    "environment instead"
)
BACKEND_HEADER = "kerasmp: Keras backend {name} {version} (from {source}), keras {keras}"

GPUS_HELP = (
    "Number of device slots for this session: N or 'auto' (one per GPU, or one per usable "
    "core when there is no GPU); 'off' (or 0) turns slots off whatever ini or env say. "
    "Setting it splits the slots among pytest-xdist workers (gwK owns part K and is pinned "
    "to its first slot; its pools and servers use its part), or pins this process to slot 0 "
    f"without xdist. Also ini {GPUS_INI}, env {GPUS_ENV}. Default: auto, and nothing is pinned"
)
MEMORY_HELP = (
    "GPU memory cap per process in MB (a per-process logical-device limit, instead of memory "
    f"growth). Also ini {MEMORY_INI}, env {MEMORY_ENV}. Default: no cap, memory growth on"
)
REQUIRE_HELP = (
    "Fail instead of skip when a test or the plan needs more GPUs than the machine has "
    f"(for GPU CI). Also ini {REQUIRE_INI}, env {REQUIRE_ENV}=1. Default: off"
)

PRIVATE_NETWORK_OPTION, PRIVATE_NETWORK_INI, PRIVATE_NETWORK_ENV = (
    "--kerasmp-private-network",
    "kerasmp_private_network",
    network.MODE_ENV,
)
PRIVATE_NETWORK_HELP = (
    "Clusters whose framework listens on every interface (TensorFlow's gRPC server) run their "
    "tasks in a network namespace with only loopback: 'auto' uses one where the kernel allows "
    "it and otherwise starts them exposed, named in the placement table and the session's last "
    "lines; 'require' makes that, and any process of the plugin listening where the network "
    "reaches it, an error; 'off' never uses one. "
    f"Also ini {PRIVATE_NETWORK_INI}, env {PRIVATE_NETWORK_ENV}. Default: auto"
)
PRIVATE_NETWORK_VALID = "use auto, require or off"
LEASES_OPTION, LEASES_INI, LEASES_ENV = "--kerasmp-leases", "kerasmp_leases", "PYTEST_KERASMP_LEASES"
LEASES_HELP = (
    "How slots are given to tests: 'per-test' leases each test the slots it needs from one "
    "table for the session (its process's slot; @pytest.mark.kerasmp_slots(n) n of them), "
    "waiting first come first served; 'off' gives each pytest process its part of the slots "
    f"for the whole session. Also ini {LEASES_INI}, env {LEASES_ENV}. Default: per-test"
)
LEASES_VALID = "use per-test or off"
LEASE_TIMEOUT_OPTION, LEASE_TIMEOUT_INI, LEASE_TIMEOUT_ENV = (
    "--kerasmp-lease-timeout", "kerasmp_lease_timeout", "PYTEST_KERASMP_LEASE_TIMEOUT",
)
LEASE_TIMEOUT_DEFAULT_S = 900.0
LEASE_TIMEOUT_HELP = (
    "Bound in seconds on a test's wait for its slots; past it the test fails, naming who holds "
    f"what. Also ini {LEASE_TIMEOUT_INI}, env {LEASE_TIMEOUT_ENV}. Default: {LEASE_TIMEOUT_DEFAULT_S:g}"
)
LEASE_TIMEOUT_VALID = "use a positive number of seconds, e.g. 600"

BAD_VALUE = "{name}={value!r} (from {source}) is invalid: {valid}"
GPUS_VALID = "use a positive integer, 'auto', or 'off' (also 0)"
GPUS_OFF = ("off", "none", "0")
MEMORY_VALID = "use a positive whole number of megabytes"
REQUIRE_VALID = "use 1/true/yes or 0/false/no"
TOO_FEW_GPUS = (
    "{option}={n} (from {source}) asks for {slots} but {found} found and "
    "--kerasmp-require-gpu is set (from {require_source}); lower {option} to {n_found} or run on "
    "a machine with enough GPUs"
)
NO_GPU_REQUIRED = (
    "--kerasmp-require-gpu is set (from {require_source}) but no GPU was found (nvidia-smi -L "
    "and CUDA_VISIBLE_DEVICES); install the NVIDIA driver or unset it"
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The session's kerasmp settings, resolved once."""

    gpus: int | Literal["auto"] = "auto"
    gpus_source: str = "the default"
    requested: bool = False
    gpu_memory_mb: int | None = None
    require_gpu: bool = False
    memory_source: str = "the default"
    require_source: str = "the default"
    ray_timeout_s: float = CONNECT_TIMEOUT_S
    ray_timeout_source: str = "the default"
    keras_backend: str = "tensorflow"
    keras_backend_source: str = "the default"
    private_network: str = "auto"
    private_network_source: str = "the default"
    leases: str = "per-test"
    lease_timeout_s: float = LEASE_TIMEOUT_DEFAULT_S

    def command_line(self) -> str:
        """The options that reproduce this plan, each with where it came from."""
        parts = [(f"{GPUS_OPTION}={self.gpus}", self.gpus_source)]
        if self.gpu_memory_mb is not None:
            parts.append((f"{MEMORY_OPTION}={self.gpu_memory_mb}", self.memory_source))
        if self.require_gpu:
            parts.append((REQUIRE_OPTION, self.require_source))
        groups: list[tuple[list[str], str]] = []
        for text, source in parts:
            if groups and groups[-1][1] == source:
                groups[-1][0].append(text)
            else:
                groups.append(([text], source))
        return ", ".join(f"{' '.join(texts)} (from {source})" for texts, source in groups)


def _pick(
    cli: Any, env: Mapping[str, str], env_name: str, ini: Any, ini_name: str
) -> tuple[Any, str] | None:
    """The first value set, with where it came from."""
    if cli not in (None, ""):
        return cli, "the command line"
    if env.get(env_name, "").strip():
        return env[env_name], f"env {env_name}"
    if ini is not False and ini not in (None, "", []):
        return ini, f"ini {ini_name}"
    return None


def _fail(name: str, value: Any, source: str, valid: str) -> pytest.UsageError:
    return pytest.UsageError(BAD_VALUE.format(name=name, value=value, source=source, valid=valid))


def resolve_settings(
    cli: Mapping[str, Any], env: Mapping[str, str], ini: Callable[[str], Any]
) -> Settings:
    """Settings from parsed CLI values (by dest), the environment and an ini getter.

    Raises:
        pytest.UsageError: A value is invalid; the message says where it came from.
    """
    gpus: int | Literal["auto"] = "auto"
    gpus_source, requested = "the default", False
    picked = _pick(cli.get("kerasmp_gpus"), env, GPUS_ENV, ini(GPUS_INI), GPUS_INI)
    if picked is not None and str(picked[0]).strip().lower() in GPUS_OFF:
        gpus_source = picked[1]  # switched off: nothing pinned, whatever a lower level says
    elif picked is not None:
        value, gpus_source = picked
        try:
            gpus = parse_slot_count(str(value))
        except ValueError:
            raise _fail(GPUS_OPTION, value, gpus_source, GPUS_VALID) from None
        requested = True

    memory: int | None = None
    memory_source = "the default"
    picked = _pick(cli.get("kerasmp_gpu_memory"), env, MEMORY_ENV, ini(MEMORY_INI), MEMORY_INI)
    if picked is not None:
        value, memory_source = picked
        text = str(value).strip()
        if not text.isdigit() or int(text) < 1:
            raise _fail(MEMORY_OPTION, value, memory_source, MEMORY_VALID)
        memory = int(text)

    require, require_source = False, "the default"
    picked = _pick(
        True if cli.get("kerasmp_require_gpu") else None, env, REQUIRE_ENV, ini(REQUIRE_INI), REQUIRE_INI
    )
    if picked is not None:
        value, require_source = picked
        text = str(value).strip().lower()
        if text not in ("1", "true", "yes", "0", "false", "no"):
            raise _fail(REQUIRE_OPTION, value, require_source, REQUIRE_VALID)
        require = text in ("1", "true", "yes")

    ray_timeout, ray_timeout_source = CONNECT_TIMEOUT_S, "the default"
    picked = _pick(cli.get("kerasmp_ray_timeout"), env, RAY_TIMEOUT_ENV, ini(RAY_TIMEOUT_INI), RAY_TIMEOUT_INI)
    if picked is not None:
        value, ray_timeout_source = picked
        try:
            ray_timeout = float(str(value).strip())
        except ValueError:
            ray_timeout = float("nan")
        if not 0 < ray_timeout < float("inf"):
            raise _fail(RAY_TIMEOUT_OPTION, value, ray_timeout_source, RAY_TIMEOUT_VALID)
    backend, backend_source = resolve_backend(cli, env, ini)
    private, private_source = "auto", "the default"
    picked = _pick(cli.get("kerasmp_private_network"), env, PRIVATE_NETWORK_ENV, ini(PRIVATE_NETWORK_INI), PRIVATE_NETWORK_INI)
    if picked is not None:
        private, private_source = str(picked[0]).strip().lower(), picked[1]
        if private not in network.MODES:
            raise _fail(PRIVATE_NETWORK_OPTION, picked[0], private_source, PRIVATE_NETWORK_VALID)
    leases = "per-test"
    picked = _pick(cli.get("kerasmp_leases"), env, LEASES_ENV, ini(LEASES_INI), LEASES_INI)
    if picked is not None:
        leases = str(picked[0]).strip().lower()
        if leases not in ("per-test", "off"):
            raise _fail(LEASES_OPTION, picked[0], picked[1], LEASES_VALID)
    lease_timeout = LEASE_TIMEOUT_DEFAULT_S
    picked = _pick(cli.get("kerasmp_lease_timeout"), env, LEASE_TIMEOUT_ENV, ini(LEASE_TIMEOUT_INI), LEASE_TIMEOUT_INI)
    if picked is not None:
        try:
            lease_timeout = float(str(picked[0]).strip())
        except ValueError:
            lease_timeout = float("nan")
        if not 0 < lease_timeout < float("inf"):
            raise _fail(LEASE_TIMEOUT_OPTION, picked[0], picked[1], LEASE_TIMEOUT_VALID)
    return Settings(
        gpus, gpus_source, requested, memory, require, memory_source, require_source, ray_timeout, ray_timeout_source,
        backend, backend_source, private, private_source, leases, lease_timeout,
    )


def export_private_network(settings: Settings) -> str | None:
    """Tell every process of the session (xdist workers, clusters) the private-network mode
    chosen on the command line or in the ini file; returns the value to restore."""
    import os

    before = os.environ.get(PRIVATE_NETWORK_ENV)
    if settings.private_network_source != "the default":
        os.environ[PRIVATE_NETWORK_ENV] = settings.private_network
    return before


def resolve_backend(cli: Mapping[str, Any], env: Mapping[str, str], ini: Callable[[str], Any]) -> tuple[str, str]:
    """The session's Keras backend and where it came from: the option (CLI, env, ini), else
    Keras's own choice; refused when not one kerasmp supports or not installed."""
    import importlib.util

    from pytest_kerasmp import frameworks

    picked = _pick(cli.get("kerasmp_keras_backend"), env, BACKEND_ENV, ini(BACKEND_INI), BACKEND_INI)
    if picked is not None:
        name, source = str(picked[0]).strip().lower(), picked[1]
        option = BACKEND_OPTION
    else:
        name, source = frameworks.backend_name(dict(env))
        option = "KERAS_BACKEND"
    if name not in BACKEND_CHOICES:
        raise _fail(option, name, source, BACKEND_VALID)
    module = frameworks.get(name).module
    if source != "the default" and importlib.util.find_spec(module) is None:  # chosen, not assumed
        raise pytest.UsageError(BACKEND_NOT_INSTALLED.format(
            name=name, source=source, module=module, extra=name, option=BACKEND_OPTION,
        ))
    return name, source


def backend_chosen(settings: Settings) -> bool:
    """Whether the session's backend was chosen through kerasmp's option (CLI, env, ini);
    otherwise it is Keras's own choice, which every process makes alike by itself."""
    return settings.keras_backend_source in ("the command line", f"env {BACKEND_ENV}", f"ini {BACKEND_INI}")


def apply_backend(settings: Settings) -> None:
    """Set ``KERAS_BACKEND`` for this process and every process it starts, before Keras is
    imported, when kerasmp's option chose it (Keras's own choice is left alone: a suite that
    asks nothing of the plugin is untouched); a Keras already imported on another backend
    stops the session."""
    import os
    import sys

    if not backend_chosen(settings):
        return
    keras = sys.modules.get("keras")
    backend = getattr(keras, "backend", None)
    imported = backend.backend() if backend is not None and hasattr(backend, "backend") else None
    if imported is not None and imported != settings.keras_backend:
        raise pytest.UsageError(BACKEND_TOO_LATE.format(
            imported=imported, name=settings.keras_backend, source=settings.keras_backend_source,
        ))
    os.environ["KERAS_BACKEND"] = settings.keras_backend


def backend_header(settings: Settings) -> str:
    """The header line naming the backend and its version, and Keras's."""
    from pytest_kerasmp import frameworks

    def version(name: str) -> str:
        import importlib.metadata

        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    framework = frameworks.get(settings.keras_backend)
    return BACKEND_HEADER.format(
        name=settings.keras_backend, version=framework.version() or "?",
        source=settings.keras_backend_source, keras=version("keras"),
    )


def check_required_gpus(settings: Settings, gpus_found: int) -> None:
    """Under --kerasmp-require-gpu, refuse a plan that would need more GPUs than exist."""
    if not settings.require_gpu:
        return
    if gpus_found == 0:
        raise pytest.UsageError(NO_GPU_REQUIRED.format(require_source=settings.require_source))
    if settings.gpus != "auto" and settings.gpus > gpus_found:
        raise pytest.UsageError(too_few_gpus(settings, gpus_found))


def too_few_gpus(settings: Settings, found: int) -> str:
    assert settings.gpus != "auto"
    return TOO_FEW_GPUS.format(
        option=GPUS_OPTION, n=settings.gpus, source=settings.gpus_source,
        slots=plural(settings.gpus, "GPU slot"), found=plural(found, "GPU"), n_found=found,
        require_source=settings.require_source,
    )


Role = Literal["main", "controller", "worker"]


@dataclasses.dataclass(frozen=True)
class SessionPlan:
    """The slots of this session and how this pytest process takes part.

    ``role`` is ``"main"`` without xdist (this process pinned to slot 0), ``"controller"``
    for the xdist controller (not pinned, plans for its workers) or ``"worker"``. ``part``
    is what this process owns (``placement.part_of``): every slot without xdist, the
    worker's part under ``-n``; ``workers`` is the number of xdist workers (0 without).
    """

    slots: tuple[DeviceSlot, ...]
    gpus_found: int
    role: Role
    pinned: DeviceSlot | None = None
    worker_id: str | None = None
    part: tuple[DeviceSlot, ...] = ()
    workers: int = 0

    @property
    def own_slots(self) -> tuple[DeviceSlot, ...]:
        return self.part or self.slots


SETTINGS_KEY = pytest.StashKey[Settings]()
PLAN_KEY = pytest.StashKey[SessionPlan]()


def session_settings(config: pytest.Config) -> Settings:
    return config.stash.get(SETTINGS_KEY, Settings())


def session_plan(config: pytest.Config) -> SessionPlan:
    """The session's plan; planned now (``auto``, nothing pinned) when no slots were asked for."""
    plan = config.stash.get(PLAN_KEY, None)
    if plan is None:
        import os

        from pytest_kerasmp.slots.devices import usable_cores

        settings = session_settings(config)
        gpus = detect_gpus()
        slots = plan_slots(
            settings.gpus, gpus=gpus, cores=usable_cores(), memory_limit_mb=settings.gpu_memory_mb
        )
        worker_id = os.environ.get("PYTEST_XDIST_WORKER") if hasattr(config, "workerinput") else None
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) if worker_id else 0
        plan = SessionPlan(
            slots=slots, gpus_found=len(gpus), role="worker" if worker_id else "main",
            worker_id=worker_id, part=part_of(slots, worker_id, workers), workers=workers,
        )
        config.stash[PLAN_KEY] = plan
    return plan
