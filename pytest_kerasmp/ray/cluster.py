"""Ray clusters for the Ray backend: connect, plan slots from a cluster's nodes, and a
loopback-only local multi-node cluster for tests and scenarios.

Imports Ray only inside functions (``pytest_kerasmp`` works without Ray installed; the
``ray`` extra installs it). Planning, as in ``devices``, is pure: it reads the cluster's
node table and never starts anything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Self

from pytest_kerasmp.errors import (
    MAIN_NOT_GUARDED,
    RAY_MISSING,
    RAY_NO_SLOTS,
    RAY_NODE_GONE,
    RAY_PROCESSES_LEFT,
    RAY_SLOT_INFEASIBLE,
    KerasMPError,
    WorkerStartupError,
)
from pytest_kerasmp.ray import output
from pytest_kerasmp.ray.connect import CONNECT_TIMEOUT_S, connect_bounded
from pytest_kerasmp.runtime.process import bootstrap, owners
from pytest_kerasmp.slots.devices import DeviceSlot, plural, split_evenly

#: Ray's setting for its workers' niceness (see _worker_niceness_zero).
WORKER_NICENESS = "RAY_worker_niceness"
#: Ray's cluster mode stays off (one machine pretending to be many is only for tests).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
LOOPBACK = "127.0.0.1"
#: Object store per node of the local clusters this module starts (MB): small, tests move little.
OBJECT_STORE_MB = 150
SHUTDOWN_WAIT_S = 15.0
_connecting = threading.Lock()  # a client's threads may all connect on their first request


def import_ray() -> Any:
    """``ray``, or an ImportError that names the extra to install.

    Ray's cluster mode is switched off before Ray is imported (Ray reads it once, then turns
    every loopback address it is given into this machine's network address)."""
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import ray
        from ray._private import ray_constants
    except ImportError as exc:
        raise ImportError(RAY_MISSING) from exc
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False  # Ray was imported before this module could say so
    return ray


def connect(address: str | None = None, *, quiet: bool = False, timeout_s: float = CONNECT_TIMEOUT_S) -> Any:
    """Connect this process to Ray (once) and return the ``ray`` module.

    ``None``: the cluster this process is already connected to, else a new local single-node
    cluster on loopback; ``"local"``: that new local cluster; anything else: the address of a
    running cluster (``"127.0.0.1:6379"``, ``"ray://host:10001"``, ``"auto"``), connected to
    within ``timeout_s`` or :class:`~pytest_kerasmp.errors.RayConnectError`, which says what
    was tried (Ctrl-C ends the attempt at once). ``quiet``: the cluster's workers' output is
    not copied to this process (for clients).
    """
    if bootstrap.importing_main:  # a script without a __main__ guard, imported by a worker
        raise RuntimeError(MAIN_NOT_GUARDED.format(path=bootstrap.importing_main))
    ray = import_ray()
    with _connecting:
        if not ray.is_initialized():
            _init(ray, address, quiet, timeout_s)
        output.install()
    return ray


def _init(ray: Any, address: str | None, quiet: bool, timeout_s: float) -> None:
    if address in (None, "local"):
        from pytest_kerasmp.slots.devices import usable_cores

        ray.init(
            address="local", num_cpus=len(usable_cores()), include_dashboard=False,
            object_store_memory=OBJECT_STORE_MB * 2**20, _node_ip_address=LOOPBACK,
            configure_logging=False,
        )
    else:
        connect_bounded(ray, address, timeout_s, configure_logging=False, log_to_driver=not quiet)


