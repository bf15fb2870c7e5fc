"""The Ray execution backend, configured: ``backend=RayBackend(address=..., reserve=..., timeout_s=...)``.

One frozen object serves a :class:`~pytest_kerasmp.WorkerPool` and an
:class:`~pytest_kerasmp.InferenceServer` alike; ``backend="ray"`` is ``RayBackend()``. Its
two makers import the Ray modules only when a pool or a server starts on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from pytest_kerasmp.runtime import backends


@dataclasses.dataclass(frozen=True)
class RayBackend:
    """Workers and servers as Ray actors on Ray slots (:func:`~pytest_kerasmp.plan_ray_slots`).

    Args:
        address: The cluster to connect to (default: the one this process is connected to,
            else a new local one).
        reserve: Reserve the slots' CPUs in Ray (default), or share them with other pools and
            servers on the same slots (as local pools do).
        timeout_s: The bound on connecting to ``address`` (default 30 s;
            :class:`~pytest_kerasmp.RayConnectError` past it, saying what was tried).
    """

    address: str | None = None
    reserve: bool = True
    timeout_s: float | None = None
    name: ClassVar[str] = "ray"

    def __post_init__(self) -> None:
        if self.timeout_s is not None and not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"timeout_s={self.timeout_s!r} must be a positive number of seconds (or None: 30 s)")

    # Made by name (as runtime.backends finds a backend): ray.pool and ray.server take this
    # object, so importing them here would tie the three modules in a circle.
    def for_pool(self, start_method: str) -> Any:
        return backends.load("pytest_kerasmp.ray.pool:RayPoolBackend")(self)

    def for_server(self, start_method: str) -> Any:
        return backends.load("pytest_kerasmp.ray.server:RayServerBackend")(self)


__all__ = ["RayBackend"]
