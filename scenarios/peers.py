"""The pools a user would pick instead of the plugin's, as that user would set them up.

Each peer is started once per scenario module and kept warm, as the plugin's pool is: its
workers are spawned (fork after TensorFlow ran hangs), an initializer, or a first call,
loads what every task needs, and every later call reuses the same processes. None of them
pins its workers: each worker's framework sizes its thread pools from every core, which is
what a user gets (they are started from a thread allowed on every core: a child inherits the
pytest process's own pinning otherwise). Every call is bounded, and ``close()`` ends every
process the peer started.

- ``loky``: ``joblib.Parallel(n_jobs=N)`` (its default backend, loky's reusable executor,
  cloudpickle for functions, arrays over 1 MB memory-mapped through /dev/shm).
- ``executor``: ``concurrent.futures.ProcessPoolExecutor`` on spawn, with an initializer.
- ``mp-pool``: ``multiprocessing.Pool`` on spawn, with an initializer.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import psutil

PEERS = ("loky", "executor", "mp-pool")
CALL_TIMEOUT_S = 300.0
CLOSE_TIMEOUT_S = 10.0


class Peer:
    """One warm pool of another library: ``map(fn, *iterables)`` in order, ``close()``."""

    def __init__(self, name: str, workers: int, initializer: Callable[..., Any] | None = None, initargs: tuple = ()) -> None:
        self.name, self.workers = name, workers
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            with _on_every_core():
                self._start(initializer, initargs)
        finally:  # its workers; the resource trackers that came with them serve the whole process
            self._started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and not _tracker(p)]
            if len(self._started) < workers:
                self.close()
                raise RuntimeError(f"peer {name} started {len(self._started)} of its {workers} workers; they were ended")

    def _start(self, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
        name, workers = self.name, self.workers
        if name == "loky":
            import joblib

            extra = {} if initializer is None else {"initializer": initializer, "initargs": initargs}
            self._parallel = joblib.Parallel(n_jobs=workers, timeout=CALL_TIMEOUT_S, **extra)  # loky's executor takes them
            self._parallel.__enter__()  # keeps the same workers across calls
        elif name == "executor":
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs)
        elif name == "mp-pool":
            self._pool = multiprocessing.get_context("spawn").Pool(workers, initializer=initializer, initargs=initargs)
        else:
            raise ValueError(f"peer {name!r} is not one of {', '.join(PEERS)}")
        self.map(_pid, range(4 * workers))  # every worker started (and initialised) before timing

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> list[Any]:
        if self.name == "loky":
            import joblib

            return self._parallel(joblib.delayed(fn)(*args) for args in zip(*iterables, strict=True))
        if self.name == "executor":
            return list(self._executor.map(fn, *iterables, timeout=CALL_TIMEOUT_S))
        return self._pool.starmap_async(fn, zip(*iterables, strict=True)).get(CALL_TIMEOUT_S)

    def close(self) -> None:
        """End the peer's workers: politely, then, past a bound, by force."""
        try:
            if self.name == "loky" and hasattr(self, "_parallel"):
                self._parallel.__exit__(None, None, None)
                from joblib.externals.loky import get_reusable_executor

                get_reusable_executor().shutdown(wait=False, kill_workers=True)
            elif self.name == "executor" and hasattr(self, "_executor"):
                self._executor.shutdown(wait=False, cancel_futures=True)
            elif hasattr(self, "_pool"):
                self._pool.terminate()
        finally:
            _, alive = psutil.wait_procs(self._started, timeout=CLOSE_TIMEOUT_S)
            for process in alive:
                process.kill()
            psutil.wait_procs(alive, timeout=CLOSE_TIMEOUT_S)


@contextlib.contextmanager
def _on_every_core() -> Iterator[None]:
    """Let this thread, and the processes it starts meanwhile, run on every core."""
    me = psutil.Process()
    pinned = me.cpu_affinity()
    me.cpu_affinity([])  # every core this machine allows
    try:
        yield
    finally:
        me.cpu_affinity(pinned)


def _tracker(process: psutil.Process) -> bool:
    try:
        return any("resource_tracker" in part for part in process.cmdline())
    except psutil.Error:
        return False


def _pid(_: int) -> int:
    import os

    return os.getpid()
