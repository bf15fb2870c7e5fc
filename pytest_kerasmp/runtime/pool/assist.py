"""A caller's thread doing the dispatcher's work for its own task, when the loop is idle.

A thread switch inside one process costs tens of microseconds here (the GIL changes hands),
more than a pipe to a worker process: so a submit hands its task to an idle worker itself
(its arrays go straight into the worker's arena: one copy less), and a caller waiting for its
own short task reads the worker's answer itself for a moment, with that connection muted in
the loop's wait. Both hold the dispatcher's ``turn``, which the loop holds whenever it is not
waiting, so the workers' state has one writer at a time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pytest_kerasmp.runtime.pool.taskqueue import QueuedTask
from pytest_kerasmp.runtime.process.watcher import readable

#: How long a caller waiting for its own task reads its worker's answer itself (then the
#: loop takes over): a short task's answer comes back without a thread switch.
HELP_WAIT_S = 0.002


class CallerAssist:
    """Mixed into the local ``Dispatcher`` (which has ``turn``, ``watcher``, ``assign``, ...)."""

    turn: Any
    watcher: Any
    workers: list[Any]

    if TYPE_CHECKING:  # the Dispatcher's (and its TaskQueue's); declared for the type checker only
        def append(self, task: QueuedTask) -> None: ...
        def wake(self) -> None: ...
        def fail_closed(self, exc: BaseException) -> None: ...
        def assign(self) -> None: ...
        def _on_message(self, w: Any) -> bool: ...

    def enqueue(self, task: QueuedTask) -> None:
        """Queue ``task``, whose buffers are still views of the caller's arrays. When the loop
        is waiting, the caller's thread hands it to an idle worker itself (one thread switch
        less, and its arrays go straight into the worker's arena: one copy less); otherwise,
        or when its deadline must be watched, the buffers are copied and the loop woken."""
        if task.timeout_s is None and self.turn.acquire(blocking=False):
            try:
                self.append(task)
                try:
                    self.assign()
                except Exception as exc:  # fail closed, as in the dispatcher's own thread
                    self.fail_closed(exc)
                finally:
                    if task.buffers is not None:  # still queued: the caller may change its arrays
                        task.buffers = [bytearray(b) for b in task.buffers]
            finally:
                self.turn.release()
            if task.buffers is not None:
                self.wake()  # no idle worker: the loop assigns it when one is free
            return
        task.buffers = [bytearray(b) for b in task.buffers or ()]
        self.append(task)
        self.wake()

    def help_wait(self, future: Any) -> None:
        """While the loop waits, the caller reads its own task's answer for up to
        HELP_WAIT_S (holding the turn, so the loop never reads the same connection)."""
        task = future.task
        w = next((w for w in self.workers if w.task is task and w.task is not None), None)
        if w is None or not self.turn.acquire(blocking=False):
            return
        if not self.watcher.mute(w, True):  # the loop's wait no longer wakes for its messages
            self.turn.release()
            return
        try:
            deadline = time.monotonic() + HELP_WAIT_S
            while w.task is task and w.state == "busy" and not future.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not readable(w.child.conn.fileno(), remaining):
                    break
                if not self._on_message(w):
                    break  # it died: the loop sees its exit
        except (OSError, EOFError):
            pass
        finally:
            self.watcher.mute(w, False)  # level-triggered: a message left unread wakes the loop
            self.turn.release()
