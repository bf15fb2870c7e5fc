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
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pytest_kerasmp.errors import INTO_MISMATCH

#: Regions a worker keeps mapped at most (the least recently used one is unmapped first).
MAPPED_MAX = 8
#: Regions no array uses any more that are kept to be reused by the next shared_empty:
#: a new region's pages are faulted in one by one by whoever first writes them (some 25 ms
#: for 85 MB here, against 3 ms for ordinary memory), a reused one's are already there.
IDLE_KEPT = 2

#: Where a task's result goes: (region id, byte offset, shape, strides, dtype string).
Destination = tuple[int, int, tuple[int, ...], tuple[int, ...], str]

if TYPE_CHECKING:
    import numpy as np

_ids = itertools.count(1)
_kept: dict[int, Region] = {}  # every region of this process not yet freed, oldest first
_lock = threading.Lock()  # one shared_empty at a time picks or frees regions


class Region(mmap.mmap):
    """A shared-memory file mapped here; numpy arrays made by :func:`shared_empty` use it."""

    id: int
    fd: int
    address: int
    refs: int  # its reference count while no array uses it
    freed: Callable[[], object]  # a weakref.finalize: closes its file (once): when freed, or when dropped at exit


def _refs(rid: int) -> int:
    """The references to region ``rid`` (measured the same way each time)."""
    return sys.getrefcount(_kept[rid])


def _idle() -> list[int]:
    """The ids of the kept regions no array uses, oldest first."""
    return [rid for rid in list(_kept) if _refs(rid) <= _kept[rid].refs]


def _reuse(nbytes: int) -> Region | None:
    """The smallest idle region of ``nbytes`` to twice that, if any."""
    fits = [_kept[rid] for rid in _idle() if nbytes <= len(_kept[rid]) <= 2 * nbytes]
    return min(fits, key=len) if fits else None


def _free_idle(keep: int) -> None:
    for rid in _idle()[: max(0, len(_idle()) - keep)]:
        region = _kept.pop(rid)
        region.close()
        region.freed()


def shared_empty(shape: int | tuple[int, ...], dtype: Any = "float32") -> np.ndarray:
    """A new, uninitialised numpy array in memory that pool workers can write into.

    Give views of it to :meth:`WorkerPool.map`'s ``into`` and each worker writes its result
    straight into them (no copy back to the caller). Otherwise it is an ordinary writable
    array; its memory is freed when the last view of it is gone (workers unmap it at their
    next task). Local pools only: with ``backend="ray"`` the caller copies results in.
    """
    import numpy as np

    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"shared_empty: negative dimensions are not allowed, got shape {shape}")
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = max(1, count * dtype.itemsize)
    with _lock:
        region = _reuse(nbytes)
        if region is None:
            _free_idle(IDLE_KEPT - 1)
            region = _new_region(nbytes)
        return np.frombuffer(region, dtype, count=count).reshape(shape)


def _new_region(nbytes: int) -> Region:
    import numpy as np

    fd = os.memfd_create("kerasmp-shared", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        region = Region(fd, nbytes)
    except BaseException:
        os.close(fd)
        raise
    region.id, region.fd = next(_ids), fd
    region.freed = weakref.finalize(region, os.close, fd)
    region.address = np.frombuffer(region, np.uint8).__array_interface__["data"][0]
    _kept[region.id] = region
    region.refs = _refs(region.id) - 1  # less this function's own variable
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

    def plan(self, region: Region) -> tuple[tuple[int, ...], tuple[Region, ...]]:
        """For a task writing into ``region``: the regions the worker unmaps (gone, or the
        least recently used past :data:`MAPPED_MAX`), and those to send it (0 or 1)."""
        drop = [rid for rid in self.mapped if rid not in _kept]
        for rid in drop:
            del self.mapped[rid]
        new: tuple[Region, ...] = ()
        if region.id in self.mapped:
            self.mapped.move_to_end(region.id)
        else:
            if len(self.mapped) >= MAPPED_MAX:
                oldest, _ = self.mapped.popitem(last=False)
                drop.append(oldest)
            self.mapped[region.id] = None
            new = (region,)
        return tuple(drop), new

    def route(self, into: Any) -> tuple[Destination | None, tuple[int, ...], tuple[Region, ...]]:
        """For a task whose result goes into ``into`` (or None): where the worker writes it
        (None: it sends the result back), and the regions it unmaps and is sent first."""
        found = destination(into) if into is not None else None
        if found is None:
            return None, (), ()
        return (found[1], *self.plan(found[0]))


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
        for rid, fd in fds:
            try:
                self.maps[rid] = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)

    def write(self, where: Destination, result: Any, task: str) -> None:
        """Copy ``result`` into the destination ``where`` (checked first)."""
        import numpy as np

        rid, offset, shape, strides, dtype = where
        dest = np.ndarray(shape, np.dtype(dtype), buffer=self.maps[rid], offset=offset, strides=strides)
        try:
            np.copyto(dest, check_fits(result, shape, dest.dtype, task), casting="same_kind")
        finally:
            del dest
