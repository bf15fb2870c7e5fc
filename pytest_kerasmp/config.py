"""Settings of a session, resolved once from CLI, environment and ini.

Precedence: command line > environment variable > ini file > default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import pytest

from pytest_kerasmp.devices import DeviceSlot, detect_gpus, parse_slot_count, plan_slots

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

GPUS_HELP = (
    "Number of device slots for this session: N or 'auto' (one per GPU, or one per usable "
    "core when there is no GPU). Setting it pins each pytest-xdist worker gwK to slot K mod N, "
    "or this process to slot 0 without xdist. "
    f"Also ini {GPUS_INI}, env {GPUS_ENV}. Default: auto, and nothing is pinned"
)
MEMORY_HELP = (
    "GPU memory cap per slot in MB (a per-process limit, for slots that share a GPU). "
    f"Also ini {MEMORY_INI}, env {MEMORY_ENV}. Default: no cap"
)
REQUIRE_HELP = (
    "Fail instead of skip when a test or the plan needs more GPUs than the machine has "
    f"(for GPU CI). Also ini {REQUIRE_INI}, env {REQUIRE_ENV}=1. Default: off"
)

BAD_VALUE = "{name}={value!r} (from {source}) is invalid: {valid}"
GPUS_VALID = "use a positive integer or 'auto'"
MEMORY_VALID = "use a positive whole number of megabytes"
REQUIRE_VALID = "use 1/true/yes or 0/false/no"
TOO_FEW_GPUS = (
    "{option}={n} (from {source}) asks for {n} GPU slot(s) but {found} GPU(s) were found "
    "and --kerasmp-require-gpu is set; lower {option} to {found} or run on a machine with "
    "enough GPUs"
)
NO_GPU_REQUIRED = (
    "--kerasmp-require-gpu is set but no GPU was found (nvidia-smi -L and "
    "CUDA_VISIBLE_DEVICES); install the NVIDIA driver or drop --kerasmp-require-gpu"
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The session's kerasmp settings, resolved once."""

    gpus: int | Literal["auto"] = "auto"
    gpus_source: str = "the default"
    requested: bool = False
    gpu_memory_mb: int | None = None
    require_gpu: bool = False

    def command_line(self) -> str:
        """The options that reproduce this plan."""
        parts = [f"{GPUS_OPTION}={self.gpus}"]
        if self.gpu_memory_mb is not None:
            parts.append(f"{MEMORY_OPTION}={self.gpu_memory_mb}")
        if self.require_gpu:
            parts.append(REQUIRE_OPTION)
        return " ".join(parts)


def _pick(
    cli: Any, env: Mapping[str, str], env_name: str, ini: Any, ini_name: str
) -> tuple[Any, str] | None:
    """The first value set, with where it came from."""
    if cli not in (None, ""):
        return cli, "the command line"
    if env.get(env_name, "").strip():
        return env[env_name], f"env {env_name}"
    if ini not in (None, "", []):
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
    if picked is not None:
        value, gpus_source = picked
        try:
            gpus = parse_slot_count(str(value))
        except ValueError:
            raise _fail(GPUS_OPTION, value, gpus_source, GPUS_VALID) from None
        requested = True

    memory: int | None = None
    picked = _pick(cli.get("kerasmp_gpu_memory"), env, MEMORY_ENV, ini(MEMORY_INI), MEMORY_INI)
    if picked is not None:
        value, source = picked
        text = str(value).strip()
        if not text.isdigit() or int(text) < 1:
            raise _fail(MEMORY_OPTION, value, source, MEMORY_VALID)
        memory = int(text)

    require = bool(cli.get("kerasmp_require_gpu"))
    if not require and env.get(REQUIRE_ENV, "").strip():
        text = env[REQUIRE_ENV].strip().lower()
        if text not in ("1", "true", "yes", "0", "false", "no"):
            raise _fail(REQUIRE_OPTION, env[REQUIRE_ENV], f"env {REQUIRE_ENV}", REQUIRE_VALID)
        require = text in ("1", "true", "yes")
    elif not require:
        require = bool(ini(REQUIRE_INI))
    return Settings(gpus, gpus_source, requested, memory, require)


def check_required_gpus(settings: Settings, gpus_found: int) -> None:
    """Under --kerasmp-require-gpu, refuse a plan that would need more GPUs than exist."""
    if not settings.require_gpu:
        return
    if gpus_found == 0:
        raise pytest.UsageError(NO_GPU_REQUIRED)
    if settings.gpus != "auto" and settings.gpus > gpus_found:
        raise pytest.UsageError(
            TOO_FEW_GPUS.format(
                option=GPUS_OPTION, n=settings.gpus, source=settings.gpus_source, found=gpus_found
            )
        )


Role = Literal["main", "controller", "worker"]


@dataclasses.dataclass(frozen=True)
class SessionPlan:
    """The slots of this session and how this pytest process takes part.

    ``role`` is ``"main"`` without xdist (this process pinned to slot 0), ``"controller"``
    for the xdist controller (not pinned, plans for its workers) or ``"worker"``.
    """

    slots: tuple[DeviceSlot, ...]
    gpus_found: int
    role: Role
    pinned: DeviceSlot | None = None
    worker_id: str | None = None


SETTINGS_KEY = pytest.StashKey[Settings]()
PLAN_KEY = pytest.StashKey[SessionPlan]()


def session_settings(config: pytest.Config) -> Settings:
    return config.stash.get(SETTINGS_KEY, Settings())


def session_plan(config: pytest.Config) -> SessionPlan:
    """The session's plan; planned now (``auto``, nothing pinned) when no slots were asked for."""
    plan = config.stash.get(PLAN_KEY, None)
    if plan is None:
        settings = session_settings(config)
        gpus = detect_gpus()
        slots = plan_slots(settings.gpus, gpus=gpus, memory_limit_mb=settings.gpu_memory_mb)
        plan = SessionPlan(slots=slots, gpus_found=len(gpus), role="main")
        config.stash[PLAN_KEY] = plan
    return plan
