"""What crosses a process boundary: pickling with large arrays in shared memory, references only.

Large numpy arrays travel as files in ``/dev/shm``: the sender writes one, the receiver maps
it and unlinks it at once, so the name never outlives the hand-over and the memory lives as
long as the received array (no copy on the receiving side). Segment names start with
``kerasmp_<creator pid>_``, so the owner of a crashed process can sweep what it left.

Live Keras models, layers, optimizers and variables are refused: they cross as a
:class:`~pytest_kerasmp.modelref.ModelRef`.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import mmap
import os
import pickle
import secrets
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

SHM_DIR = "/dev/shm"
#: Arrays of at least this many bytes go through shared memory.
SHM_MIN_BYTES = 64 * 1024
PREFIX = "kerasmp_"

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

_counter = itertools.count()
_MAP_FLAGS = mmap.MAP_SHARED


@dataclasses.dataclass(frozen=True)
class ShmArray:
    """A numpy array waiting in a shared-memory file."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def segment_prefix(pid: int | None = None) -> str:
    return f"{PREFIX}{os.getpid() if pid is None else pid}_"


def put_array(array: np.ndarray) -> ShmArray:
    """Copy ``array`` into a new shared-memory file (the caller owns it until taken)."""
    import numpy as np

    name = f"{segment_prefix()}{next(_counter)}_{secrets.token_hex(4)}"
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, array.nbytes)
        with mmap.mmap(fd, array.nbytes, flags=_MAP_FLAGS) as mm:
            np.copyto(np.ndarray(array.shape, array.dtype, buffer=mm), array, casting="no")
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return ShmArray(name, tuple(array.shape), array.dtype.str)


def take_array(ref: ShmArray) -> np.ndarray:
    """Map a shared-memory array and unlink its name; the memory lives as long as the array."""
    import numpy as np

    path = os.path.join(SHM_DIR, ref.name)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size, flags=_MAP_FLAGS) if size else None
    finally:
        os.close(fd)
        os.unlink(path)
    if mm is None:
        return np.empty(ref.shape, np.dtype(ref.dtype))
    return np.ndarray(ref.shape, np.dtype(ref.dtype), buffer=mm)


def unlink_segments(names: Iterable[str]) -> None:
    for name in names:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass


def sweep_segments(pid: int) -> list[str]:
    """Unlink every segment created by process ``pid``; returns their names."""
    prefix = segment_prefix(pid)
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    except FileNotFoundError:
        return []
    unlink_segments(names)
    return names


def _live_kind(obj: Any) -> str | None:
    """What kind of live framework object ``obj`` is, without importing a framework."""
    keras = sys.modules.get("keras")
    if keras is not None:
        if isinstance(obj, keras.Model):
            return "keras.Model"
        if isinstance(obj, keras.layers.Layer):
            return "keras layer"
        if isinstance(obj, keras.optimizers.Optimizer):
            return "keras optimizer"
        if isinstance(obj, keras.Variable):
            return "keras.Variable"
    tf = sys.modules.get("tensorflow")
    if tf is not None and hasattr(tf, "Variable") and isinstance(obj, tf.Variable):
        return "tf.Variable"
    return None


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, what: str, created: list[str]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.what = what
        self.created = created

    def reducer_override(self, obj: Any) -> Any:
        np = sys.modules.get("numpy")  # an array can only exist once numpy is imported
        if np is not None and type(obj) is np.ndarray and obj.nbytes >= SHM_MIN_BYTES and not obj.dtype.hasobject:
            ref = put_array(obj)
            self.created.append(ref.name)
            return take_array, (ref,)
        kind = _live_kind(obj)
        if kind is not None:
            raise TypeError(LIVE_OBJECT.format(what=self.what, kind=kind))
        return NotImplemented


def dumps(obj: Any, what: str, created: list[str]) -> bytes:
    """Pickle ``obj``; large arrays go to shared memory and their names into ``created``.

    Raises:
        TypeError: ``obj`` holds a live model (names ModelRef as the fix) or cannot be
            pickled; the message names ``what``. Segments made before the failure are removed.
    """
    buf = io.BytesIO()
    mark = len(created)
    try:
        _Pickler(buf, what, created).dump(obj)
    except (TypeError, pickle.PicklingError, AttributeError) as exc:
        unlink_segments(created[mark:])
        del created[mark:]
        if isinstance(exc, TypeError) and str(exc).startswith(what):
            raise  # our own message (a live model): already names what and the fix
        raise TypeError(NOT_PICKLABLE.format(what=what, error=exc)) from exc
    return buf.getvalue()


def dumps_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, list[str]]:
    """Pickle a call for a worker, naming the argument that cannot travel."""
    check_importable(fn)
    created: list[str] = []
    parts = [dumps(fn, f"function {fn!r}", created)]
    try:
        parts += [dumps(a, f"argument {i} of {_name(fn)}", created) for i, a in enumerate(args)]
        parts += [dumps(v, f"argument {k!r} of {_name(fn)}", created) for k, v in kwargs.items()]
        parts.append(pickle.dumps(list(kwargs)))
    except TypeError:
        unlink_segments(created)
        raise
    return pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL), created


def loads_call(data: bytes) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    parts = pickle.loads(data)
    keys = pickle.loads(parts[-1])
    values = [pickle.loads(p) for p in parts[1:-1]]
    n_args = len(values) - len(keys)
    return pickle.loads(parts[0]), tuple(values[:n_args]), dict(zip(keys, values[n_args:], strict=True))


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def check_importable(fn: Callable[..., Any]) -> None:
    """Refuse lambdas and local functions: they cannot be found by name in a worker."""
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
