"""What crosses a process boundary: pickles whose large buffers travel through shared memory.

Calls and results are pickled with protocol 5; buffers of at least :data:`SHM_MIN_BYTES`
(numpy arrays) are taken out of band and cross through an :class:`Arena`: a shared-memory
file (``memfd``) that both ends keep mapped for the life of a worker, so a call moves each
array with plain memory copies and no new pages. The file has no name in ``/dev/shm``; the
kernel frees it when the last process holding it exits, crashed or not.

Live Keras models, layers, optimizers and variables are refused: they cross as a
:class:`~pytest_kerasmp.modelref.ModelRef`.
"""

from __future__ import annotations

import functools
import io
import mmap
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

#: Buffers of at least this many bytes go out of band, through shared memory.
SHM_MIN_BYTES = 64 * 1024
#: Results at least this large are handed over as views of their arena, smaller ones copied:
#: each result kept alive as a view holds a mapping, and a process has some 65k of them.
VIEW_MIN_BYTES = 1024 * 1024
_ALIGN = 64

LIVE_OBJECT = (
    "{what} cannot be sent to a worker process: a live {kind} would be pickled and rebuilt "
    "(or hang a forked child); send a pytest_kerasmp.ModelRef instead "
    "(ModelRef.save(model, directory) or ModelRef.from_builder('pkg.module:build'))"
)
NOT_PICKLABLE = "{what} cannot be pickled to send to a worker process: {error}"
NOT_IMPORTABLE = (
    "{fn!r} cannot be sent to a worker process: functions travel by reference, so it must be "
    "a module-level function importable as module:name (not a lambda, a local function or a "
    "method of an instance); move it to module level"
)

#: A pickle and its out-of-band buffers.
Payload = tuple[bytes, list[Any]]


def bound_blocking(sock: Any, *, recv_s: float | None = None, send_s: float | None = None) -> None:
    """Bound ``sock``'s blocking reads and sends (``SO_RCVTIMEO``/``SO_SNDTIMEO``): past the
    bound a read or send raises ``BlockingIOError`` instead of waiting on."""
    import socket
    import struct

    for option, seconds in ((socket.SO_RCVTIMEO, recv_s), (socket.SO_SNDTIMEO, send_s)):
        if seconds is not None:
            sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))


