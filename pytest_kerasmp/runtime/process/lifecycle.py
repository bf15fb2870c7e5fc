"""The one lifecycle of every child process the plugin starts (pool workers, servers, ...).

:class:`Child` starts a process (spawn: a fresh interpreter that imports nothing of the
owner's before it pins; or a forkserver that imported TensorFlow but never ran it), relays
each line it prints with a prefix that says who printed it (role, slot, pid) into the
owner's ``sys.stderr`` (so it lands in the captured output of the running test), waits for
its ``Ready`` together with its exit, describes any exit (any code, any signal, named or
not), dumps the Python stacks of every thread before it kills a stuck child, and ends it:
terminate, then kill its process group. The owners of children (pools, servers, clusters)
register in ``owners``, which ends them all on an interrupt, SIGTERM or the interpreter's exit.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from pytest_kerasmp import frameworks
from pytest_kerasmp.errors import (
    MAIN_NOT_GUARDED,
    NETWORK_EXPOSED,
    NETWORK_REQUIRE_ADVICE,
    NETWORK_WHY_CODE,
    NOT_STARTED_TERMINATING,
    STARTUP_ADVICE_NONE,
    STARTUP_ADVICE_TRACEBACK,
    STARTUP_FAILED,
    STARTUP_TIMED_OUT,
    RemoteTraceback,
    WorkerStartupError,
    with_stacks,
)
from pytest_kerasmp.runtime.process import bootstrap
from pytest_kerasmp.runtime.process.childio import STACK_DUMP_S, dump_stacks_of, is_chatter, quiet_logs, read_lines
from pytest_kerasmp.runtime.wire import transport
from pytest_kerasmp.runtime.wire.messages import Ready, StartupError
from pytest_kerasmp.slots.devices import DeviceSlot

START_METHODS = ("spawn", "forkserver")
#: Lines of each child's output kept for error messages.
OUTPUT_TAIL = 200

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_children: weakref.WeakSet[Child] = weakref.WeakSet()


#: Why this process is ending (SIGTERM, see ``owners``), once it is: no child starts after that.
terminating: str | None = None


def describe_exit(code: int | None) -> tuple[str, str]:
    """How a process ended, and a hint: any exit code, any signal (named or not)."""
    if code is None:
        return "an unknown status", "check its output above"
    if code >= 0:
        return f"exit code {code}", "the code or a library called exit; check its output above"
    number = -code
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
        if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
            name += f" (SIGRTMIN+{number - signal.SIGRTMIN})"
    if name == "SIGKILL":
        return name, "SIGKILL is usually the OOM killer: lower the batch size or the number of processes"
    if name in ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE"):
        return name, "a native crash (its Python stack, if any, is in its output above)"
    return name, "something sent it that signal; check what else runs on this machine"


class Child:
    """One started process on one slot, until :meth:`stop`.

    Args:
        role: ``"pool-worker"``, ``"server"`` or ``"cluster-task"`` (its entry point in ``_child``).
        name: Process name (``ps`` shows its first 15 bytes) and output prefix.
        slot: The slot it pins itself to before anything imports TensorFlow.
        args: Arguments of the role's entry point (pickled; unpickled after pinning).
        start_method: ``"spawn"`` or ``"forkserver"``.
        warm_import: Import the framework under Keras before the entry point (warm).
        who: How messages name it: a template with ``{slot}`` and ``{pid}``, e.g.
            ``"worker 0 ({slot}, pid {pid}) of pool 'x'"``.
        label: How the session's placement table names it (default: ``name``).
        env: Environment variables the child sets before it pins and imports TensorFlow.
        netns: The pid of a ``netns.PrivateNetwork`` holder whose namespaces the child joins
            first (a cluster's private network), or None.
        network_note: Why its listening sockets may be reachable, for the placement table
            (e.g. why it runs without a private network).
    """

    def __init__(
        self,
        role: str,
        name: str,
        slot: DeviceSlot,
        args: tuple[Any, ...],
        *,
        start_method: str = "spawn",
        warm_import: bool = True,
        who: str = "",
        label: str = "",
        env: dict[str, str] | None = None,
        netns: int | None = None,
        network_note: str = "",
    ) -> None:
        if bootstrap.importing_main:
            raise RuntimeError(MAIN_NOT_GUARDED.format(path=bootstrap.importing_main))
        if terminating is not None:
            raise RuntimeError(NOT_STARTED_TERMINATING.format(name=name, why=terminating))
        if start_method not in START_METHODS:
            raise ValueError(f"start_method={start_method!r} is not one of {START_METHODS}")
        self.role, self.name, self.slot = role, name, slot
        self._who = who or role + " {name} ({slot}, pid {pid})"
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL)
        self.started_at = time.monotonic()
        self._stopped = False
        self.network_note = network_note
        # The session's Keras backend travels with the child's own environment: a forkserver
        # started earlier keeps the environment it started with.
        env = {**(env or {}), "PYTEST_KERASMP_ROLE": role, "KERAS_BACKEND": frameworks.backend_name()[0]}
        self._quiet = quiet_logs()
        if self._quiet:
            env.update(frameworks.active().quiet_environ())
        boot = {
            "role": role,
            "name": name,
            "label": label or name,
            "slot": slot.to_json(),
            "owner_pid": os.getpid(),
            "env": env,
            "sys_path": list(sys.path),
            "main_path": transport.main_script(),
            "warm_import": warm_import,
            "netns": netns,
            "args": pickle.dumps(args, protocol=5),
        }
        self._stack_r, stack_w = os.pipe()
        if start_method == "spawn":
            self._start_spawned(boot, stack_w)
        else:
            self._start_forked(boot, stack_w)
        os.set_blocking(self._stack_r, False)
        self.prefix = f"[{name} {slot.name} pid {self.pid}] "
        self._relay_thread = threading.Thread(target=self._relay, daemon=True, name=f"kerasmp-out-{self.pid}")
        self._relay_thread.start()
        _children.add(self)

    # ---------------------------------------------------------------------------- start

    def _start_spawned(self, boot: dict[str, Any], stack_w: int) -> None:
        mine, theirs = socket.socketpair()
        env = {**os.environ, **boot["env"], "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        try:
            self._popen: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-c", "from pytest_kerasmp.runtime.process.bootstrap import spawned_main; spawned_main()",
                 str(theirs.fileno()), str(stack_w)],
                pass_fds=(theirs.fileno(), stack_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,
            )
        finally:
            theirs.close()
            os.close(stack_w)
        self._process: Any = None
        self.pid: int = self._popen.pid
        self.conn = Connection(mine.detach())
        self.sentinel: int = os.pidfd_open(self.pid)
        assert self._popen.stdout is not None
        self._out_fd = self._popen.stdout.fileno()
        self.conn.send(boot)

    def _start_forked(self, boot: dict[str, Any], stack_w: int) -> None:
        ctx = multiprocessing.get_context("forkserver")
        framework = frameworks.active()
        for key, value in framework.preload_environ().items():  # the forkserver inherits them
            os.environ.setdefault(key, value)
        ctx.set_forkserver_preload(["pytest_kerasmp.runtime.process.bootstrap", framework.module])
        self.conn, theirs = ctx.Pipe(duplex=True)
        out_r, out_w = os.pipe()
        output, stacks = Connection(out_w, readable=False), Connection(stack_w, readable=False)
        self._popen = None
        self._process = ctx.Process(
            target=bootstrap.forked_main, args=(theirs, output, stacks, boot), name=self.name, daemon=True
        )
        try:
            self._process.start()
        finally:
            for c in (theirs, output, stacks):
                c.close()
        self.pid = self._process.pid
        self.sentinel = self._process.sentinel
        self._out_fd = out_r

    # --------------------------------------------------------------------------- status

    @property
    def exitcode(self) -> int | None:
        """The exit status (negative: the signal), or None while it runs."""
        if self._popen is not None:
            return self._popen.poll()
        code: int | None = self._process.exitcode
        return code

    def is_alive(self) -> bool:
        return self.exitcode is None

    def exited(self) -> bool:
        """Whether the process has ended or is ending: reaped, its sentinel ready (also while
        another thread holds its reaping lock, when ``Popen.poll`` answers None), or a zombie
        (a killed process with many threads shows as one for a while before it can be reaped:
        seen under load with TensorFlow's threads)."""
        if self.exitcode is not None or (self.sentinel >= 0 and bool(wait([self.sentinel], 0))):
            return True
        try:
            with open(f"/proc/{self.pid}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state in ("Z", "X")

    def describe_exit(self) -> tuple[str, str]:
        self._reap(1.0)
        return describe_exit(self.exitcode)

    def who(self) -> str:
        """How messages name this process (role, slot, pid)."""
        return self._who.format(name=self.name, slot=self.slot.describe(), pid=self.pid)

    def recent_output(self, lines: int = 20, *, chatter: bool = True) -> str:
        """Its last lines of output; ``chatter=False`` leaves out TensorFlow's start-up chatter
        that was not printed."""
        kept = [line for line in self.output if chatter or not (self._quiet and self._chatter(line))]
        return "\n".join(kept[-lines:])

    def _chatter(self, line: str) -> bool:
        return is_chatter(line, self.slot.kind)

    # -------------------------------------------------------------------------- startup

    def poll_startup(self, died_error: type[Exception] = WorkerStartupError) -> Ready | None:
        """The child's ``Ready`` if it came; None if it is still starting; raises if it failed."""
        msg = None
        try:
            if self.conn.poll():
                msg = self.conn.recv()
        except (EOFError, OSError):
            msg = None
        if isinstance(msg, Ready):
            self.audit_network(require=True)
            return msg
        if isinstance(msg, StartupError):
            reason = msg.text.strip().splitlines()[-1]
            raise self.startup_error(reason, msg.text)
        if msg is None and self.is_alive() and not self.conn.closed:
            if not wait([self.sentinel], 0):
                return None
        how, hint = self.describe_exit()
        self._stop_now()
        raise self.startup_error(f"the process exited with {how} before it was ready ({hint})", None, died_error)

    def startup_error(
        self, reason: str, text: str | None, error_type: type[Exception] = WorkerStartupError
    ) -> Exception:
        advice = STARTUP_ADVICE_TRACEBACK if text else STARTUP_ADVICE_NONE
        error = error_type(STARTUP_FAILED.format(who=self.who(), reason=reason, advice=advice))
        tail = self.recent_output()
        error.__cause__ = RemoteTraceback(text) if text else (RemoteTraceback(tail) if tail else None)
        return error

    def timed_out_starting(self, timeout: float) -> Exception:
        """Dump the stacks of a child that did not get ready in time, kill it, and say so."""
        stacks = self.dump_stacks()
        self._stop_now()
        return with_stacks(WorkerStartupError(STARTUP_TIMED_OUT.format(who=self.who(), timeout=timeout)), stacks)

    def wait_ready(self, timeout: float, died_error: type[Exception] = WorkerStartupError) -> Ready:
        return wait_all_ready([self], timeout, died_error)[0]

    def audit_network(self, require: bool = False) -> dict[str, Any]:
        """Read what the child listens on into its placement record: when it is ready, and
        by its owner before it asks the child to stop. With ``require``, a socket reachable
        from the network under ``--kerasmp-private-network=require`` stops it."""
        from pytest_kerasmp.slots import network, placement

        if placement.session_dir() is None and network.mode() != "require":
            return {}  # nobody reads it: no placement table, nothing to enforce
        found = network.audit(self.pid)
        placement.record_network(self.pid, found, self.network_note)
        if require and found["exposed"] and network.mode() == "require":
            self._stop_now()
            raise WorkerStartupError(STARTUP_FAILED.format(
                who=self.who(), advice=NETWORK_REQUIRE_ADVICE,
                reason=NETWORK_EXPOSED.format(listeners=", ".join(found["exposed"]), why=self.network_note or NETWORK_WHY_CODE),
            ))
        return found

    # ----------------------------------------------------------------------------- ends

    def dump_stacks(self, timeout: float = STACK_DUMP_S) -> str | None:
        """The Python stacks of every thread of the (stuck) child, or None if it gave none."""
        return dump_stacks_of([self], timeout).get(self.pid)

    @property
    def stack_fd(self) -> int:
        """Where the child's faulthandler writes its stacks (SIGUSR1)."""
        return self._stack_r

    def kill(self) -> None:
        """SIGKILL the child and whatever its tasks started (its process group), now.
        Nothing once it was stopped (its group was killed then; the pid may be reused)."""
        if self._stopped:
            return
        _kill_group(self.pid)
        if self.exitcode is None:  # a forked child that has not made its group yet
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 2.0) -> None:
        """End the child: wait ``grace`` for it to exit, terminate, then kill its group; reaped."""
        if self._stopped:
            return
        if self.is_alive():
            self._reap(grace)
        if self.is_alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._reap(min(grace, 1.0))
        self._stop_now()

    def _stop_now(self) -> None:
        from pytest_kerasmp.slots import placement

        if self._stopped:
            return
        self._stopped = True
        _kill_group(self.pid)  # the child and what its tasks started; safe after a reap
        if self.exitcode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)  # not yet the leader of its group
            except ProcessLookupError:
                pass
        self._reap(5.0)
        self._relay_thread.join(0.5)  # its last lines reach this test's output, not the next's
        placement.release(self.pid)  # its end, for the session's placement table
        for close in (self.conn.close, lambda: os.close(self._stack_r)):
            try:
                close()
            except OSError:
                pass
        if isinstance(self.sentinel, int) and self._popen is not None:
            try:
                os.close(self.sentinel)
            except OSError:
                pass
            self.sentinel = -1
        _children.discard(self)

    def _relay(self) -> None:
        """Copy the child's output, line by line with its prefix, to the owner's stderr."""
        try:
            read_lines(self._out_fd, self._emit)
        finally:
            if self._popen is None:
                os.close(self._out_fd)
            elif self._popen.stdout is not None:
                self._popen.stdout.close()

    def _emit(self, line: str) -> None:
        self.output.append(line)
        if self._quiet and self._chatter(line):
            return
        try:
            sys.stderr.write(self.prefix + line + "\n")
        except (ValueError, OSError):
            pass  # the owner's stderr is closed (interpreter exit)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the child to exit by itself; whether it has."""
        self._reap(timeout)
        return not self.is_alive()

    def _reap(self, timeout: float) -> None:
        if self._popen is not None:
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        else:
            self._process.join(timeout)

def wait_all_ready(
    children: list[Child], timeout: float, died_error: type[Exception] = WorkerStartupError
) -> list[Ready]:
    """Wait for every child's ``Ready`` (and each one's exit) within ``timeout``; raise the
    first failure (a child that did not get ready in time is dumped and killed)."""
    deadline = time.monotonic() + timeout
    ready: dict[int, Ready] = {}
    while len(ready) < len(children):
        waiting = [c for i, c in enumerate(children) if i not in ready]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise waiting[0].timed_out_starting(timeout)
        wait([x for c in waiting for x in (c.conn, c.sentinel)], remaining)
        for i, c in enumerate(children):
            if i not in ready:
                msg = c.poll_startup(died_error)
                if msg is not None:
                    ready[i] = msg
    return [ready[i] for i in range(len(children))]


def _kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (a group id is not reused while a member lives)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def live_children() -> list[Child]:
    """The children of this process that have not been stopped (for leak checks)."""
    return [c for c in _children if not c._stopped]


def kill_children() -> None:
    """SIGKILL every child's process group now, without taking any lock (from a signal
    handler, or when the owners are ended)."""
    for child in list(_children):
        child.kill()
