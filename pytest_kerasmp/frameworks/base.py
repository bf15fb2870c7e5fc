"""The interface every Keras backend's adapter implements (see the package docstring)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

#: Brings a framework's start-up messages back in the plugin's processes ("1").
LOGS_ENV = "PYTEST_KERASMP_TF_LOGS"


class SlotLike(Protocol):
    """What an adapter reads of a device slot (``slots.devices.DeviceSlot`` has it)."""

    @property
    def kind(self) -> str: ...

    @property
    def cores(self) -> tuple[int, ...]: ...

    @property
    def memory_limit_mb(self) -> int | None: ...

    @property
    def threads(self) -> int | None: ...


class Forward(Protocol):
    """A compiled forward function: numpy batches in, numpy batches out (one per output)."""

    def __call__(self, *inputs: Any) -> list[Any]: ...

    def traces(self) -> int:
        """How many times it was traced (compiled) so far."""
        ...


class Framework:
    """One Keras backend: what the plugin must know of it, and nothing more.

    Subclasses set :attr:`name` (the ``KERAS_BACKEND`` value) and :attr:`module` (the module
    imported for it) and override what differs; the defaults suit a framework that needs
    nothing beyond the generic slot environment.
    """

    name = ""
    module = ""
    #: How messages name it ("TensorFlow").
    title = ""
    #: Start-up lines that are chatter (kept in the output tail for errors, not printed).
    chatter: re.Pattern[str] | None = None
    #: Chatter only on a CPU slot (a failed GPU probe: on a GPU slot it says why no GPU was found).
    cpu_chatter: re.Pattern[str] | None = None

    # ------------------------------------------------------------------ before the import

    def environ(self, slot: SlotLike, growth: bool) -> dict[str, str]:
        """Environment variables that pin this framework to ``slot`` (its threads; on a GPU,
        memory growth or the slot's cap), set before it is imported."""
        return {}

    def preload_environ(self) -> dict[str, str]:
        """Environment variables a forkserver needs before it imports this framework (so that
        the children it forks can still initialise their devices)."""
        return {}

    def quiet_environ(self) -> dict[str, str]:
        """Environment variables that keep its start-up messages quiet in a child."""
        return {}

    def memory_growth(self, environ: dict[str, str]) -> bool:
        """Whether a process with ``environ`` grows its GPU memory (for the placement table)."""
        return False

    # ------------------------------------------------------------------- after the import

    def imported(self) -> Any:
        """The framework's module if this process imported it, else None (never imports it)."""
        return sys.modules.get(self.module)

    def initialized(self) -> bool:
        """Whether it has already initialised its devices here (too late to pin)."""
        return False

    def configure(self, module: Any, slot: SlotLike) -> None:
        """Apply the slot through the framework's own API, right after its import."""

    #: Whether a warm child imports Keras too (it does not start the devices on this backend).
    warm_keras = False
    #: The framework's own live object type (an attribute of its module), refused by the
    #: transport, and what an error calls it: e.g. ("Variable", "tf.Variable").
    live_type: tuple[str, str] | None = None

    def warm_import(self) -> None:
        """Import it (a warm child pays the import once, before any task), and Keras with it
        where that is safe (``warm_keras``)."""
        importlib.import_module(self.module)
        if self.warm_keras:
            importlib.import_module("keras")

    def seed(self, module: Any, seed: int, determinism: bool) -> None:
        """Seed it (and turn on its op determinism), right after its import."""

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.module)
        except importlib.metadata.PackageNotFoundError:
            return None

    # ------------------------------------------------------------------------ the work

    def forward(self, model: Any, inputs: Sequence[tuple[tuple[Any, ...], str, str]]) -> Forward:
        """``model``'s forward pass compiled once for every batch size of ``inputs``
        (per-sample shape, dtype, name), for the inference server."""
        raise NotImplementedError(f"{self.name}: no compiled forward function")

    def live_kind(self, obj: Any) -> str | None:
        """What kind of live framework object ``obj`` is (refused by the transport), or None;
        never imports the framework (a module still being imported has no type yet)."""
        if self.live_type is None:
            return None
        attribute, label = self.live_type
        kind = getattr(sys.modules.get(self.module), attribute, None)
        return label if isinstance(kind, type) and isinstance(obj, kind) else None

    #: Whether a cluster task's own server listens on every interface whatever address it is
    #: told (TensorFlow's gRPC server): its tasks then run in a private network (``netns``).
    cluster_listens_everywhere = False

    def cluster_environ(self, spec: dict[str, list[str]], task_type: str, index: int) -> dict[str, str]:
        """The environment of task ``(task_type, index)`` of a local cluster ``spec``."""
        raise NotImplementedError(f"{self.name}: no multi-process cluster")

    def init_distributed(self) -> None:
        """In a cluster task: join the other tasks, from the environment of
        :meth:`cluster_environ` (nothing for a framework whose strategy reads it itself)."""

    def is_chatter(self, line: str, slot_kind: str) -> bool:
        """Whether ``line`` a child printed is start-up chatter on a slot of ``slot_kind``."""
        if self.chatter is not None and self.chatter.match(line):
            return True
        return slot_kind == "CPU" and self.cpu_chatter is not None and bool(self.cpu_chatter.match(line))


@dataclasses.dataclass(frozen=True)
class CompiledForward:
    """A :class:`Forward` made of a callable and its trace counter."""

    fn: Callable[..., list[Any]]
    count: Callable[[], int]

    def __call__(self, *inputs: Any) -> list[Any]:
        return self.fn(*inputs)

    def traces(self) -> int:
        return self.count()
