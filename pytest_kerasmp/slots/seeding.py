"""Seeds and determinism for every process the plugin pins or starts. Import-light: no pytest,
and the framework under Keras and Keras are seeded when they are imported, never imported here.

``--kerasmp-seed=N`` sets ``PYTEST_KERASMP_SEED=N`` in the controller's environment, so pytest-xdist
workers and every child inherit it; ``--kerasmp-deterministic`` sets
``PYTEST_KERASMP_DETERMINISTIC=1``. Each process then calls :func:`seed_process` (``pin_process``
does) and gets its own seed, derived from (N, slot, role), where the role comes from
``PYTEST_KERASMP_ROLE`` (what the parent set for its child; otherwise ``child``, ``pytest`` or
``xdist-worker``).
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from typing import Any

from pytest_kerasmp import frameworks
from pytest_kerasmp.frameworks.hooks import after_import

SEED_ENV = "PYTEST_KERASMP_SEED"
DETERMINISTIC_ENV = "PYTEST_KERASMP_DETERMINISTIC"
ROLE_ENV = "PYTEST_KERASMP_ROLE"
SEED_FORMULA = "int.from_bytes(sha256(f'{base}:{slot}:{role}').digest()[:4], 'big')"

#: What :func:`seed_process` applied in this process: {"seed", "slot", "role", "deterministic"}.
_applied: dict[str, Any] | None = None


def derive_seed(base: int, slot: int | None, role: str) -> int:
    """A 32-bit seed for one process, stable across runs and Python versions."""
    digest = hashlib.sha256(f"{base}:{'-' if slot is None else slot}:{role}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


#: What a seed must be (the plugin says where a bad one came from; see ``parse_seed``).
SEED_VALID = "use a whole number >= 0, e.g. 1234"


def parse_seed(raw: str) -> int:
    """A seed's text as an int, or ValueError(SEED_VALID)."""
    text = raw.strip()
    if not text.isdigit():  # digits only: no sign, no spaces inside
        raise ValueError(SEED_VALID)
    return int(text)


def base_seed(environ: Any = None) -> int | None:
    """``PYTEST_KERASMP_SEED`` as an int, or None when the run is not seeded.

    Raises:
        ValueError: It is set to something else than a whole number >= 0 (named in the message).
    """
    raw = (os.environ if environ is None else environ).get(SEED_ENV, "").strip()
    if not raw:
        return None
    try:
        return parse_seed(raw)
    except ValueError:
        raise ValueError(f"{SEED_ENV}={raw!r} is invalid: {SEED_VALID}") from None


def deterministic(environ: Any = None) -> bool:
    return (os.environ if environ is None else environ).get(DETERMINISTIC_ENV, "") in ("1", "true", "yes")


def default_role() -> str:
    """``PYTEST_KERASMP_ROLE`` if set; else ``child`` in a multiprocessing child (a pool worker
    or server whose parent set no role), ``xdist-worker`` or ``pytest``."""
    if os.environ.get(ROLE_ENV):
        return os.environ[ROLE_ENV]
    if "multiprocessing" in sys.modules and sys.modules["multiprocessing"].parent_process() is not None:
        return "child"
    return "xdist-worker" if os.environ.get("PYTEST_XDIST_WORKER") else "pytest"


def seed_everything(seed: int, *, determinism: bool = False) -> None:
    """Seed Python's ``random`` and numpy now, and the framework under Keras and Keras itself
    now or the moment they are imported; with ``determinism``, turn on the framework's op
    determinism too (TensorFlow: ``enable_op_determinism``)."""
    random.seed(seed)
    if "numpy" in sys.modules or _importable("numpy"):
        import numpy as np

        np.random.seed(seed)
    framework = frameworks.active()

    def seed_keras(keras: Any) -> None:
        utils = getattr(keras, "utils", None)
        if utils is not None and hasattr(utils, "set_random_seed"):
            utils.set_random_seed(seed)  # Keras' own seed state, and random/numpy/backend again

    after_import(framework.module, lambda module: framework.seed(module, seed, determinism), key="seed")
    after_import("keras", seed_keras, key="seed")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def seed_process(slot: int | None = None, role: str | None = None) -> int | None:
    """Seed this process from ``PYTEST_KERASMP_SEED`` (nothing when it is unset); return the seed.

    The seed is ``derive_seed(N, slot, role)``; role defaults to ``PYTEST_KERASMP_ROLE`` or
    ``pytest``/``xdist-worker``. Idempotent for the same (slot, role).
    """
    global _applied
    base = base_seed()
    if base is None:
        return None
    role = role or default_role()
    seed = derive_seed(base, slot, role)
    if _applied is not None and _applied["seed"] == seed:
        return seed
    seed_everything(seed, determinism=deterministic())
    _applied = {"base": base, "seed": seed, "slot": slot, "role": role, "deterministic": deterministic(), "pid": os.getpid()}
    return seed


def applied() -> dict[str, Any] | None:
    """What :func:`seed_process` applied in this process, for the report."""
    return None if _applied is None else dict(_applied)


def seed_table(base: int, slots: int, roles: tuple[str, ...] = ("pytest", "xdist-worker", "child", "pool-worker", "server")) -> list[dict[str, Any]]:
    """The seed each (slot, role) gets from ``base``: what the report records."""
    return [{"slot": s, "role": r, "seed": derive_seed(base, s, r)} for s in range(slots) for r in roles]
