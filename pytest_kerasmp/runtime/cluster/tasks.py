"""A cluster's processes: a pool whose worker i is task i of a :class:`~pytest_kerasmp.TFCluster`.

Each task is a child of the one lifecycle with role ``cluster-task`` and its ``TF_CONFIG`` set
before TensorFlow is imported; tasks are never replaced one by one (the cluster restarts all
of them together, see ``cluster``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from pytest_kerasmp.frameworks.tensorflow import set_collective_timeout
from pytest_kerasmp.runtime.pool.local import LocalBackend
from pytest_kerasmp.runtime.pool.workerpool import WorkerPool
from pytest_kerasmp.runtime.process.lifecycle import Child
from pytest_kerasmp.slots.devices import DeviceSlot

if TYPE_CHECKING:
    from pytest_kerasmp.runtime.cluster.cluster import TFCluster


class TaskPool(WorkerPool):
    """The cluster's processes: a pool whose worker i is task i (``TF_CONFIG`` set before
    TensorFlow is imported), never replaced (the cluster restarts all of them together)."""

    replace_workers = False

    def __init__(self, cluster: TFCluster) -> None:
        super().__init__(
            cluster.slots, start_timeout_s=cluster.start_timeout_s, backend=TaskBackend(cluster),
            name=cluster.name, initializer=set_collective_timeout, initargs=(cluster.collective_timeout_s,),
        )

    def submit_to(self, index: int, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        return self._submit(fn, args, kwargs, None, index)

    def workers(self) -> list[Any]:
        return list(self._dispatcher.workers)


class TaskBackend(LocalBackend):
    """Starts task i of the cluster as worker i: role ``cluster-task``, its ``TF_CONFIG``."""

    def __init__(self, cluster: TFCluster) -> None:
        super().__init__(cluster.start_method)
        self.cluster = cluster

    def start_child(self, pool: Any, index: int, slot: DeviceSlot) -> Child:
        cluster = self.cluster
        task = cluster.task_names[index]
        child = Child(
            "cluster-task",
            f"kerasmp-{cluster.name}-{task.replace(':', '')}",
            slot,
            (pool.init_call,),
            start_method=self.start_method,
            who=f"task {task} ({{slot}}, pid {{pid}}) of cluster {cluster.name!r}",
            label=f"{cluster.name} {task}",
            env=cluster.task_environ(index),
            netns=cluster.network.pid if cluster.network is not None else None,
            network_note=cluster.network_note,
        )
        cluster._starting.append(child)
        return child

# ------------------------------------------------------------------------------ in the tasks