def new_memfd(name: str, size: int) -> int:
    """A new anonymous shared-memory file of ``size`` bytes (closed on exec); its descriptor."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Arena:
    """A growable shared-memory buffer mapped by a writer and a reader process.

    The writer calls :meth:`write`; when the buffers do not fit it makes a bigger file, and
    after sending the message that says so it calls :meth:`hand_over`, which passes the file
    over the connection; the reader calls :meth:`receive`. Neither side keeps a descriptor
    beyond that: the mapping alone holds the memory, so dropping an arena frees it.
    """

    def __init__(self, *, header: bool = False) -> None:
        self.map: mmap.mmap | None = None
        self._fd: int | None = None  # a new file not yet handed over
        self._refs = 0
        #: Bytes kept at the start of the file for :meth:`mark` (a control word both sides see).
        self._start = _ALIGN if header else 0

    @property
    def capacity(self) -> int:
        return 0 if self.map is None else len(self.map)

    @property
    def fresh(self) -> bool:
        """Whether the last write made a new file the reader has not got yet."""
        return self._fd is not None

    def write(self, buffers: Sequence[Any]) -> list[tuple[int, int]]:
        """Copy ``buffers`` in; returns their ``(offset, size)`` layout."""
        layout, end = [], self._start
        for buf in buffers:
            size = memoryview(buf).nbytes
            layout.append((end, size))
            end += -(-size // _ALIGN) * _ALIGN
        if end > self.capacity:
            size = max(end, 2 * self.capacity)
            fd = new_memfd("kerasmp-arena", -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
            try:
                self._map(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        if layout:
            assert self.map is not None
            for buf, (offset, size) in zip(buffers, layout, strict=True):
                with memoryview(buf) as view, view.cast("B") as flat:
                    self.map[offset : offset + size] = flat
        return layout

    def mark(self, value: int) -> None:
        """Write ``value`` to the header word (an arena made with ``header=True``)."""
        assert self.map is not None and self._start
        self.map[:8] = value.to_bytes(8, "little")

    def marked(self) -> int:
        """The header word (0 when nothing was marked, or before the first write)."""
        return int.from_bytes(self.map[:8], "little") if self.map is not None and self._start else 0

    def hand_over(self, conn: Any) -> None:
        """Send a new file to the reader (after the message that says ``fresh``)."""
        if self._fd is not None:
            send_handle(conn, self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def receive(self, conn: Any) -> None:
        """Map the new file the writer hands over, instead of the current one."""
        fd = recv_handle(conn)
        try:
            self._map(fd)
        finally:
            os.close(fd)

    def views(self, layout: Sequence[tuple[int, int]]) -> list[memoryview]:
        """The buffers at ``layout``, in place (no copy); see :meth:`in_use`."""
        if not layout:
            return []
        assert self.map is not None
        with memoryview(self.map) as whole:
            return [whole[offset : offset + size] for offset, size in layout]

    def in_use(self) -> bool:
        """Whether a view of the arena is still alive (each view holds the map)."""
        return self.map is not None and sys.getrefcount(self.map) > self._refs

    def abandon(self) -> None:
        """Leave the map to the views that still use it; the next write makes a new file."""
        self.map = None

    def read(self, layout: Sequence[tuple[int, int]]) -> list[bytearray]:
        """Copies of the buffers at ``layout`` (the arena is reused by the next call)."""
        if not layout:
            return []
        assert self.map is not None
        copies = []
        with memoryview(self.map) as view:
            for offset, size in layout:
                with view[offset : offset + size] as part:
                    copies.append(bytearray(part))
        return copies

    def _map(self, fd: int) -> None:
        new = mmap.mmap(fd, os.fstat(fd).st_size)
        self.close()
        self.map = new
        del new
        self._refs = sys.getrefcount(self.map)

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # views still use it: it goes when they do
                pass
            self.map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


class ResultArenas:
    """The reader's side of the arenas a worker writes its results into, one per result still
    alive: a large result is handed over as views of its arena (no copy), so that arena is
    reused only when no view of it is left. Past ``size`` arenas in use, one is left to its views and
    a new file takes its place (the worker is told: ``Task.fresh_out``)."""

    def __init__(self, size: int = 4) -> None:
        self.arenas = [Arena() for _ in range(size)]
        self.current = 0
        self._evict = 0

    def choose(self) -> tuple[int, bool]:
        """The arena the next result goes to, and whether the worker must make it anew."""
        for i, arena in enumerate(self.arenas):
            if not arena.in_use():
                self.current = i
                return i, False
        i = self.current = self._evict
        self._evict = (i + 1) % len(self.arenas)
        self.arenas[i].abandon()
        return i, True

    def receive(self, conn: Any) -> None:
        self.arenas[self.current].receive(conn)

    def take(self, layout: Sequence[tuple[int, int]]) -> list[Any]:
        """The result's buffers: views of the arena when large (see VIEW_MIN_BYTES), else copies."""
        arena = self.arenas[self.current]
        return arena.views(layout) if sum(size for _, size in layout) >= VIEW_MIN_BYTES else arena.read(layout)

    def close(self) -> None:
        for arena in self.arenas:
            arena.close()


def _live_kind(obj: Any) -> str | None:
    """What kind of live framework object ``obj`` is, without importing a framework."""
    keras = sys.modules.get("keras")
    # A keras still being imported (by another thread, or TensorFlow's lazy loader) has made no
    # live object yet; its attributes may not exist.
    if keras is not None and hasattr(keras, "Model") and hasattr(keras, "Variable"):
        if isinstance(obj, keras.Model):
            return "keras.Model"
        if isinstance(obj, keras.layers.Layer):
            return "keras layer"
        if isinstance(obj, keras.optimizers.Optimizer):
            return "keras optimizer"
        if isinstance(obj, keras.Variable):
            return "keras.Variable"
    from pytest_kerasmp import frameworks

    return frameworks.live_kind(obj)


def _take_buffer(buffers: list[Any], buf: pickle.PickleBuffer) -> bool:
    raw = buf.raw()
    if raw.nbytes < SHM_MIN_BYTES:
        return True  # small: in band
    buffers.append(raw)
    return False


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, what: str, buffers: list[Any] | None) -> None:
        # the callback holds the list, not the pickler: no cycle keeps the memo's objects alive
        callback = None if buffers is None else functools.partial(_take_buffer, buffers)
        super().__init__(file, protocol=5, buffer_callback=callback)
        self.what = what

    def reducer_override(self, obj: Any) -> Any:
        kind = _live_kind(obj)
        if kind is not None:
            raise TypeError(LIVE_OBJECT.format(what=self.what, kind=kind))
        return NotImplemented


def dumps(obj: Any, what: str, buffers: list[Any] | None = None) -> bytes:
    """Pickle ``obj``; large buffers are appended (as views, not copies) to ``buffers``.

    With ``buffers=None`` everything is pickled in band.

    Raises:
        TypeError: ``obj`` holds a live model (names ModelRef as the fix) or cannot be
            pickled; the message names ``what``.
    """
    __tracebackhide__ = True
    file = io.BytesIO()
    mark = None if buffers is None else len(buffers)
    try:
        _Pickler(file, what, buffers).dump(obj)
    except (TypeError, pickle.PicklingError, AttributeError) as exc:
        if buffers is not None:
            del buffers[mark:]
        if isinstance(exc, TypeError) and str(exc).startswith(what):
            raise  # our own message (a live model): already names what and the fix
        raise TypeError(NOT_PICKLABLE.format(what=what, error=exc)) from exc
    return file.getvalue()


