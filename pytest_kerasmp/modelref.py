"""ModelRef: how a Keras model crosses a process boundary, by reference, loaded once per process."""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import Any

_cache: dict[tuple[Any, ...], Any] = {}


def _stat_key(path: str | None) -> tuple[int, int] | None:
    if path is None:
        return None
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A picklable reference to a Keras model: a saved ``.keras`` file or an importable builder.

    ``load()`` builds the model in the calling process, once: later calls return the cached
    model until the file (or weights file) changes. Files load in Keras' safe mode.
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

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, compile: bool = True) -> ModelRef:
        """A model saved with ``model.save("name.keras")``."""
        return cls(path=os.path.abspath(os.fspath(path)), compile=compile)

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

    def load(self) -> Any:
        """The model, loaded at most once per process (reloaded when its file changed)."""
        key = (self, _stat_key(self.path), _stat_key(self.weights))
        model = _cache.get(key)
        if model is None:
            model = self._build()
            for old in [k for k in _cache if k[0] == self]:
                del _cache[old]
            _cache[key] = model
        return model

    def _build(self) -> Any:
        import keras

        if self.path is not None:
            return keras.saving.load_model(self.path, compile=self.compile, safe_mode=True)
        assert self.builder is not None
        module, _, attr = self.builder.partition(":")
        fn = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
        model = fn(**dict(self.builder_kwargs))  # type: ignore[operator]
        if self.weights is not None:
            model.load_weights(self.weights)
        return model


def loaded_models() -> int:
    """How many models this process holds in its ModelRef cache."""
    return len(_cache)
