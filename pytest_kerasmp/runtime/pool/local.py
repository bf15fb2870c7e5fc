"""The local execution backend: a pool's workers are child processes of this one.

Each worker is a :class:`~pytest_kerasmp.runtime.process.lifecycle.Child` (the one lifecycle: pinned
before it imports the framework, watched, its exit described, its stacks taken before a
kill), owned by the pool's :class:`~pytest_kerasmp.runtime.pool.dispatch.Dispatcher`. Calls are
pickled with their large arrays out of band, through the shared-memory transport.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pytest_kerasmp.errors import FORK_REFUSED
from pytest_kerasmp.runtime.pool.dispatch import Dispatcher, Worker
from pytest_kerasmp.runtime.pool.taskqueue import PoolSpec
from pytest_kerasmp.runtime.process import lifecycle
from pytest_kerasmp.runtime.process.lifecycle import START_METHODS, Child
from pytest_kerasmp.runtime.wire.transport import dumps_call
from pytest_kerasmp.slots.devices import DeviceSlot


class LocalBackend:
    """Workers as child processes, started with ``start_method`` (``"spawn"`` or ``"forkserver"``)."""

    name = "local"

    def __init__(self, start_method: str = "spawn") -> None:
        if start_method == "fork":
            raise ValueError(FORK_REFUSED)
        if start_method not in START_METHODS:
            raise ValueError(f"start_method={start_method!r} is not one of {START_METHODS}")
        self.start_method = start_method

    def start(self, pool: PoolSpec) -> Dispatcher:
        children: list[Child] = []
        try:
            for i, slot in enumerate(pool.slots):
                children.append(self.start_child(pool, i, slot))
            lifecycle.wait_all_ready(children, pool.start_timeout_s)
        except BaseException:
            for child in children:
                child.kill()
            for child in children:
                child.stop(grace=0.0)
            raise
        workers = [Worker(index=i, slot=s, child=c, state="idle") for i, (s, c) in enumerate(zip(pool.slots, children, strict=True))]
        return Dispatcher(pool, self, workers)

    def start_child(self, pool: PoolSpec, index: int, slot: DeviceSlot) -> Child:
        """Start worker ``index`` of ``pool`` on ``slot`` (also to replace a dead worker)."""
        kind = f"gpu{slot.gpu}" if slot.kind == "GPU" else f"cpu{slot.index}"
        return Child(
            "pool-worker",
            f"kerasmp-{pool.name}-w{index}-{kind}",
            slot,
            (pool.init_call,),
            start_method=self.start_method,
            warm_import=pool.warm_import,
            who=f"worker {index} ({{slot}}, pid {{pid}}) of pool {pool.name!r}",
            label=f"{pool.name} w{index}",
        )

    def pack(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, list[Any]]:
        """The call, its large buffers as views of the caller's arrays: the dispatcher copies
        them into the worker's arena at once, or copies them aside before it returns."""
        return dumps_call(fn, args, kwargs, copy=_view)


def _view(buffer: Any) -> Any:
    return buffer
