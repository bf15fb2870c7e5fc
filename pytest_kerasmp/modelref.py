"""ModelRef: how a Keras model crosses a process boundary, by reference, loaded once per process."""

from __future__ import annotations

import collections
import dataclasses
import importlib
import os
import warnings
from pathlib import Path
from typing import Any

#: Models each process keeps loaded at most (least recently used first out); env
#: ``PYTEST_KERASMP_MODEL_CACHE`` changes it.
CACHE_SIZE = int(os.environ.get("PYTEST_KERASMP_MODEL_CACHE", "4"))
_cache: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()


def _freeze(value: Any, name: str) -> Any:
    """A hashable stand-in for a builder argument (lists, tuples and dicts of plain values
    kept apart by a tag, so :func:`_thaw` gives back the same types); refuses the rest."""
    if isinstance(value, list):
        return ("__list__", tuple(_freeze(v, name) for v in value))
    if isinstance(value, tuple):
        return ("__tuple__", tuple(_freeze(v, name) for v in value))
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"builder argument {name}={value!r} has a dict with keys that are not strings")
        return ("__dict__", tuple(sorted((k, _freeze(v, name)) for k, v in value.items())))
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"builder argument {name}={value!r} cannot key the per-process model cache "
            f"({type(value).__name__} is not hashable): pass plain values, lists, tuples or dicts of them"
        ) from None
    return value


class _FrozenKwargs(tuple):  # type: ignore[type-arg]
    """Builder arguments after :func:`_freeze` (a tuple, so it hashes and pickles as one)."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_FrozenKwargs, (tuple(self),))


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] in ("__list__", "__tuple__", "__dict__"):
        tag, items = value
        if tag == "__list__":
            return [_thaw(v) for v in items]
        if tag == "__tuple__":
            return tuple(_thaw(v) for v in items)
        return {k: _thaw(v) for k, v in items}
    return value


MODEL_FILE_MISSING = (
    "ModelRef.from_file: no model file at {path!r}{where}; save the model there first "
    "(model.save(path)) or fix the path"
)


def _stat_key(path: str | None) -> tuple[int, int] | None:
    if path is None:
        return None
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A picklable reference to a Keras model: a saved ``.keras`` file or an importable builder.

    ``load()`` builds the model in the calling process, once: later calls return the cached
    model until the file (or weights file) changes; each process keeps the
    :data:`CACHE_SIZE` most recently used models. Files load in Keras' safe mode; with
    ``compile=True`` (the default) the saved optimizer, loss and metrics are restored too,
    which ``evaluate`` and ``fit`` need and ``predict`` does not (``compile=False`` loads
    faster). Keras' warning that an unbuilt optimizer skipped its saved variables is not
    repeated in every worker.
    """

    path: str | None = None
    builder: str | None = None
    builder_kwargs: tuple[tuple[str, Any], ...] = ()
    weights: str | None = None
    compile: bool = True

    def __post_init__(self) -> None:
        if (self.path is None) == (self.builder is None):
            raise ValueError("a ModelRef needs exactly one of path= (a .keras file) or builder=")
        if self.path is not None and not self.path.endswith(".keras"):
            raise ValueError(f"path={self.path!r} is not a .keras file; save with model.save('x.keras')")
        if self.builder is not None and ":" not in self.builder:
            raise ValueError(f"builder={self.builder!r} must be 'package.module:function'")
        if not isinstance(self.builder_kwargs, _FrozenKwargs):  # dataclasses.replace passes them frozen
            frozen = tuple((k, _freeze(v, k)) for k, v in self.builder_kwargs)
            object.__setattr__(self, "builder_kwargs", _FrozenKwargs(frozen))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, compile: bool = True) -> ModelRef:
        """A model saved with ``model.save("name.keras")``; the file must exist now (checked
        here, so a typo fails at once rather than in every worker). For a file that exists
        only where the workers run (another Ray node), use ``ModelRef(path=...)``."""
        full = os.path.abspath(os.fspath(path))
        if not full.endswith(".keras"):
            raise ValueError(f"path={full!r} is not a .keras file; save with model.save('x.keras')")
        if not os.path.isfile(full):
            given = os.fspath(path)
            where = "" if os.path.isabs(given) else f" (given as {given!r}, from {os.getcwd()!r})"
            raise FileNotFoundError(MODEL_FILE_MISSING.format(path=full, where=where))
        return cls(path=full, compile=compile)

    @classmethod
    def from_builder(
        cls, target: str, *, weights: str | os.PathLike[str] | None = None, **kwargs: Any
    ) -> ModelRef:
        """A model built by calling ``package.module:function(**kwargs)``, then loading ``weights``.

        For models with custom layers: the builder's module defines and imports them.
        """
        return cls(
            builder=target,
            builder_kwargs=tuple(sorted(kwargs.items())),
            weights=None if weights is None else os.path.abspath(os.fspath(weights)),
        )

    @classmethod
    def save(cls, model: Any, directory: str | os.PathLike[str], name: str | None = None) -> ModelRef:
        """Save a live model as ``directory/name.keras`` and return its reference."""
        path = Path(directory) / f"{name or model.name}.keras"
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
        return cls.from_file(path)

    @property
    def kwargs(self) -> dict[str, Any]:
        """The builder's keyword arguments, as given."""
        return {k: _thaw(v) for k, v in self.builder_kwargs}

    def load(self) -> Any:
        """The model, loaded at most once per process (reloaded when its file changed)."""
        key = (self, _stat_key(self.path), _stat_key(self.weights))
        model = _cache.get(key)
        if model is not None:
            _cache.move_to_end(key)
            return model
        model = self._build()
        for old in [k for k in _cache if k[0] == self]:
            del _cache[old]
        _cache[key] = model
        while len(_cache) > max(1, CACHE_SIZE):
            _cache.popitem(last=False)
        return model

    def _build(self) -> Any:
        import keras

        if self.path is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                return keras.saving.load_model(self.path, compile=self.compile, safe_mode=True)
        assert self.builder is not None
        module, _, attr = self.builder.partition(":")
        fn: Any = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
        model = fn(**self.kwargs)
        if self.weights is not None:
            model.load_weights(self.weights)
        return model


def loaded_models() -> int:
    """How many models this process holds in its ModelRef cache."""
    return len(_cache)