def dumps_call(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *, out_of_band: bool = True,
    copy: Callable[[Any], Any] = bytearray,
) -> Payload:
    """Pickle a call for a worker, naming the argument that cannot travel.

    The out-of-band buffers are copies (made by ``copy``: the Ray backend copies them into
    its object store), so the caller may change its arrays at once.
    """
    __tracebackhide__ = True
    check_runnable_in_worker(fn)
    buffers: list[Any] | None = [] if out_of_band else None
    name = _name(fn)
    try:  # one pickle for the whole call: the common case costs one pickler
        data = dumps((fn, args, kwargs), f"the call of {name}", buffers)
    except TypeError:  # again item by item, so that the error names what cannot travel
        if buffers is not None:
            buffers.clear()
        items = [(f"function {fn!r}", fn)]
        items += [(f"argument {i} of {name}", a) for i, a in enumerate(args)]
        items += [(f"argument {k!r} of {name}", v) for k, v in kwargs.items()]
        for what, value in items:
            dumps(value, what, buffers)
        raise  # every item pickles alone but not together (a shared unpicklable part)
    return data, [copy(b) for b in buffers or ()]


def loads_call(data: bytes, buffers: Sequence[Any] = ()) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    fn, args, kwargs = pickle.loads(data, buffers=buffers)
    return fn, args, kwargs


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def check_runnable_in_worker(fn: Callable[..., Any]) -> None:
    """Refuse, at submit, a function a worker could not import by name: a lambda or local
    function, or one whose module workers cannot import (``__main__`` of an interactive
    session or of ``python -m``, a test module imported by ``--import-mode=importlib``)."""
    __tracebackhide__ = True
    check_importable(fn)
    module = getattr(fn, "__module__", None)
    if not isinstance(module, str) or module in sys.builtin_module_names:
        return
    from pytest_kerasmp.errors import TASK_NOT_IMPORTABLE

    why = _unimportable(module)
    if why is not None:
        raise TypeError(TASK_NOT_IMPORTABLE.format(fn=_name(fn), module=module, why=why))


@functools.lru_cache(maxsize=256)
def _unimportable_cached(module: str, file: str | None, path: tuple[str, ...]) -> str | None:
    """Whether a fresh interpreter with this ``sys.path`` and the same meta-path finders
    (editable installs add one through a ``.pth`` file) would find ``module``'s package."""
    import importlib.machinery

    top = module.partition(".")[0]
    if top in sys.builtin_module_names or importlib.machinery.FrozenImporter.find_spec(top):
        return None
    spec = importlib.machinery.PathFinder.find_spec(top, list(path))
    if spec is None:
        for finder in sys.meta_path:
            if finder in (importlib.machinery.PathFinder, importlib.machinery.BuiltinImporter,
                          importlib.machinery.FrozenImporter) or type(finder).__module__.startswith("_pytest"):
                continue  # pytest's rewriting hook finds test modules only in this process
            try:
                spec = finder.find_spec(top, None)
            except Exception:
                continue
            if spec is not None:
                return None
        return f"is not on sys.path (it was imported from {file or 'nowhere'} by other means)"
    if "." not in module and file and spec.origin and os.path.realpath(spec.origin) != os.path.realpath(file):
        return f"is found at {spec.origin} on sys.path, not at {file} where it was imported from"
    return None


def main_script() -> str | None:
    """The owner's ``__main__`` script, if children should import it by name (a ``.py`` file run as
    ``python script.py``; not ``python -m``, a console script or an interactive session)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or getattr(main, "__spec__", None) is not None or not path:
        return None
    return os.path.abspath(path) if path.endswith(".py") else None


def _unimportable(module: str) -> str | None:
    if module in ("__main__", "__mp_main__"):
        if main_script() is None:
            return "is the interactive session, a `python -m` module or a console script"
        return None
    mod = sys.modules.get(module)
    file = getattr(mod, "__file__", None)
    return _unimportable_cached(module, file, tuple(p for p in sys.path if isinstance(p, str)))


def check_importable(fn: Callable[..., Any]) -> None:
    """Refuse lambdas and local functions: they cannot be found by name in a worker."""
    __tracebackhide__ = True
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    qualname = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if qualname is None or module is None:
        return  # a partial or callable instance: pickling decides
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise TypeError(NOT_IMPORTABLE.format(fn=fn))
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if obj is not fn and getattr(obj, "__func__", None) is not getattr(fn, "__func__", fn):
        raise TypeError(NOT_IMPORTABLE.format(fn=fn))
