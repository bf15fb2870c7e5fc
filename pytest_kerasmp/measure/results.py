"""Compare two results (serial vs parallel, or two runs) and name the first difference. No pytest.

A result may be an array, a number, or nested lists, tuples and dicts of them (a model's
weights, a dict of metrics). :func:`first_difference` walks both in order and describes the
first array or element that differs: ``weights[3] differs at index (2, 0): 0.125 vs 0.1251
(|diff| 1e-04; 17 of 64 elements differ)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def first_difference(a: Any, b: Any, *, rtol: float = 0.0, atol: float = 0.0, name: str = "result") -> str | None:
    """None when ``a`` and ``b`` agree (exactly by default, else within ``rtol``/``atol``);
    otherwise one line naming the first differing array and element."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
            return f"{name}: a {type(a).__name__} vs a {type(b).__name__}"
        if list(a) != list(b):
            return f"{name}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            found = first_difference(a[key], b[key], rtol=rtol, atol=atol, name=f"{name}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and not _is_numeric_sequence(a):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return f"{name}: {len(a)} items vs {_len_text(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, rtol=rtol, atol=atol, name=f"{name}[{i}]")
            if found:
                return found
        return None
    import numpy as np  # lazily: importing this module stays light

    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape:
        return f"{name}: shape {x.shape} vs {y.shape}"
    if x.dtype.kind in "fc" or y.dtype.kind in "fc":
        same = np.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
    else:
        same = x == y
    same = np.asarray(same)
    if same.all():
        return None
    bad = int(np.size(same) - np.count_nonzero(same))
    index = tuple(int(i) for i in np.argwhere(~same)[0]) if x.ndim else ()
    u, v = x[index].item(), y[index].item()
    diff = f" (|diff| {abs(float(u) - float(v)):.3g})" if x.dtype.kind in "fciu" and y.dtype.kind in "fciu" else ""
    where = f" at index {index}" if x.ndim else ""
    return f"{name} differs{where}: {u!r} vs {v!r}{diff}; {bad} of {x.size} elements differ"


def _is_numeric_sequence(a: Any) -> bool:
    return bool(a) and all(isinstance(v, (int, float, complex, bool)) or (type(v).__module__ == "numpy" and getattr(v, "ndim", 1) == 0) for v in a)


def _len_text(b: Any) -> str:
    return f"{len(b)} items" if isinstance(b, (list, tuple)) else f"a {type(b).__name__}"


def assert_same(a: Any, b: Any, *, rtol: float = 0.0, atol: float = 0.0, name: str = "result") -> None:
    """Raise AssertionError naming the first difference (a ready-made ``check`` for
    ``kerasmp_speedup``: ``check=assert_same``)."""
    found = first_difference(a, b, rtol=rtol, atol=atol, name=name)
    if found:
        raise AssertionError(found)
