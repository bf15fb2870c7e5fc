"""Errors and warnings raised by pytest-kerasmp.

Every message names what happened, where (process, slot, pid), and what to do. Message
templates that tests match live here as constants. Import-light: children import this module
before they pin, so it never imports pytest (``KerasMPWarning`` is a ``UserWarning``; the
plugin shows it like any other warning).
"""

from __future__ import annotations

import pickle
from concurrent.futures import CancelledError


class KerasMPError(Exception):
    """Base class of every error raised by pytest-kerasmp."""


class DeviceAlreadyInitializedError(KerasMPError, RuntimeError):
    """The framework under Keras initialised its devices before the process could be pinned."""


class KerasMPWarning(UserWarning):
    """A non-fatal problem with the plan or the use of pytest-kerasmp."""


FRAMEWORK_ALREADY_INITIALIZED = (
    "{framework} had already initialised its devices in process {pid} before kerasmp could pin "
    "it to {slot}, so it would run on the wrong device; something ran a {framework} op too early "
    "(a plugin or module that builds a model or runs an op when imported): move that work into "
    "a fixture or a test, or drop --kerasmp-gpus to run unpinned"
)

class WorkerStartupError(KerasMPError):
    """A worker process could not start: pinning, the TensorFlow import or the initializer failed."""


class WorkerCrashedError(KerasMPError):
    """A worker process died while running a task (the message says whether it was replaced)."""


class TaskTimeoutError(KerasMPError, TimeoutError):
    """A task (or a ``map``/``broadcast``) ran past its timeout; a stuck worker was killed,
    its Python stacks attached as ``stacks``."""

    stacks: str | None = None


class TaskCancelledError(KerasMPError, CancelledError):
    """A task whose caller stopped waiting: an exception other than an interrupt (pytest-timeout's
    failure, a signal handler's exception) ended the wait in ``map``, ``broadcast`` or
    ``Future.result``. A queued task is not run; a running one has its worker's stacks taken
    (``stacks``), its worker killed and replaced."""

    stacks: str | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM reached a pytest process: every process the plugin started has been killed,
    and the session ends as after Ctrl-C (a ``KeyboardInterrupt``, so the same clean-up runs)."""


class PoolClosedError(KerasMPError, RuntimeError):
    """The pool was closed (or interrupted) before the task could finish."""


class PoolBrokenError(KerasMPError, RuntimeError):
    """The pool can run nothing more: its dispatcher failed, or no worker can start on any slot."""


class ServerClosedError(KerasMPError, ConnectionError):
    """The inference server was closed by its owner; the request was not accepted."""


class ServerDiedError(KerasMPError, ConnectionError):
    """The inference server process is gone; its pending and later requests fail with this."""


class ServerBusyError(KerasMPError):
    """The inference server's queue stayed full for the whole wait."""


class ClusterTaskError(KerasMPError):
    """A task of a :class:`~pytest_kerasmp.TFCluster` raised, died or timed out: the call fails
    in every task (shared fate) and the cluster restarts on its next use.

    Attributes: ``task`` (``"worker:1"``), ``slot`` (its description), ``pid``, ``exitcode``
    (negative: the signal; ``None`` if the process still ran), ``outputs`` (each task's recent
    output, by task) and ``stacks`` (the Python stacks of tasks that were still running).
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.task: str | None = None
        self.slot: str | None = None
        self.pid: int | None = None
        self.exitcode: int | None = None
        self.outputs: dict[str, str] = {}
        self.stacks: dict[str, str] = {}


class ClusterStartError(ClusterTaskError, WorkerStartupError):
    """A task of a :class:`~pytest_kerasmp.TFCluster` could not start (or its port is taken)."""


class ClusterClosedError(KerasMPError, RuntimeError):
    """The :class:`~pytest_kerasmp.TFCluster` was closed, or is running a call in another thread."""


class LeaseTimeoutError(KerasMPError, TimeoutError):
    """A test waited longer than --kerasmp-lease-timeout for the slots it needs."""


LEASE_TIMED_OUT = (
    "{owner} waited {timeout:g} s for {wanted} for {test} and gave up (--kerasmp-lease-timeout): "
    "held: {held}; raise --kerasmp-lease-timeout if those tests are just long, or look for a "
    "test that hangs while it holds its slots"
)


class RayConnectError(KerasMPError, ConnectionError):
    """This process could not connect to a Ray cluster within its bound; ``address`` is the
    address asked for, ``what`` what was tried and how it failed."""

    def __init__(self, address: str, what: str, timeout_s: float, option: str = "timeout_s") -> None:
        super().__init__(RAY_CONNECT_FAILED.format(address=address, what=what, option=option, timeout=timeout_s))
        self.address, self.what, self.timeout_s = address, what, timeout_s

    def worded_for(self, option: str) -> str:
        """The same message, naming ``option`` as the bound to raise."""
        return RAY_CONNECT_FAILED.format(address=self.address, what=self.what, option=option, timeout=self.timeout_s)


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a worker, attached as ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + self.text


def pack_exception(exc: BaseException) -> bytes:
    """``exc`` pickled for the other process, or a RuntimeError naming it if it will not pickle."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(exc).__qualname__}: {exc}"))