def kill_actor(actor: Any) -> None:
    """End ``actor`` now; nothing when this process is no longer connected (Ray's own exit
    hook ran first: the actors this process owned end with it, and a ``ray.kill`` then would
    start a new Ray instead)."""
    ray = import_ray()
    if ray.is_initialized():
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's live nodes (Ray's node table entries), the head node first."""
    ray = import_ray()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: ("node:__internal_head__" not in n["Resources"], n["NodeID"]))


def node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id for n in alive_nodes())


def plan_ray_slots(
    address: str | None = None, *, cpus_per_slot: int = 1, max_slots: int | None = None, timeout_s: float = CONNECT_TIMEOUT_S,
) -> tuple[DeviceSlot, ...]:
    """One slot per GPU of each node; on a node without GPU, one CPU slot per ``cpus_per_slot``
    of its CPUs (cores numbered within that node). Each slot carries its node's id.

    Connects (see :func:`connect`, bounded by ``timeout_s``) when this process is not connected yet.
    """
    connect(address, timeout_s=timeout_s)
    slots: list[DeviceSlot] = []
    for node in alive_nodes():
        res, node_id = node["Resources"], node["NodeID"]
        gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
        if gpus:
            for g in range(gpus):
                slots.append(DeviceSlot(index=len(slots), kind="GPU", gpu=str(g), node=node_id))
        elif cpus >= cpus_per_slot:
            for cores in split_evenly(range(cpus // cpus_per_slot * cpus_per_slot), cpus // cpus_per_slot):
                slots.append(DeviceSlot(index=len(slots), kind="CPU", cores=tuple(cores), node=node_id))
    if not slots:
        raise KerasMPError(RAY_NO_SLOTS.format(cpus=cpus_per_slot, nodes=describe_nodes()))
    return tuple(slots[:max_slots])


def describe_nodes() -> str:
    parts = []
    for n in alive_nodes():
        res = n["Resources"]
        parts.append(f"node {n['NodeID'][:8]} at {n['NodeManagerAddress']}: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")
    return "; ".join(parts) or "no live node"


def slot_resources(slot: DeviceSlot) -> dict[str, float]:
    """What one slot's actor asks Ray for."""
    if slot.kind == "GPU":
        return {"CPU": 1.0, "GPU": 1.0}
    return {"CPU": float(len(slot.cores))}


def check_feasible(slots: Sequence[DeviceSlot], what: str) -> None:
    """Refuse at once slots that no live node can hold: a gone node, or more CPUs/GPUs on a
    node than it has in total (a wait for them would never end)."""
    nodes = {n["NodeID"]: n for n in alive_nodes()}
    need: dict[str, dict[str, float]] = {}
    for slot in slots:
        if not slot.node:
            raise WorkerStartupError(f"{what}: {slot.describe()} has no Ray node; plan Ray slots with plan_ray_slots()")
        if slot.node not in nodes:
            raise WorkerStartupError(RAY_NODE_GONE.format(what=what, slot=slot.describe(), node=slot.node, nodes=describe_nodes()))
        total = need.setdefault(slot.node, {})
        for key, amount in slot_resources(slot).items():
            total[key] = total.get(key, 0.0) + amount
    for node_id, wanted in need.items():
        has = nodes[node_id]["Resources"]
        short = {k: v for k, v in wanted.items() if has.get(k, 0.0) < v}
        if short:
            asked = ", ".join(f"{v:g} {k}" for k, v in short.items())
            there = ", ".join(f"{has.get(k, 0.0):g} {k}" for k in short)
            raise WorkerStartupError(RAY_SLOT_INFEASIBLE.format(
                what=what, node=node_id[:8], asked=asked, there=there, nodes=describe_nodes(),
            ))


def reported_addresses() -> dict[str, str]:
    """Every network address Ray reports for the connected cluster, by what it is."""
    ray = import_ray()
    found = {"gcs": ray.get_runtime_context().gcs_address.rpartition(":")[0]}
    for n in ray.nodes():
        short = n["NodeID"][:8]
        found[f"node {short} NodeManagerAddress"] = n["NodeManagerAddress"]
        if n.get("NodeName"):
            found[f"node {short} NodeName"] = n["NodeName"]
    found["this worker"] = ray.util.get_node_ip_address()
    return found


def listening_addresses(pids: Sequence[int]) -> dict[str, str]:
    """The TCP addresses the processes ``pids`` listen on, by ``"name pid port"``."""
    import psutil

    found = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            name = proc.name()
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                ip = c.laddr.ip
                found[f"{name} {pid} port {c.laddr.port}"] = ip.removeprefix("::ffff:")  # IPv4 as IPv6
    return found


