"""A local cluster for the session's Keras backend: one pinned, warm process per task, with
shared fate.

Synchronous multi-worker training runs one process per task, each told the whole cluster in
its environment, from the backend's adapter:

- TensorFlow: ``TF_CONFIG`` (``MultiWorkerMirroredStrategy`` reads it);
- JAX: ``jax.distributed``'s coordinator on task 0's port, bound to 127.0.0.1 only
  (``JAX_COORDINATOR_BIND_ADDRESS``), the process index, gloo for CPU collectives, and the
  same as ``keras.distribution.initialize()`` reads it;
- PyTorch: ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE`` for ``env://``.

:class:`KerasCluster` starts those processes as a pool of the one lifecycle
(``lifecycle.Child``, role ``cluster-task``): each pinned to its own slot before the framework
is imported, its environment set for a cluster on 127.0.0.1, the framework imported and no op
run. ``run(fn)`` runs ``fn`` in every task; if one task raises, dies or overruns the bound,
every task is stopped (the others would wait for it in their next collective), the call raises
one :class:`ClusterTaskError`, and the next call starts the cluster afresh on new ports.
:class:`TFCluster` is the same cluster with TensorFlow's environment whatever the session's
backend. In a task, :func:`init_distributed` joins the others (``keras.distribution.initialize()``
on JAX; ``torch.distributed.init_process_group`` with gloo on CPU, NCCL on GPU; nothing on
TensorFlow, whose strategy joins when it is created).
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future
from concurrent.futures import wait as wait_futures
from typing import Any

from pytest_kerasmp import frameworks
from pytest_kerasmp.errors import (
    CLUSTER_BUSY,
    CLUSTER_CLOSED,
    CLUSTER_DIED_IDLE,
    CLUSTER_NO_PORT,
    CLUSTER_NO_PRIVATE_NETWORK,
    CLUSTER_NOT_ENOUGH_SLOTS,
    CLUSTER_PORT_LOST,
    CLUSTER_PORT_TAKEN,
    CLUSTER_START_FAILED,
    CLUSTER_TASK_FAILED,
    CLUSTER_TIMED_OUT,
    NETWORK_SUMMARY,
    NETWORK_WHY_NO_NAMESPACE,
    ClusterClosedError,
    ClusterStartError,
    ClusterTaskError,
    KerasMPWarning,
    PoolBrokenError,
    WorkerCrashedError,
    WorkerStartupError,
)
from pytest_kerasmp.frameworks.tensorflow import set_collective_timeout
from pytest_kerasmp.runtime.cluster import ports
from pytest_kerasmp.runtime.pool.local import LocalBackend
from pytest_kerasmp.runtime.pool.taskqueue import PoolSpec
from pytest_kerasmp.runtime.pool.workerpool import WorkerPool
from pytest_kerasmp.runtime.process import childio, netns, owners
from pytest_kerasmp.runtime.process.lifecycle import Child, describe_exit
from pytest_kerasmp.slots import network, placement
from pytest_kerasmp.slots.devices import DeviceSlot

HOST = ports.HOST
_warned_exposed = False
#: Lines of each task's output attached to a ClusterTaskError.
OUTPUT_LINES = 20
#: After one task failed, how long the others may take to finish or fail too before they
#: count as stuck (their stacks are taken) and are stopped.
FAILURE_GRACE_S = 0.5


class KerasCluster(owners.Owned):
    """A cluster of ``workers`` tasks (and a chief if asked) on this machine, for the session's
    Keras backend (see the module docstring).

    Each task is a warm process pinned to its own slot, with its framework's cluster
    environment naming the cluster on 127.0.0.1 (free ports, claimed so that concurrent clusters and xdist workers never pick
    the same one). A context manager; usable without pytest.

    Args:
        workers: Number of ``worker`` tasks.
        chief: Add a ``chief`` task (task order: chief first, then the workers).
        slots: The slots of the tasks, in task order (the first ones when more are given);
            default: the slots this process owns (the session's, or this xdist worker's part),
            else ``plan_slots("auto")``. A slot given twice puts two tasks on it, on purpose.
        ports: One port per task; default: free ports, picked anew at every (re)start.
        run_timeout_s: Default bound on one :meth:`run` (a positive number of seconds).
        start_timeout_s: Bound on starting every task (the framework's import).
        collective_timeout_s: Given to every ``MultiWorkerMirroredStrategy`` a task creates
            without a ``communication_options`` timeout, so that a collective waiting for a
            peer fails in TensorFlow too. Off (``None``) by default: TensorFlow starts a
            thread per collective that lives for the timeout (2,100 threads per task after
            1,000 steps of 1 ms were seen here), so use it to debug a hang, with a short timeout.
        start_method: ``"spawn"`` (default) or ``"forkserver"``.
        private_network: Where the framework's servers listen on every interface whatever
            they are told (TensorFlow's gRPC server), the tasks run in a network namespace
            of their own with only loopback (``netns``): ``"auto"`` (default: the session's
            ``--kerasmp-private-network``, else auto) uses one where the kernel allows it
            and starts exposed otherwise (the placement table and the session's last lines
            say so), ``"require"`` raises :class:`ClusterStartError` instead, ``"off"``
            never uses one.
        name: Name used in process names and messages.
        start: Start the tasks now (default) or at the first :meth:`run`.
    """

    def __init__(
        self,
        workers: int = 2,
        *,
        chief: bool = False,
        slots: Sequence[DeviceSlot] | None = None,
        ports: Sequence[int] | None = None,
        run_timeout_s: float = 600.0,
        start_timeout_s: float = 120.0,
        collective_timeout_s: float | None = None,
        start_method: str = "spawn",
        private_network: str | None = None,
        name: str = "cluster",
        start: bool = True,
    ) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers={workers!r} must be a positive number of worker tasks")
        self.name = name
        self.tasks: tuple[tuple[str, int], ...] = (
            (("chief", 0),) if chief else ()) + tuple(("worker", i) for i in range(workers))
        self.slots = self._slots_for(slots)
        if not (isinstance(run_timeout_s, (int, float)) and run_timeout_s > 0):
            raise ValueError(f"run_timeout_s={run_timeout_s!r} must be a positive number of seconds: every run is bounded")
        if ports is not None and len(ports) != len(self.tasks):
            raise ValueError(f"ports={list(ports)!r} must give one port per task ({len(self.tasks)})")
        self._fixed_ports = list(ports) if ports is not None else None
        self.ports: list[int] = []
        self.run_timeout_s, self.start_timeout_s = run_timeout_s, start_timeout_s
        self.collective_timeout_s = collective_timeout_s
        self.start_method = start_method
        self.private_network = network.mode() if private_network is None else private_network
        if self.private_network not in network.MODES:
            raise ValueError(f"private_network={private_network!r} is not one of {network.MODES}")
        #: The tasks' private network (None: they share this machine's network).
        self.network: netns.PrivateNetwork | None = None
        #: Why the tasks' listening sockets may be reachable (placement table), "" if not.
        self.network_note = ""
        #: How many times the tasks were started (a restart after a failure adds one).
        self.starts = 0
        self._pool: TaskPool | None = None
        self._starting: list[Child] = []  # the children of the start in progress
        self._closed = False
        self._running: str | None = None
        self._lock = threading.Lock()
        owners.register_owner(self)
        if start:
            self.start()

    # ----------------------------------------------------------------------------- public

    @property
    def task_names(self) -> list[str]:
        return [f"{kind}:{index}" for kind, index in self.tasks]

    @property
    def cluster_spec(self) -> dict[str, list[str]]:
        """The cluster as ``TF_CONFIG`` names it (empty until started)."""
        spec: dict[str, list[str]] = {}
        for (kind, _), port in zip(self.tasks, self.ports, strict=False):
            spec.setdefault(kind, []).append(f"{HOST}:{port}")
        return spec

    def closed(self) -> bool:
        return self._closed

    def pids(self) -> list[int | None]:
        """Each task's process id (None while the cluster is down)."""
        return self._pool.pids() if self._pool is not None else [None] * len(self.tasks)

    def start(self) -> None:
        """Start every task (a no-op while they run); raises :class:`ClusterStartError`."""
        if self._closed:
            raise ClusterClosedError(CLUSTER_CLOSED.format(cluster=self.name, what="start()"))
        if self._pool is not None:
            return
        self._starting = []
        try:
            self._open_network()
            self._claim_ports()
            self._pool = TaskPool(self)
        except ClusterStartError:  # a port taken or none free: said as it is
            self._release_ports()
            self._close_network()
            raise
        except WorkerStartupError as exc:
            self._release_ports()
            self._close_network()
            raise self._start_error(exc) from (exc.__cause__ or exc)
        except BaseException:
            self._release_ports()
            self._close_network()
            raise
        finally:
            self._starting = []
        self.starts += 1
        self._say_exposed()
        if self.closed():  # close() from another thread while this start ran
            self._teardown("closed while starting")
            self._close_network()
            raise ClusterClosedError(CLUSTER_CLOSED.format(cluster=self.name, what="start()"))

    def run(self, fn: Callable[..., Any], /, *args: Any, timeout: float | None = None, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` in every task; their results, in task order.

        ``fn`` must be importable (a module-level function of a module on ``sys.path``).
        Bounded by ``timeout`` (default ``run_timeout_s``). If any task raises, dies or is
        still running at the bound, every task is stopped and :class:`ClusterTaskError`
        names the task (slot, pid, exit code or signal, traceback) with each task's recent
        output; the next call starts the cluster again.
        """
        __tracebackhide__ = True
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
        if self._closed:
            raise ClusterClosedError(CLUSTER_CLOSED.format(cluster=self.name, what=f"run({name})"))
        if not self._lock.acquire(blocking=False):
            raise ClusterClosedError(CLUSTER_BUSY.format(cluster=self.name, running=self._running))
        try:
            self._running = name
            self.start()
            assert self._pool is not None
            return self._run(self._pool, fn, args, kwargs, name, self.run_timeout_s if timeout is None else timeout)
        finally:
            self._running = None
            self._lock.release()

    def close(self, timeout: float = 30.0) -> None:
        """Stop every task (waiting up to ``timeout`` for a run to end) and free the ports."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.close(timeout, cancel_pending=True)
            self._pool = None
        self._release_ports()
        self._close_network()
        owners.unregister_owner(self)

    def terminate(self, why: str = "terminated") -> None:
        """End every task now (Ctrl-C, interpreter exit)."""
        self._closed = True
        self._teardown(why)
        self._close_network()
        owners.unregister_owner(self)

    def close_after_with(self, failed: bool) -> None:
        self.close()

    # ---------------------------------------------------------------------------- private

    def _run(self, pool: TaskPool, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
             name: str, timeout: float) -> list[Any]:
        __tracebackhide__ = True
        self._check_alive(pool, name)
        futures: list[Future[Any]] = []
        try:
            for i in range(len(self.tasks)):
                futures.append(pool.submit_to(i, fn, args, kwargs))
        except PoolBrokenError:  # a task died just now, between the check and its submit
            self._check_alive(pool, name)
            raise
        except BaseException:
            if futures:  # never leave a task to run the call alone
                self._teardown(f"run({name}) could not be sent to every task")
            raise
        ended: dict[int, float] = {}  # when each task's call ended: the first failure is the cause

        def note_end(i: int) -> Callable[[Future[Any]], object]:
            return lambda _: ended.setdefault(i, time.monotonic())

        for i, f in enumerate(futures):
            f.add_done_callback(note_end(i))
        try:
            _, running = wait_futures(futures, timeout, return_when=FIRST_EXCEPTION)
            if running and len(running) < len(futures):  # one failed: the others' fate, briefly
                _, running = wait_futures(running, FAILURE_GRACE_S)
        except BaseException:  # Ctrl-C: every task ends now
            self._teardown(f"interrupted during run({name})")
            raise
        failed = [i for i, f in enumerate(futures) if f.done() and f.exception()]
        if not failed and not running:
            return [f.result() for f in futures]
        # The cause: a task that died (its peers' errors follow from it), else the first to fail.
        failed.sort(key=lambda i: (not isinstance(futures[i].exception(), WorkerCrashedError), ended.get(i, 0.0)))
        error = self._failure(pool, futures, failed, name, timeout)
        self._teardown(f"a task failed during run({name})")
        raise error

    def _check_alive(self, pool: TaskPool, fn: str) -> None:
        """A task that died between runs (the OOM killer, say) ends the cluster: say so."""
        workers = pool.workers()
        dead = next((i for i, w in enumerate(workers) if w.state == "dead" or w.child.exited()), None)
        if dead is None:
            return
        child = workers[dead].child
        how, hint = child.describe_exit()
        error = ClusterTaskError(CLUSTER_DIED_IDLE.format(
            task=self.task_names[dead], slot=child.slot.describe(), pid=child.pid, cluster=self.name, how=how, fn=fn, hint=hint,
        ))
        self._describe(error, dead, child, [w.child for w in workers], {})
        error.exitcode = child.exitcode
        self._teardown(f"task {self.task_names[dead]} died between runs")
        raise error

    def _failure(self, pool: TaskPool, futures: list[Future[Any]], failed: list[int], fn: str, timeout: float) -> ClusterTaskError:
        """The one error of a failed run: the first task that failed, or those still running."""
        stuck = [i for i, f in enumerate(futures) if not f.done()]
        workers = pool.workers()
        stacks = childio.dump_stacks_of([workers[i].child for i in stuck]) if stuck else {}
        if failed:
            i = failed[0]
            child, cause = workers[i].child, futures[i].exception()
            code = child.exitcode if isinstance(cause, WorkerCrashedError) else None
            if code is not None:
                how, hint = describe_exit(code)
                what, advice = f"died with {how}", hint
            else:
                lines = str(cause).strip().splitlines()
                what = f"raised {type(cause).__name__}" + (f": {lines[-1].strip()}" if lines else "")
                advice = "its traceback is attached below"
                if "Could not start gRPC server" in str(cause) and self.network is None:  # its port was taken meanwhile
                    port = self.ports[i]
                    advice = CLUSTER_PORT_LOST.format(port=port, holder=ports.holder(port) or "")
            error = ClusterTaskError(CLUSTER_TASK_FAILED.format(
                task=self.task_names[i], slot=child.slot.describe(), pid=child.pid, cluster=self.name,
                what=what, fn=fn, advice=advice,
            ))
            error.__cause__ = cause
            error.exitcode = code
        else:
            i = stuck[0]
            child = workers[i].child
            names = ", ".join(f"{self.task_names[j]} (pid {workers[j].child.pid})" for j in stuck)
            error = ClusterTaskError(CLUSTER_TIMED_OUT.format(fn=fn, cluster=self.name, timeout=timeout, stuck=names))
        by_pid = {workers[j].child.pid: text for j in stuck if (text := stacks.get(workers[j].child.pid))}
        return self._describe(error, i, child, [w.child for w in workers], by_pid)

    def _describe(self, error: ClusterTaskError, i: int, child: Child, children: list[Child],
                  stacks: dict[int, str]) -> ClusterTaskError:
        """Fill in ``error``: the task at fault, every task's recent output, the stacks taken."""
        error.task, error.slot, error.pid = self.task_names[i], child.slot.describe(), child.pid
        error.outputs = {self.task_names[j]: c.recent_output(OUTPUT_LINES, chatter=False) for j, c in enumerate(children)}
        error.stacks = {self.task_names[j]: stacks[c.pid] for j, c in enumerate(children) if c.pid in stacks}
        for task, text in error.stacks.items():
            error.add_note(f"Python stacks of task {task}, still running when the cluster was stopped:\n{text.rstrip()}")
        for task, text in error.outputs.items():
            if text.strip():
                error.add_note(f"recent output of task {task}:\n{text.rstrip()}")
        return error

    def _start_error(self, exc: WorkerStartupError) -> ClusterStartError:
        """The start failed in one task (its message names it): the error, filled in."""
        error = ClusterStartError(CLUSTER_START_FAILED.format(cluster=self.name, reason=exc))
        named = [j for j, task in enumerate(self.task_names) if f"task {task} (" in str(exc)]
        if named and named[0] < len(self._starting):
            child = self._starting[named[0]]
            self._describe(error, named[0], child, self._starting, {})
            error.exitcode = child.exitcode
        return error

    def _teardown(self, why: str) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate(why)
        self._release_ports()

    def _slots_for(self, slots: Sequence[DeviceSlot] | None) -> tuple[DeviceSlot, ...]:
        if slots is None:
            from pytest_kerasmp.slots.devices import current_scope, plan_slots

            scope = current_scope()  # a pytest process: the slots it owns
            slots = scope.slots if scope is not None else plan_slots("auto")
        slots = tuple(slots)
        if not all(isinstance(s, DeviceSlot) for s in slots):
            raise TypeError(f"slots must be DeviceSlot objects, got {slots!r}")
        if len(slots) < len(self.tasks):
            raise ValueError(CLUSTER_NOT_ENOUGH_SLOTS.format(
                cluster=self.name, tasks=len(self.tasks), names=", ".join(self.task_names), slots=len(slots),
                described="; ".join(s.describe() for s in slots) or "none",
            ))
        return slots[: len(self.tasks)]

    def _open_network(self) -> None:
        """A private network for tasks whose servers listen on every interface (kept over
        restarts; made again if its holder died); refused: an error under ``require``, else
        the tasks start on this machine's network and the note says why."""
        if not self.framework().cluster_listens_everywhere:
            return
        if self.private_network == "off":
            self.network_note = NETWORK_WHY_NO_NAMESPACE.format(reason="private_network='off'")
            return
        if self.network is not None and self.network.alive():
            return
        self._close_network()
        refused = netns.refused()
        if refused is None:
            try:
                self.network = netns.PrivateNetwork()
                self.network_note = ""
                return
            except netns.PrivateNetworkRefused as exc:
                refused = str(exc)
        if self.private_network == "require":
            raise ClusterStartError(CLUSTER_START_FAILED.format(
                cluster=self.name, reason=CLUSTER_NO_PRIVATE_NETWORK.format(reason=refused)))
        self.network_note = NETWORK_WHY_NO_NAMESPACE.format(reason=refused)

    def _say_exposed(self) -> None:
        """Tasks that listen where the network reaches them: the placement table says so in a
        pytest session with slots; elsewhere a warning does, once per process."""
        global _warned_exposed
        if not self.network_note:
            return
        # Recorded now: their server listens from the first collective on, and a failed run
        # ends them without the audit of a graceful stop.
        for pid, port in zip(self.pids(), self.ports, strict=False):
            if pid:
                where = [f"[::]:{port}"]
                placement.record_network(pid, {"listening": where, "exposed": where, "private": False}, self.network_note)
        if _warned_exposed or placement.session_dir() is not None:
            return
        _warned_exposed = True
        ports_ = ", ".join(f"task {t} port {p}" for t, p in zip(self.task_names, self.ports, strict=False))
        warnings.warn(KerasMPWarning(NETWORK_SUMMARY.format(
            listeners=f"cluster {self.name!r} {ports_} on every interface [{self.network_note}]")), stacklevel=3)

    def _close_network(self) -> None:
        network, self.network = self.network, None
        if network is not None:
            network.close()

    def _claim_ports(self) -> None:
        """Free ports claimed one by one into ``self.ports`` (so a failure releases those), or
        the given ones, each checked free."""
        self.ports = []
        if self._fixed_ports is not None:
            for task, port in zip(self.task_names, self._fixed_ports, strict=True):
                holder = ports.holder(port)
                if holder is not None:
                    raise ClusterStartError(CLUSTER_PORT_TAKEN.format(port=port, task=task, cluster=self.name, holder=holder))
            self.ports = list(self._fixed_ports)
            return
        for _ in self.tasks:
            claimed = ports.claim_free_port()
            if claimed is None:
                low, high = ports.port_range()
                raise ClusterStartError(CLUSTER_NO_PORT.format(cluster=self.name, low=low, high=high - 1, tries=ports.TRIES))
            self.ports.append(claimed)

    def _release_ports(self) -> None:
        if self._fixed_ports is None:
            for port in self.ports:
                ports.release(port)
        self.ports = []

    def framework(self) -> frameworks.Framework:
        """The framework whose cluster environment the tasks get: the session's."""
        return frameworks.active()

    def task_environ(self, index: int) -> dict[str, str]:
        """Task ``index``'s environment: its framework's cluster environment, and its name."""
        kind, number = self.tasks[index]
        return {**self.framework().cluster_environ(self.cluster_spec, kind, number), TASK_ENV: f"{kind}:{number}"}



class TFCluster(KerasCluster):
    """A :class:`KerasCluster` whose tasks get TensorFlow's cluster environment (``TF_CONFIG``,
    for ``tf.distribute.MultiWorkerMirroredStrategy``) whatever the session's Keras backend;
    the same arguments, methods and errors."""

    def framework(self) -> frameworks.Framework:
        return frameworks.get("tensorflow")

    def tf_config(self, index: int) -> str:
        """Task ``index``'s ``TF_CONFIG`` (the TensorFlow adapter's cluster environment)."""
        kind, number = self.tasks[index]
        return frameworks.get("tensorflow").cluster_environ(self.cluster_spec, kind, number)["TF_CONFIG"]


#: Set in every cluster task: its ``type:index``.
TASK_ENV = "PYTEST_KERASMP_TASK"


def task_info() -> tuple[str, int] | None:
    """In a cluster task: its ``(type, index)``; elsewhere ``None``."""
    if os.environ.get("PYTEST_KERASMP_ROLE") != "cluster-task":
        return None
    named = os.environ.get(TASK_ENV)
    if named:
        kind, _, number = named.partition(":")
        return kind, int(number)
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    task = json.loads(raw)["task"]
    return task["type"], int(task["index"])


_joined = False


def init_distributed() -> None:
    """In a task of a :class:`KerasCluster`: join the other tasks (once per process)."""
    global _joined
    if not _joined:
        frameworks.active().init_distributed()
        _joined = True


# -------------------------------------------------------------------- the tasks, as a pool

class TaskPool(WorkerPool):
    """The cluster's processes: a pool whose worker i is task i (``TF_CONFIG`` set before
    TensorFlow is imported), never replaced (the cluster restarts all of them together)."""

    replace_workers = False

    def __init__(self, cluster: KerasCluster) -> None:
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

    def __init__(self, cluster: KerasCluster) -> None:
        super().__init__(cluster.start_method)
        self.cluster = cluster

    def start_child(self, pool: PoolSpec, index: int, slot: DeviceSlot) -> Child:
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


__all__ = ["KerasCluster", "TFCluster", "init_distributed", "task_info"]