def unpack_exception(data: bytes, text: str) -> BaseException:
    """The exception from :func:`pack_exception`, with the remote traceback ``text`` as cause."""
    try:
        error: BaseException = pickle.loads(data)
    except Exception:
        error = RuntimeError(text.strip().splitlines()[-1])
    error.__cause__ = RemoteTraceback(text)
    return error


def with_stacks(error: KerasMPError, stacks: str | None) -> KerasMPError:
    """``error`` with the Python stacks of a stuck process (faulthandler's dump) attached:
    as ``error.stacks`` and, so that they print with the traceback, as a note."""
    if stacks:
        error.stacks = stacks  # type: ignore[attr-defined]
        error.add_note("Python stacks of the stuck process just before it was killed:\n" + stacks.rstrip())
    return error


FORK_REFUSED = (
    "start_method='fork' is not supported: a worker forked after its parent ran TensorFlow or "
    "JAX (model.predict, fit, building a model) deadlocks in its first op, and one forked after "
    "PyTorch initialised CUDA cannot use the GPU; use 'spawn' (default) or 'forkserver' (forks "
    "from a server that imported but never ran the framework under Keras)"
)
STARTUP_FAILED = "{who} failed to start: {reason}; {advice}"
#: What a startup error advises, by what is known of the failure.
STARTUP_ADVICE_TRACEBACK = "the child's traceback is attached above"
STARTUP_ADVICE_NONE = (
    "it left no traceback (its last lines of output are attached above, if any); run its "
    "initializer or model load in one process to see why"
)
STARTUP_TIMED_OUT = (
    "{who} was not ready after {timeout:g} s (TensorFlow import, initializer or model load; "
    "its Python stacks are attached below); the machine may be overloaded: start fewer "
    "processes or raise start_timeout_s"
)
MAIN_NOT_GUARDED = (
    "the script {path} starts pytest-kerasmp processes when it is imported, and every worker "
    "imports it again to find its task functions: put that code under "
    "`if __name__ == \"__main__\":`"
)
MAIN_NOT_ON_NODE = (
    "{error}: the task's function was defined in the script {path} (its __main__), which is not "
    "at that path on Ray node {node}, so the actor could not import it; put the script at the "
    "same path on every node (shared storage), or move task functions into a module installed there"
)
WORKER_CRASHED = (
    "worker {index} ({slot}, pid {pid}) of pool {pool!r} died with {how} while running task "
    "{task} ({fn}); {fate}; {hint}"
)
WORKER_DIED_BEFORE_START = (
    "worker {index} ({slot}, pid {pid}) of pool {pool!r} died with {how} before it started task "
    "{task} ({fn}), the second worker to do so for this task, so the task was not run; {fate}; "
    "{hint}"
)
WORKER_GONE = (
    "worker {index} ({slot}, pid {pid}) of pool {pool!r} died with {how} before task {task} "
    "({fn}), queued for it alone, could start; it was not replaced: its owner restarts all "
    "its processes together"
)
NONE_REPLACED = "every worker died and the pool does not replace them (its owner restarts them together)"
TASK_TIMED_OUT = (
    "task {task} ({fn}) ran past its {timeout:g} s timeout on worker {index} ({slot}, pid {pid}); "
    "the worker was killed ({fate}); its Python stacks are attached below; raise the timeout "
    "or make the task smaller"
)
TASK_CANCELLED_QUEUED = (
    "task {task} ({fn}) of pool {pool!r} was cancelled before it started: {why}; it was not run"
)
TASK_CANCELLED_RUNNING = (
    "task {task} ({fn}) was cancelled while it ran on worker {index} ({slot}, pid {pid}) of pool "
    "{pool!r}: {why}; the worker was killed ({fate}) and its Python stacks are attached below"
)
#: Why a task was cancelled: its caller's wait ended with an exception that is not an interrupt.
CALLER_INTERRUPTED = "its caller's wait in {where} ended with {error}"
TERMINATED = (
    "SIGTERM to {who} (pid {pid}): every process the plugin started was killed and the session "
    "ends as after Ctrl-C"
)
NOT_STARTED_TERMINATING = "{name} was not started: this process is ending ({why})"
POOL_CLOSED = "pool {pool!r} is closed; task {fn} was not run; submit before close()"
POOL_CLOSED_QUEUED = (
    "pool {pool!r} was closed ({why}) before task {task} ({fn}) started; it was not run"
)
POOL_CLOSED_RUNNING = (
    "pool {pool!r} was closed ({why}) while task {task} ({fn}) ran on worker {index} ({slot}, "
    "pid {pid}); the worker was killed and the task's result is lost; give close() a longer "
    "timeout to let running tasks finish"
)
POOL_BROKEN = "pool {pool!r} can run nothing more: {cause}; close it and start a new pool"
SLOT_DEAD = (
    "no worker of pool {pool!r} can run on {slot}: its worker failed to start {attempts} times "
    "in a row (last: {reason})"
)
SLOT_NODE_GONE = (
    "no worker of pool {pool!r} can run on {slot}: its Ray node {node} is gone from the cluster, "
    "so the slot was given up without trying to start a worker there; plan the slots again "
    "with plan_ray_slots()"
)
MAP_TIMED_OUT = (
    "{what} of {fn} on pool {pool!r} did not finish within {timeout:g} s ({done} of {total} "
    "done); the tasks not yet started were cancelled; raise the timeout, or use "
    "submit_with_timeout to bound each task"
)
TASK_NOT_IMPORTABLE = (
    "{fn} cannot run in a worker process: workers import task functions by module name, and "
    "module {module!r} {why}; put task functions in a module importable from sys.path (a "
    "tasks.py next to your tests, with rootdir or pythonpath set so workers find it)"
)
ARENA_FAILED = (
    "task {task} ({fn}) was not run: its arrays could not be copied into the worker's shared "
    "memory ({error}); free memory or send smaller arrays"
)
INTO_MISMATCH = (
    "{where} returned an array of shape {shape} and dtype {dtype}, but its destination in "
    "into= has shape {want_shape} and dtype {want_dtype}; make the function return arrays of "
    "its destination's shape (and a dtype that casts to it)"
)
INTO_BAD = (
    "map(into=...) needs one writable numpy array per task ({tasks} tasks), got {got}; pass "
    "a list of arrays (views of one shared_empty array are written by the workers directly)"
)
SERVER_DIED = (
    "inference server {name!r} (pid {pid}, {slot}) is gone{how}; request {what} was not "
    "answered; start a new server, and check its output for the reason (SIGKILL is usually "
    "the OOM killer)"
)
SERVER_CLOSED = (
    "inference server {name!r} (pid {pid}, {slot}) was closed by its owner; request {what} got "
    "no answer (sent after close() began, or still running when the server was terminated or "
    "its close timed out); send requests before closing the server and give close() time to "
    "answer them"
)
SERVER_CLOSE_TIMED_OUT = (
    "inference server {name!r} (pid {pid}, {slot}) had not answered its accepted requests "
    "{timeout:g} s into close() and was killed; its Python stacks:\n{stacks}"
)
CLIENT_CLOSED = (
    "request {what} to inference server {name!r} (pid {pid}, {slot}) got no answer: it was "
    "submitted while its client was being closed in this process{how}; submit before "
    "client.close(), or use another client"
)
SEND_INTERRUPTED = (
    "request {what} to inference server {name!r} (pid {pid}, {slot}) got no answer: another "
    "request's send on the same connection was interrupted, which leaves the connection "
    "unusable, so it was dropped with every request in flight on it{how}; submit it again"
)
SERVER_BUSY = (
    "inference server {name!r} had its queue full ({queue} requests waiting) for {waited:g} s, "
    "so request {what} was refused; raise max_queue, add servers, or let callers wait "
    "longer (busy_timeout_s)"
)
SERVER_NO_ANSWER = (
    "inference server {name!r} (pid {pid}, {slot}) did not answer request {what} within "
    "{timeout:g} s (its batch may be stuck or the model slow); raise request_timeout_s or check "
    "server.stats()"
)
BAD_REQUEST = (
    "{what} has {problem} for the model's input {index} ({name!r}), which takes one sample of "
    "shape {shape} or a batch of shape {batch}, dtype {dtype}; reshape or cast the request to fit"
)
CLUSTER_TASK_FAILED = (
    "task {task} ({slot}, pid {pid}) of cluster {cluster!r} {what} during run({fn}); every "
    "task of the cluster was stopped with it (shared fate: the others would wait for it in "
    "their next collective) and the cluster restarts on its next use; {advice}"
)
CLUSTER_TIMED_OUT = (
    "run({fn}) on cluster {cluster!r} did not finish within {timeout:g} s: {stuck} still "
    "ran (a task waiting in a collective for a peer that never comes, or a slow step); every "
    "task was stopped, their Python stacks are attached below, and the cluster restarts on its "
    "next use; raise timeout (or run_timeout_s) if the work is just slow"
)
CLUSTER_START_FAILED = (
    "cluster {cluster!r} could not start: {reason}; no task of it is left running"
)
CLUSTER_PORT_TAKEN = (
    "port {port} on 127.0.0.1, asked for task {task} of cluster {cluster!r}, is already in use"
    "{holder}; free it, or leave ports=None so that the cluster picks free ports"
)
CLUSTER_PORT_LOST = (
    "its port {port} on 127.0.0.1 was taken by another process{holder} before TensorFlow could "
    "listen on it; the restart picks new ports (given ports=[...], free that one)"
)
CLUSTER_NOT_ENOUGH_SLOTS = (
    "cluster {cluster!r} needs one slot per task ({tasks} tasks: {names}) and got {slots} "
    "({described}); give slots=[...] with one per task (a slot given twice puts two tasks on "
    "it), or under pytest pass --kerasmp-gpus={tasks} or more (under -n each xdist worker "
    "owns only its part of the slots)"
)
CLUSTER_SLOTS_PER_XDIST_WORKER = (
    "cluster {cluster!r} needs one slot per task ({tasks} tasks: {names}) but xdist worker "
    "{worker} owns {owned} ({described}): the session's {total} are split among {workers} xdist "
    "workers; pass --kerasmp-gpus={need} or more ({tasks} per worker for {workers} workers), or "
    "run with fewer workers (-n)"
)
CLUSTER_SLOTS_LEASED = (
    "cluster {cluster!r} needs one slot per task ({tasks} tasks: {names}) but the test leased "
    "{leased} ({described}); mark the test @pytest.mark.kerasmp_slots({tasks}) to lease {tasks}"
)
CLUSTER_DIED_IDLE = (
    "task {task} ({slot}, pid {pid}) of cluster {cluster!r} died with {how} between runs, so "
    "run({fn}) was not started; every task of the cluster was stopped with it and the cluster "
    "restarts on its next use; {hint}"
)
CLUSTER_NO_PORT = (
    "no free port for cluster {cluster!r} in {low}-{high} on 127.0.0.1 after {tries} tries; "
    "free some ports there, or give ports=[...]"
)
CLUSTER_NO_PRIVATE_NETWORK = (
    "no private network could be made for its tasks ({reason}), and "
    "--kerasmp-private-network=require is set: their servers would listen on every "
    "interface; allow this user network (and user) namespaces (a container with "
    "CAP_SYS_ADMIN; sysctl kernel.unprivileged_userns_clone=1 on Debian, "
    "kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu 24.04), or set it to auto to "
    "start exposed with a warning"
)

