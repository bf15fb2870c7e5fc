"""Arrays in shared memory that a pool's workers write into: ``WorkerPool.map(into=...)``.

:func:`shared_empty` makes a numpy array whose memory is a ``memfd`` file (no name in
``/dev/shm``, freed by the kernel when the last process holding it ends, crashed or not).
A task whose destination is a view of such an array has its result written there by its
worker, straight from the worker's memory: nothing comes back through the result arenas
and the caller copies nothing. Any other destination is filled by the caller.

The dispatcher passes a region's file to a worker once, on the first task that writes into
it (:class:`SentRegions`); the worker maps it (:class:`MappedRegions`) and unmaps it when
the dispatcher says the array is gone, or to make room.
"""

from __future__ import annotations

import collections
import itertools
import mmap
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from pytest_kerasmp.errors import INTO_MISMATCH

#: Regions a worker keeps mapped at most (the least recently used one is unmapped first).
MAPPED_MAX = 8
#: Where a task's result goes: (region id, byte offset, shape, strides, dtype string).
Destination = tuple[int, int, tuple[int, ...], tuple[int, ...], str]

if TYPE_CHECKING:
    import numpy as np

_ids = itertools.count(1)
_live: weakref.WeakValueDictionary[int, Region] = weakref.WeakValueDictionary()  # not yet freed
#: The region whose arrays were all dropped last, kept for the next shared_empty of about its
#: size: a new region's pages are faulted in one by one by whoever first writes them (some
#: 25 ms for 85 MB here, against 3 ms for ordinary memory), a reused one's are already there.
_spare: Region | None = None
_lock = threading.Lock()  # one shared_empty at a time takes the spare


class Region(mmap.mmap):
    """A shared-memory file mapped here; numpy arrays made by :func:`shared_empty` use it.
    It is unmapped, and its file closed, when no array and nothing else holds it."""

    id: int
    fd: int
    address: int


def shared_empty(shape: int | tuple[int, ...], dtype: Any = "float32") -> np.ndarray:
    """A new, uninitialised numpy array in memory that pool workers can write into.

    Give views of it to :meth:`WorkerPool.map`'s ``into`` and each worker writes its result
    straight into them (no copy back to the caller). Otherwise it is an ordinary writable
    array. When its last view is gone (the pool lets go of its tasks' views a moment after
    they end) its memory is freed, except that the most recently dropped one is kept for
    the next ``shared_empty`` of its size to twice its size (its pages are already there);
    workers unmap a freed one at their next task. Local pools only: with ``backend="ray"``
    the caller copies results in.
    """
    global _spare
    import numpy as np

    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"shared_empty: negative dimensions are not allowed, got shape {shape}")
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = max(1, count * dtype.itemsize)
    with _lock:
        region, _spare = _spare, None
        if region is None or not nbytes <= len(region) <= 2 * nbytes:
            region = _new_region(nbytes)  # (a spare that does not fit is freed here)
        root = np.frombuffer(region, dtype, count=count)
    weakref.finalize(root, _dropped, region)  # every view's base is ``root``
    return root.reshape(shape)


def _dropped(region: Region) -> None:
    """The last array on ``region`` is gone: it becomes the spare (the previous spare is
    freed when nothing else holds it). Never takes the lock: it runs when numpy frees."""
    global _spare
    _spare = region


def _new_region(nbytes: int) -> Region:
    import numpy as np

    from pytest_kerasmp.runtime.wire.transport import new_memfd

    fd = new_memfd("kerasmp-shared", nbytes)
    try:
        region = Region(fd, nbytes)
    except BaseException:
        os.close(fd)
        raise
    region.id, region.fd = next(_ids), fd  # the file, kept to send to workers
    weakref.finalize(region, os.close, fd)
    region.address = np.frombuffer(region, np.uint8).__array_interface__["data"][0]
    _live[region.id] = region
    return region


def region_of(array: np.ndarray) -> Region | None:
    """The shared region ``array`` is a view of, or None."""
    import numpy as np

    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, Region) else None


def destination(array: np.ndarray) -> tuple[Region, Destination] | None:
    """Where a worker writes a result that goes into ``array``; None when not shared."""
    region = region_of(array)
    if region is None or region.closed:
        return None
    offset = array.__array_interface__["data"][0] - region.address
    return region, (region.id, offset, array.shape, array.strides, array.dtype.str)


def check_fits(result: Any, shape: tuple[int, ...], dtype: np.dtype, where: str) -> np.ndarray:
    """``result`` as an array that can be copied into a destination of ``shape``; else the
    ValueError both the worker and the caller raise."""
    import numpy as np

    got = np.asarray(result)
    if got.shape != tuple(shape) or not np.can_cast(got.dtype, dtype, casting="same_kind"):
        raise ValueError(INTO_MISMATCH.format(
            where=where, shape=got.shape, dtype=got.dtype, want_shape=tuple(shape), want_dtype=np.dtype(dtype),
        ))
    return got


def copy_into(dest: np.ndarray, result: Any, where: str) -> None:
    """The caller's path: copy ``result`` into ``dest`` (checked first)."""
    import numpy as np

    np.copyto(dest, check_fits(result, dest.shape, dest.dtype, where), casting="same_kind")


class SentRegions:
    """The dispatcher's record of the regions one worker has mapped, most recent last."""

    def __init__(self) -> None:
        self.mapped: collections.OrderedDict[int, None] = collections.OrderedDict()

    def route(self, into: Any) -> tuple[Destination | None, tuple[int, ...], tuple[Region, ...]]:
        """For the worker's next task, whose result goes into ``into`` (or None): where the
        worker writes it (None: it sends the result back), the regions it unmaps first
        (freed here, or the least recently used past :data:`MAPPED_MAX`), and those it is
        sent (0 or 1)."""
        drop = [rid for rid in self.mapped if rid not in _live]
        for rid in drop:
            del self.mapped[rid]
        found = destination(into) if into is not None else None
        if found is None:
            return None, tuple(drop), ()
        region, where = found
        if region.id in self.mapped:
            self.mapped.move_to_end(region.id)
            return where, tuple(drop), ()
        if len(self.mapped) >= MAPPED_MAX:
            drop.append(self.mapped.popitem(last=False)[0])
        self.mapped[region.id] = None
        return where, tuple(drop), (region,)


class MappedRegions:
    """The worker's side: the regions it was sent, mapped, by id."""

    def __init__(self) -> None:
        self.maps: dict[int, mmap.mmap] = {}

    def update(self, drop: tuple[int, ...], fds: list[tuple[int, int]]) -> None:
        """Unmap ``drop``; map each ``(id, fd)`` received (and close the fd)."""
        for rid in drop:
            old = self.maps.pop(rid, None)
            if old is not None:
                old.close()
        try:
            for rid, fd in fds:
                self.maps[rid] = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            for _, fd in fds:
                os.close(fd)

    def write(self, where: Destination, result: Any, task: str) -> None:
        """Copy ``result`` into the destination ``where`` (checked first)."""
        import numpy as np

        rid, offset, shape, strides, dtype = where
        if rid not in self.maps:
            raise OSError(f"{task}: this worker could not map the shared array its result goes to; free memory and run it again")
        dest = np.ndarray(shape, np.dtype(dtype), buffer=self.maps[rid], offset=offset, strides=strides)
        try:
            np.copyto(dest, check_fits(result, shape, dest.dtype, task), casting="same_kind")
        finally:
            del dest
