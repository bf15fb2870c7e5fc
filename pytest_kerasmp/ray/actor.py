"""Code that runs inside Ray actors (a Ray worker process per slot): pool workers and servers.

The actor's first act is the one pin routine, ``pin_process``, with the slot made local to
its node (cores numbered within the node become this node's cores; a GPU slot takes the GPU
Ray assigned); the slot's environment was already set by the actor's ``runtime_env`` before
the worker process started. Then it imports the owner's ``__main__`` script as local
children do (``_child._import_main``: task functions defined there resolve), imports
TensorFlow (warm) and runs the initializer.
Failures are kept and reported by ``ready()`` with their traceback, as a local child's
``StartupError`` is. Task errors travel pickled with their traceback text, as locally.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import sys
import threading
import time
import traceback
from typing import Any

from pytest_kerasmp.slots.devices import DeviceSlot

#: The owner's ``__main__`` script, set in the actor's environment by ``actor_options``.
MAIN_ENV = "PYTEST_KERASMP_MAIN"
#: The owner's niceness, likewise: the actor takes it back from Ray's (15 by default).
NICE_ENV = "PYTEST_KERASMP_NICE"


def owner_niceness() -> None:
    """Run this process's threads at the owner's niceness when Ray started it lower (Ray's
    ``worker_niceness``, 15 unless the cluster says otherwise): a worker or server sharing a
    core with the owner's processes would get a fraction of it. Where the user may not raise
    priority (no CAP_SYS_NICE), it stays as Ray made it (docs/guide/ray.md says how to start
    a cluster without it). Applied at start (every thread) and by each task (its thread)."""
    want = os.environ.get(NICE_ENV)
    if want is None or not want.lstrip("-").isdigit():
        return
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > int(want):
                os.setpriority(os.PRIO_PROCESS, tid, int(want))
        except OSError:  # not allowed, or the thread ended meanwhile
            pass


def local_slot(slot: DeviceSlot) -> DeviceSlot:
    """``slot`` as this process on its node must apply it."""
    if slot.kind == "GPU":
        import ray

        ids = ray.get_gpu_ids()
        return dataclasses.replace(slot, gpu=str(ids[0])) if ids else slot
    avail = sorted(os.sched_getaffinity(0))
    return dataclasses.replace(slot, cores=tuple(sorted({avail[c % len(avail)] for c in slot.cores})))


def start(slot_json: dict[str, Any], warm_import: bool, role: str, label: str) -> tuple[DeviceSlot, str | None]:
    """Pin, record the placement (on the session's machine), then import TensorFlow; the
    slot applied and a failure's traceback (or None)."""
    slot = DeviceSlot.from_json(slot_json)
    try:
        from pytest_kerasmp.ray import output
        from pytest_kerasmp.slots import placement

        output.announce(label, slot)  # first: what it prints from now on carries its name
        owner_niceness()  # before the framework starts its thread pools (they inherit it)
        from pytest_kerasmp.slots.pinning import pin_process

        slot = local_slot(slot)
        pin_process(slot)
        placement.record(role, slot, label=label)
        main = os.environ.get(MAIN_ENV)
        if main and os.path.isfile(main):  # else a task that needs it says where it is missing
            from pytest_kerasmp.runtime.process.bootstrap import _import_main

            _import_main(main)
        if warm_import:  # warm: the framework under Keras imported once per actor
            from pytest_kerasmp import frameworks

            frameworks.active().warm_import()
        from pytest_kerasmp.slots import network

        # Ray's own worker server listens on the node's address: the placement table shows it.
        placement.record_network(os.getpid(), network.audit(os.getpid()), "Ray's worker server, on the node's address")
    except BaseException:
        return slot, traceback.format_exc()
    return slot, None


def _main_missing(exc: AttributeError) -> RuntimeError | None:
    """A clear error for a task function of the owner's script when that script is not at its
    path on this node (so it could not be imported here), else None."""
    main = os.environ.get(MAIN_ENV)
    if not main or os.path.isfile(main) or "__main__" not in str(exc):
        return None
    import ray

    from pytest_kerasmp.errors import MAIN_NOT_ON_NODE

    node = ray.get_runtime_context().get_node_id()[:8]
    return RuntimeError(MAIN_NOT_ON_NODE.format(error=exc, path=main, node=node))


def identity(slot: DeviceSlot) -> dict[str, Any]:
    import ray as ray_module

    ray: Any = ray_module
    ctx = ray.get_runtime_context()
    return {"pid": os.getpid(), "node": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "slot": slot.to_json()}


def all_stacks() -> str:
    """The Python stacks of every thread of this process (but the asking one)."""
    me = threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        if ident != me:
            parts.append(f"Thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


class SlotWorker:
    """A pool worker on one slot (threaded: ``stacks`` answers while a task runs)."""

    def __init__(self, slot_json: dict[str, Any], init_call: bytes | None, warm_import: bool, label: str = "") -> None:
        self.slot, self.failure = start(slot_json, warm_import, "pool worker", label)
        self.nice = os.getpriority(os.PRIO_PROCESS, 0)
        if self.failure is None and init_call is not None:
            try:
                from pytest_kerasmp.runtime.wire.transport import loads_call

                fn, args, kwargs = loads_call(init_call)
                fn(*args, **kwargs)
            except BaseException:
                self.failure = traceback.format_exc()

    def ready(self) -> dict[str, Any]:
        return {**identity(self.slot), "failure": self.failure}

    def accept(self, call: bytes, *buffers: Any) -> None:
        """Take a task without running it: an answer says this actor lived and holds it."""
        self.accepted = (call, buffers)

    def run_accepted(self) -> Any:
        call, buffers = self.accepted
        del self.accepted
        return self.run(call, *buffers)

    def run(self, call: bytes, *buffers: Any) -> Any:
        from pytest_kerasmp.errors import pack_exception
        from pytest_kerasmp.runtime.wire.messages import Failed
        from pytest_kerasmp.runtime.wire.transport import loads_call

        if os.getpriority(os.PRIO_PROCESS, 0) > self.nice:  # a Ray thread made after start
            owner_niceness()
        try:
            try:
                fn, args, kwargs = loads_call(call, buffers)
            except AttributeError as exc:
                missing = _main_missing(exc)
                if missing is None:
                    raise
                raise missing from exc
            return fn(*args, **kwargs)
        except BaseException as exc:
            return Failed(-1, pack_exception(exc), "".join(traceback.format_exception(exc)))

    def stacks(self) -> str:
        return all_stacks()

    def watch(self) -> None:
        """Never returns: its caller learns of this actor's end, also while it is idle."""
        threading.Event().wait()


class ServerWorker:
    """An inference server on one slot: the local server's own loop (``runtime.serve.child.serve``)
    in a thread, listening on a Unix socket that clients on this machine reach directly
    (shared memory, no Ray call on the request path: ``endpoint``). Clients elsewhere call
    :meth:`predict`, the fallback, which sends the request into the same loop."""

    def __init__(self, slot_json: dict[str, Any], model_ref: Any, options: dict[str, Any], label: str = "") -> None:
        self.slot, self.failure = start(slot_json, True, "server", label)
        if self.failure is not None:
            return
        try:
            from multiprocessing import Pipe

            from pytest_kerasmp.runtime.serve.child import _Server, listen, serve
            from pytest_kerasmp.runtime.serve.client import InferenceClient

            server = _Server(model_ref.load(), options)
            self.address = b"\0kerasmp-ray-" + f"{os.getpid()}-{secrets.token_hex(8)}".encode()
            listener = listen(self.address)
        except BaseException:
            self.failure = traceback.format_exc()
            return
        self.server = server
        self.control, theirs = Pipe()
        self.loop = threading.Thread(target=serve, args=(server, theirs, listener), name="kerasmp-serve", daemon=True)
        self.loop.start()
        # The fallback's way into the loop: a client of this very socket (a connection per actor thread).
        self.client = InferenceClient(
            self.address, label, os.getpid(), self.slot.describe(), server.inputs, server.outputs,
            request_timeout_s=60.0, busy_timeout_s=0.0, max_queue=server.max_queue,
        )

    def ready(self) -> dict[str, Any]:
        info = identity(self.slot)
        if self.failure is None:
            info["specs"] = (self.server.inputs, self.server.outputs)
        return {**info, "failure": self.failure}

    def endpoint(self) -> dict[str, Any]:
        """Where clients on this machine connect (``runtime.serve.client.machine`` tells them apart)."""
        from pytest_kerasmp.runtime.serve.client import machine

        return {"address": self.address, "machine": machine()}

    def predict(self, req_id: int, arrays: list[Any], timeout: float) -> Any:
        """Rows of request ``req_id``, or a ``wire`` message: Busy, Closed or Failed."""
        import numpy as np

        from pytest_kerasmp.runtime.wire.messages import Answer, Closed

        try:
            msg, outputs = self.client._round_trip(req_id, arrays, f"#{req_id}", time.monotonic() + timeout, timeout)
        except ConnectionError:  # the loop stopped taking requests: the server is closing
            return Closed(req_id)
        if not isinstance(msg, Answer):
            return msg
        return [np.frombuffer(b, dtype).reshape(shape) for b, (_, _, shape, dtype) in zip(outputs, msg.specs, strict=True)]

    def stats(self) -> dict[str, Any]:
        return self.client.stats()

    def drain(self, timeout: float) -> int:
        """Refuse new requests; wait up to ``timeout`` for the accepted ones; how many are left."""
        from pytest_kerasmp.runtime.wire.messages import Stop

        self.control.send(Stop())
        self.loop.join(timeout)
        return int(self.server.waiting) if self.loop.is_alive() else 0

    def stacks(self) -> str:
        return all_stacks()
