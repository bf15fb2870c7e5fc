"""RayServeClient: a Ray Serve application called as an :class:`InferenceClient` is called.

``submit(x) -> concurrent.futures.Future`` and ``predict(x)``, picklable, connecting on first
use in each process: so that a Ray Serve deployment is measured by the same load generator
and the same scenario code as the plugin's servers (``pytest_kerasmp.load``). The answer of
``handle.remote(x)`` is awaited on one event loop thread per process, so that a waiting
request costs no thread of its own.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any


class RayServeClient:
    """Calls the Ray Serve application ``app`` on the cluster at ``address`` (None: the one
    this process is connected to, or its own local one)."""

    def __init__(self, app: str, address: str | None = None, *, request_timeout_s: float = 60.0) -> None:
        self.app, self.address, self.request_timeout_s = app, address, request_timeout_s
        self._handle: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"app": self.app, "address": self.address, "request_timeout_s": self.request_timeout_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["app"], state["address"], request_timeout_s=state["request_timeout_s"])  # type: ignore[misc]

    def _connect(self) -> tuple[Any, asyncio.AbstractEventLoop]:
        with self._lock:
            if self._handle is None:
                import logging

                from ray import serve

                from pytest_kerasmp.ray.cluster import connect

                logging.getLogger("ray.serve").setLevel(logging.WARNING)
                connect(self.address, quiet=True)
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=f"kerasmp-serve-{self.app}", daemon=True)
                thread.start()
                self._handle, self._loop, self._thread = serve.get_app_handle(self.app), loop, thread
            assert self._loop is not None
            return self._handle, self._loop

    def submit(self, x: Any) -> Future[Any]:
        """Send ``x`` to the application; the Future holds its answer (or its error)."""
        handle, loop = self._connect()
        response = handle.remote(x)

        async def answer() -> Any:
            return await asyncio.wait_for(response, self.request_timeout_s)

        return asyncio.run_coroutine_threadsafe(answer(), loop)

    def predict(self, x: Any, *, timeout: float | None = None) -> Any:
        return self.submit(x).result(self.request_timeout_s if timeout is None else timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop and close this process's event loop (the application keeps running); requests
        still waiting are cancelled (their futures say so)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._handle = self._loop = self._thread = None
        if loop is None:
            return

        def stop() -> None:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.call_soon(loop.stop)  # after the cancelled tasks have run their last step

        loop.call_soon_threadsafe(stop)
        if thread is not None:
            thread.join(timeout)
        if not loop.is_running():
            loop.close()