# ------------------------------------------------------------------------- network audit
NETWORK_EXPOSED = (
    "it listens on {listeners}, reachable from the network ({why}), and "
    "--kerasmp-private-network=require is set"
)
NETWORK_REQUIRE_ADVICE = (
    "bind what it serves to 127.0.0.1, or set --kerasmp-private-network=auto to allow it with a warning"
)
NETWORK_WHY_CODE = "bound to a non-loopback address by the code it runs"
NETWORK_WHY_NO_NAMESPACE = "no private network: {reason}"
NETWORK_SUMMARY = (
    "reachable from the network: {listeners}; what listens there runs whatever reaches it "
    "(docs/guide/clusters.md); --kerasmp-private-network=require makes this an error"
)
NETWORK_REQUIRE_FAILED = (
    "--kerasmp-private-network=require is set and {count} reachable from the network during "
    "the session: {listeners}; bind them to 127.0.0.1 or run clusters where the kernel allows "
    "user namespaces"
)
CLUSTER_CLOSED = "cluster {cluster!r} is closed; {what} was refused; make a new TFCluster"
CLUSTER_BUSY = (
    "cluster {cluster!r} is already running run({running}) in another thread; run() calls of "
    "one cluster take turns, since every task runs every call; call run() from one thread"
)

# ------------------------------------------------------------------------ the Ray backend
RAY_MISSING = (
    "the Ray backend needs Ray, which is not installed: pip install 'pytest-kerasmp[ray]' "
    "(or ray[serve]), or use backend='local'"
)
RAY_KEYWORDS_DEPRECATED = (
    "{face}({given}=...) is deprecated and goes in the next release: pass the configured backend instead, "
    "backend=pytest_kerasmp.RayBackend(address=..., reserve=..., timeout_s=...)"
)
WARM_IMPORT_DEPRECATED = (
    "WorkerPool(warm_import=...) is deprecated and goes in the next release: use warm_import=... "
    "(it imports the session's Keras backend: TensorFlow, JAX or PyTorch)"
)
BACKEND_UNKNOWN = (
    "backend={backend!r} is not one of {known}; pass one of those names or a backend object "
    "(pytest_kerasmp.runtime.backends)"
)
RAY_NO_SLOTS = (
    "the Ray cluster has no node with {cpus} free CPU(s) or a GPU to plan a slot on ({nodes}); "
    "add nodes or lower cpus_per_slot"
)
RAY_NODE_GONE = (
    "{what}: {slot} lies on Ray node {node} which is not (or no longer) in the cluster "
    "(live: {nodes}); plan the slots again with plan_ray_slots()"
)
RAY_SLOT_INFEASIBLE = (
    "{what}: its slots on Ray node {node} ask for {asked} but that node has {there} in all "
    "(live: {nodes}), so Ray would wait for them forever; plan fewer or smaller slots there "
    "(plan_ray_slots) or add a node that has them"
)
RAY_STARTUP_TIMED_OUT = (
    "{who} was not ready after {timeout:g} s: Ray had not placed it (its node's CPUs or GPUs "
    "are taken by other actors or pools) or its TensorFlow import or initializer was slow; "
    "close other pools on that node, or raise start_timeout_s"
)
RAY_PROCESSES_LEFT = (
    "{n} of the local Ray cluster still ran {wait:g} s after shutdown and were killed: {names}; "
    "something kept them busy (check the Ray logs under /tmp/ray/session_latest/logs)"
)
RAY_CONNECT_FAILED = (
    "cannot connect to a Ray cluster at {address!r}: {what}; check that the cluster runs "
    "(`ray status` on its head node) and that this is the address `ray start --head` printed "
    "(its GCS port, 6379 by default), reachable from this machine, or use 'local' for a "
    "cluster on this machine; connecting gives up after {timeout:g} s ({option})"
)
RAY_OPTION_UNREACHABLE = "{option}={address!r} (from {source}): {error}"