class LocalRayCluster:
    """A Ray cluster of ``nodes`` nodes on this machine, on loopback only, for tests.

    Each node gets ``cpus_per_node`` CPUs and, where this process may use enough cores, its
    own cores (its raylet, hence its workers, start with that CPU affinity), so slots on
    different nodes do not share cores. :meth:`shutdown` ends every process it started and
    says which did not end.
    """

    def __init__(
        self, nodes: int = 2, *, cpus_per_node: int = 1, object_store_mb: int = OBJECT_STORE_MB,
        cores: Sequence[int] | None = None,
    ) -> None:
        import psutil

        from pytest_kerasmp.slots.devices import usable_cores

        if bootstrap.importing_main:  # a script without a __main__ guard, imported by a worker
            raise RuntimeError(MAIN_NOT_GUARDED.format(path=bootstrap.importing_main))
        ray = import_ray()
        if ray.is_initialized():
            raise RuntimeError("this process is already connected to Ray; call ray.shutdown() first")
        from ray.cluster_utils import Cluster

        me = psutil.Process()
        before = {p.pid for p in me.children(recursive=True)}
        self.cluster: Any = Cluster(initialize_head=False)
        self.nodes: list[Any] = []
        # the cores each node (its raylet, so its workers) may run on: disjoint while there are enough
        self._core_parts = split_evenly(list(cores or usable_cores()), nodes)
        try:
            for i in range(nodes):
                self.add_node(cpus_per_node, object_store_mb, head=i == 0, index=i)
            self.cluster.wait_for_nodes()
            ray.init(address=self.cluster.address, configure_logging=False)
            output.install()
        except BaseException:
            self._processes = {p.pid for p in me.children(recursive=True)} - before
            self.shutdown()
            raise
        self._processes = {p.pid for p in me.children(recursive=True)} - before
        self.address: str = self.cluster.address
        owners.add_killer(self.kill_now)  # SIGTERM ends the nodes at once

    def kill_now(self) -> None:
        """SIGKILL every process of the cluster now (SIGTERM to its owner); no clean-up."""
        for pid in self.processes():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def add_node(self, cpus: int, object_store_mb: int = OBJECT_STORE_MB, *, head: bool = False, index: int | None = None) -> Any:
        """Start one more node (its processes are ended by :meth:`shutdown` or :meth:`remove_node`)."""
        index = len(self.nodes) if index is None else index
        args: dict[str, Any] = {
            "num_cpus": cpus, "node_ip_address": LOOPBACK, "object_store_memory": object_store_mb * 2**20,
        }
        if head:
            args["include_dashboard"] = False
        import psutil

        me = psutil.Process()
        before = {p.pid for p in me.children(recursive=True)}
        with _affinity(set(self._core_parts[index % len(self._core_parts)])), _worker_niceness_zero():
            node = self.cluster.add_node(**args)
        self.nodes.append(node)
        if hasattr(self, "_processes"):  # only what this node started, not other owners' children
            self._processes |= {p.pid for p in me.children(recursive=True)} - before
        return node

    def node_ids(self) -> list[str]:
        return [str(n.node_id) for n in self.nodes]

    def remove_node(self, node_id: str, *, graceful: bool = True) -> None:
        """Stop a node as ``ray stop`` does (graceful), or kill its processes at once."""
        node = next(n for n in self.nodes if str(n.node_id) == node_id)
        self.cluster.remove_node(node, allow_graceful=graceful)
        self.nodes.remove(node)

    def processes(self) -> list[int]:
        """Pids of this cluster's processes that still run (daemons and workers)."""
        import psutil

        alive = set()
        for pid in self._processes:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.add(pid)
                    alive |= {c.pid for c in proc.children(recursive=True)}
        return sorted(alive)

    def shutdown(self) -> None:
        """Disconnect and end every node; kill what is left after SHUTDOWN_WAIT_S and say so."""
        import psutil

        owners.remove_killer(self.kill_now)
        ray = import_ray()
        watched = self.processes() if hasattr(self, "_processes") else []
        ray.shutdown()
        self.cluster.shutdown()
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        left = watched
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [p for p in left if _running(p)]
        if left:
            names = []
            for pid in left:
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(pid)
                    names.append(f"{proc.name()} (pid {pid})")
                    proc.kill()
            raise KerasMPError(RAY_PROCESSES_LEFT.format(n=plural(len(left), "process"), wait=SHUTDOWN_WAIT_S, names=", ".join(names)))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.shutdown()


def _running(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def _worker_niceness_zero() -> Iterator[None]:
    """Start the block's Ray processes with ``RAY_worker_niceness=0`` (unless set): Ray runs its
    worker processes at niceness 15 by default, so an actor (a pool worker, a server, a Ray
    Serve replica) got a fraction of a core it shared with the test's own processes."""
    old = os.environ.get(WORKER_NICENESS)
    os.environ.setdefault(WORKER_NICENESS, "0")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(WORKER_NICENESS, None)


@contextlib.contextmanager
def _affinity(cores: set[int]) -> Iterator[None]:
    """Run the block with this thread's CPU affinity set to ``cores`` (processes it starts
    inherit it), then restore it."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)
