"""pytest-kerasmp: device slots, process-safe Keras worker pools and inference servers.

Importing this package imports nothing else: each public name below is loaded when first
used, so that the plugin's child processes import only what they need before they pin
themselves (never pytest, never the framework under Keras).

The house, bottom to top; a part imports only itself and the parts below it (checked by
``tests/test_layers.py``, which reads every import of every module, also inside functions),
and no module imports another in a circle:

``errors``
    every error and warning, and the messages tests match; imports nothing of the package.
``frameworks/``
    one module per Keras backend behind one small interface (``frameworks.base.Framework``):
    environment before the import, configuration after it, "already initialised?", the
    warm import, the server's compiled forward function, a cluster task's environment,
    seeding, quiet logs. Imports only ``errors``.
``slots/`` and ``modelref``
    find devices, plan slots, pin a process (``slots.pinning.pin_process``, the one pin
    function), record placement (and what each process listens on, ``slots.network``), lease
    slots to tests (``slots.leases``, the session's one lease table), seed; how a model crosses
    a process boundary.
``runtime/``
    the local execution backend, cut by what runs where: ``process/`` (a child's one
    lifecycle, its bootstrap, its output, owners, a cluster's private network), ``wire/``
    (messages, the shared-memory transport, shared arrays), ``pool/`` (``WorkerPool``, the
    task queue, the dispatcher; ``pool/child.py`` runs inside a worker), ``serve/``
    (``InferenceServer`` and its client; ``serve/child.py`` runs inside the server),
    ``cluster/`` (``KerasCluster``, ``TFCluster``, ports). Pools and servers reach their
    execution backend through ``runtime.backends`` (by name or object), never by importing
    one: ``ray/`` plugs in there.
``ray/``
    the Ray execution backend (actors, its dispatcher, the Ray server, local Ray clusters);
    imports ``runtime``, never the reverse.
``measure/``
    comparisons, statistics, the gate, reports, plots: pure, no processes; never imports
    ``runtime`` or ``ray``.
``load``
    offered load: sender processes that send requests at a rate (Poisson arrivals) to any
    client, and the search for the highest rate under a latency bound; imports ``runtime``
    and ``measure``.
``plugin/``
    the pytest layer: options, hooks, fixtures, the session guard, the speed gate; the only
    part that imports pytest (or xdist, pytest-benchmark).
"""

from __future__ import annotations

import importlib
import re
import warnings
from typing import TYPE_CHECKING, Any


#: Each public name -> the module it lives in, read from the one list of them (the imports
#: under ``if TYPE_CHECKING:`` below, which type checkers read), so that ``import
#: pytest_kerasmp`` imports nothing else: a name is loaded when first used.
def _public_names() -> dict[str, str]:
    # The source through the module's loader (a zip or an installed wheel alike), else the file.
    get_source = getattr(getattr(__spec__, "loader", None), "get_source", None)
    source = get_source(__name__) if get_source is not None else None
    if source is None:
        with open(__file__, encoding="utf-8") as file:
            source = file.read()
    found = re.findall(r"^    from pytest_kerasmp\.([\w.]+) import (\w+) as \2$", source, re.M)
    return {name: module for module, name in found}


_WHERE = _public_names()
#: Old names, loaded with a DeprecationWarning for one release: name -> (module, advice).
_MOVED = {
    "RemoteTraceback": ("errors", "import it from pytest_kerasmp.errors (it is the cause of an error, never raised)"),
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        moved_to, advice = _MOVED[name]
        warnings.warn(f"pytest_kerasmp.{name} is deprecated and goes in the next release: {advice}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"pytest_kerasmp.{moved_to}"), name)
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_kerasmp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pytest_kerasmp.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


if TYPE_CHECKING:
    from pytest_kerasmp.errors import ClusterClosedError as ClusterClosedError
    from pytest_kerasmp.errors import ClusterStartError as ClusterStartError
    from pytest_kerasmp.errors import ClusterTaskError as ClusterTaskError
    from pytest_kerasmp.errors import DeviceAlreadyInitializedError as DeviceAlreadyInitializedError
    from pytest_kerasmp.errors import KerasMPError as KerasMPError
    from pytest_kerasmp.errors import KerasMPWarning as KerasMPWarning
    from pytest_kerasmp.errors import PoolBrokenError as PoolBrokenError
    from pytest_kerasmp.errors import PoolClosedError as PoolClosedError
    from pytest_kerasmp.errors import RayConnectError as RayConnectError
    from pytest_kerasmp.errors import ServerBusyError as ServerBusyError
    from pytest_kerasmp.errors import ServerClosedError as ServerClosedError
    from pytest_kerasmp.errors import ServerDiedError as ServerDiedError
    from pytest_kerasmp.errors import TaskCancelledError as TaskCancelledError
    from pytest_kerasmp.errors import TaskTimeoutError as TaskTimeoutError
    from pytest_kerasmp.errors import Terminated as Terminated
    from pytest_kerasmp.errors import WorkerCrashedError as WorkerCrashedError
    from pytest_kerasmp.errors import WorkerStartupError as WorkerStartupError
    from pytest_kerasmp.load import LoadGenerator as LoadGenerator
    from pytest_kerasmp.load import offer_in_process as offer_in_process
    from pytest_kerasmp.load import search_rate as search_rate
    from pytest_kerasmp.measure.latency import LoadPoint as LoadPoint
    from pytest_kerasmp.measure.latency import RateSearch as RateSearch
    from pytest_kerasmp.measure.latency import quantile_bounds as quantile_bounds
    from pytest_kerasmp.measure.results import assert_same as assert_same
    from pytest_kerasmp.measure.results import first_difference as first_difference
    from pytest_kerasmp.modelref import ModelRef as ModelRef
    from pytest_kerasmp.ray.backend import RayBackend as RayBackend
    from pytest_kerasmp.ray.cluster import LocalRayCluster as LocalRayCluster
    from pytest_kerasmp.ray.cluster import plan_ray_slots as plan_ray_slots
    from pytest_kerasmp.ray.serveclient import RayServeClient as RayServeClient
    from pytest_kerasmp.runtime.cluster.cluster import KerasCluster as KerasCluster
    from pytest_kerasmp.runtime.cluster.cluster import TFCluster as TFCluster
    from pytest_kerasmp.runtime.cluster.cluster import init_distributed as init_distributed
    from pytest_kerasmp.runtime.cluster.cluster import task_info as task_info
    from pytest_kerasmp.runtime.pool.taskqueue import PoolStats as PoolStats
    from pytest_kerasmp.runtime.pool.workerpool import WorkerPool as WorkerPool
    from pytest_kerasmp.runtime.serve.client import InferenceClient as InferenceClient
    from pytest_kerasmp.runtime.serve.server import InferenceServer as InferenceServer
    from pytest_kerasmp.runtime.wire.shared import shared_empty as shared_empty
    from pytest_kerasmp.slots.devices import GPU as GPU
    from pytest_kerasmp.slots.devices import DeviceSlot as DeviceSlot
    from pytest_kerasmp.slots.devices import detect_gpus as detect_gpus
    from pytest_kerasmp.slots.devices import plan_slots as plan_slots
    from pytest_kerasmp.slots.pinning import configure_tensorflow as configure_tensorflow
    from pytest_kerasmp.slots.pinning import current_slot as current_slot
    from pytest_kerasmp.slots.pinning import pin_process as pin_process
    from pytest_kerasmp.slots.seeding import derive_seed as derive_seed
    from pytest_kerasmp.slots.seeding import seed_everything as seed_everything
