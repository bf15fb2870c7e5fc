"""Find the session's devices and plan them as device slots.

Pure planning: no TensorFlow, Keras or other framework import here, and nothing in this
module changes the process. ``pinning.pin_process`` applies a slot.

A *device slot* is what one process may use: one GPU (possibly shared with other slots), or,
without a GPU, a disjoint set of CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from pytest_kerasmp import frameworks
from pytest_kerasmp.errors import KerasMPWarning

#: Fake the GPU list, for tests and dry runs on machines without one: a count ("2") or
#: comma-separated names ("A100,A100"). Detection then runs no nvidia-smi.
T = TypeVar("T")

FAKE_GPUS_ENV = "PYTEST_KERASMP_FAKE_GPUS"

NVIDIA_SMI_TIMEOUT_S = 10.0

#: plan_slots asked for more CPU slots than the cores it plans over; names where they came from.
CORES_REUSED_IN_SCOPE = (
    "kerasmp: {what} planned over {scope}, which has {cores} {core_word} "
    "{core_set}; cores are reused round-robin, so the slots share cores and timings will be "
    "slower than planned; {advice}"
)
ADVICE_SESSION = "use --kerasmp-gpus={cores} or fewer"
ADVICE_OUTSIDE = "ask for {cores} or fewer, or run on more cores"
ADVICE_SHARE = (
    "ask for {cores} or fewer, or give this process more of the session: fewer xdist "
    "workers (-n) or more slots (--kerasmp-gpus)"
)

_SMI_LINE = re.compile(r"^GPU (\d+): (.*?)(?: \(UUID: ([^)]+)\))?\s*$")


@dataclasses.dataclass(frozen=True)
class GPU:
    """One GPU as the session sees it.

    ``id`` is how ``CUDA_VISIBLE_DEVICES`` names it in the session: the physical index, or
    the entry of an outer ``CUDA_VISIBLE_DEVICES`` (an index or a UUID), never renumbered.
    """

    id: str
    name: str = ""
    uuid: str = ""


@dataclasses.dataclass(frozen=True)
class DeviceSlot:
    """What one pinned process may use. Picklable and JSON-serialisable.

    Attributes:
        index: Position in the session's plan (``slot0`` ...).
        kind: ``"GPU"`` or ``"CPU"``.
        gpu: The GPU as ``CUDA_VISIBLE_DEVICES`` names it outside the pinned process
            (``None`` for a CPU slot).
        cores: CPU cores the process is bound to; empty for GPU slots (no binding).
        shared: Another slot uses the same GPU or cores.
        memory_limit_mb: Per-process GPU memory cap, or ``None``.
        gpu_name: Model name from detection, for reports.
        node: The Ray node the slot lies on (its node id), or ``""`` for this machine;
            its cores are then numbered within that node's usable cores.
    """

    index: int
    kind: Literal["GPU", "CPU"]
    gpu: str | None = None
    cores: tuple[int, ...] = ()
    shared: bool = False
    memory_limit_mb: int | None = None
    gpu_name: str = ""
    node: str = ""

    @property
    def name(self) -> str:
        return f"slot{self.index}"

    @property
    def tf_device(self) -> str:
        """The TensorFlow device string to use *inside* the pinned process."""
        return "/GPU:0" if self.kind == "GPU" else "/CPU:0"

    @property
    def threads(self) -> int | None:
        """Thread cap for TensorFlow and OpenMP in the pinned process (CPU slots only)."""
        return len(self.cores) if self.kind == "CPU" else None

    def describe(self) -> str:
        where = f" on node {self.node[:8]}" if self.node else ""
        if self.kind == "GPU":
            return f"{self.name} GPU {self.gpu}{where}"
        return f"{self.name} cores {{{', '.join(map(str, self.cores))}}}{where}"

    def environ(self, *, memory_growth: bool | None = None) -> dict[str, str]:
        """Environment variables that pin a process to this slot, for the session's Keras
        backend (its adapter adds its own: TensorFlow's thread counts and memory growth).

        Set them before the framework initialises its devices. ``memory_growth`` defaults to
        on for every GPU slot without a memory cap: a pinned process may share its GPU with
        the process that started it or with another pool on the same slot, and a framework's
        default (map nearly all of the GPU) would starve them. A cap replaces growth.
        """
        growth = True if memory_growth is None else memory_growth
        if self.kind == "GPU":
            env = {"CUDA_VISIBLE_DEVICES": str(self.gpu)}
        else:
            n = str(len(self.cores))
            env = {"CUDA_VISIBLE_DEVICES": "-1", "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}
        return {**env, **frameworks.active().environ(self, growth)}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_text(self) -> str:
        return json.dumps(self.to_json())

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceSlot:
        fields = dict(data)
        fields["cores"] = tuple(fields.get("cores", ()))
        return cls(**fields)


def parse_nvidia_smi(text: str) -> list[GPU]:
    """GPUs from the output of ``nvidia-smi -L``; lines that are not GPUs (MIG) are skipped."""
    gpus = []
    for line in text.splitlines():
        m = _SMI_LINE.match(line.strip())
        if m:
            gpus.append(GPU(id=m.group(1), name=m.group(2), uuid=m.group(3) or ""))
    return gpus


def _physical_gpus(env: Mapping[str, str]) -> list[GPU]:
    fake = env.get(FAKE_GPUS_ENV)
    if fake is not None:
        fake = fake.strip()
        if fake.isdigit():
            names = [f"Fake GPU {i}" for i in range(int(fake))]
        else:
            names = [n.strip() for n in fake.split(",") if n.strip()]
        return [GPU(id=str(i), name=n, uuid=f"GPU-fake-{i}") for i, n in enumerate(names)]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "-L"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # list every GPU of the machine
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        warnings.warn(
            f"kerasmp: {smi} -L failed ({exc}); treating this machine as having no GPU; "
            f"check the NVIDIA driver or set {FAKE_GPUS_ENV}",
            KerasMPWarning,
            stacklevel=2,
        )
        return []
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 else []


def apply_visible_devices(gpus: Sequence[GPU], visible: str | None) -> list[GPU]:
    """Restrict ``gpus`` to an outer ``CUDA_VISIBLE_DEVICES``, keeping its names.

    As CUDA does, the list ends at the first entry that names no GPU; an empty value (or
    ``-1``) means no GPU.
    """
    if visible is None:
        return list(gpus)
    chosen = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.startswith("MIG-") and gpus:
            chosen.append(GPU(id=entry, name="MIG instance"))
            continue
        match = next((g for g in gpus if entry and entry in (g.id, g.uuid[: len(entry)])), None)
        if match is None:
            break
        chosen.append(dataclasses.replace(match, id=entry))
    return chosen


def detect_gpus(env: Mapping[str, str] | None = None) -> list[GPU]:
    """The GPUs this session may use, found without importing TensorFlow.

    Uses ``nvidia-smi -L`` (bounded by a timeout) or ``PYTEST_KERASMP_FAKE_GPUS``, then
    applies an outer ``CUDA_VISIBLE_DEVICES``.
    """
    env = os.environ if env is None else env
    return apply_visible_devices(_physical_gpus(env), env.get("CUDA_VISIBLE_DEVICES"))


def usable_cores() -> tuple[int, ...]:
    """The cores this process may run on (its CPU affinity)."""
    import psutil

    return tuple(sorted(psutil.Process().cpu_affinity() or range(os.cpu_count() or 1)))


def parse_slot_count(value: int | str) -> int | Literal["auto"]:
    """``"auto"`` or a positive integer; ``ValueError`` otherwise."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if not re.fullmatch(r"\+?\d+", text):
            raise ValueError(f"{value!r} is not a positive integer or 'auto'")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{value!r} is not a positive integer or 'auto'")
    return value


def split_evenly(items: Sequence[T], n: int) -> list[tuple[T, ...]]:
    """``n`` disjoint, contiguous, near-equal parts of ``items`` (the first parts one larger);
    with ``n`` above ``len(items)``, single items round-robin. Cores among CPU slots, slots
    among xdist workers."""
    if n > len(items):
        return [(items[i % len(items)],) for i in range(n)]
    base, extra = divmod(len(items), n)
    parts, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        parts.append(tuple(items[start : start + size]))
        start += size
    return parts


@dataclasses.dataclass(frozen=True)
class Scope:
    """What :func:`plan_slots` plans over in this process when given no devices.

    Set by the plugin for a pinned pytest process (the session's slots, or an xdist
    worker's part of them) and by ``pin_process`` for a pool worker or server (its slot).
    Valid in the process that set it only (a forked copy plans from its own affinity).
    """

    slots: tuple[DeviceSlot, ...]
    description: str
    pid: int

    def gpus(self) -> list[GPU]:
        seen: dict[str, GPU] = {}
        for s in self.slots:
            if s.kind == "GPU" and s.gpu is not None:
                seen.setdefault(s.gpu, GPU(id=s.gpu, name=s.gpu_name))
        return list(seen.values())

    def cores(self) -> tuple[int, ...]:
        return tuple(sorted({c for s in self.slots for c in s.cores}))

    def memory_limit_mb(self) -> int | None:
        return next((s.memory_limit_mb for s in self.slots if s.memory_limit_mb), None)


_scope: Scope | None = None


def set_scope(slots: Sequence[DeviceSlot], description: str) -> None:
    """Make ``slots`` what :func:`plan_slots` plans over in this process by default."""
    global _scope
    _scope = Scope(tuple(slots), description, os.getpid())


def current_scope() -> Scope | None:
    """The scope :func:`set_scope` set in this very process, or ``None``."""
    return _scope if _scope is not None and _scope.pid == os.getpid() else None


def planning_scope() -> str:
    """What :func:`plan_slots` plans over here when given no devices, in words."""
    scope = current_scope()
    if scope is not None:
        return scope.description
    return "this process's CPU affinity and the detected GPUs"


def plan_slots(
    n: int | str = "auto",
    *,
    gpus: Iterable[GPU] | None = None,
    cores: Sequence[int] | None = None,
    memory_limit_mb: int | None = None,
) -> tuple[DeviceSlot, ...]:
    """Plan ``n`` device slots over the session's GPUs, or over its CPU cores without GPU.

    With G >= 1 GPUs slot i uses GPU (i mod G); slots that share a GPU are marked shared.
    Without GPU the usable cores are split into ``n`` disjoint sets. ``"auto"`` is one slot
    per GPU, or one CPU slot per usable core. Every GPU slot gets memory growth when pinned,
    unless it has a memory cap.

    Which devices: in a process that pytest-kerasmp pinned, what that process may use (its
    *scope*, :func:`planning_scope` says it in words): the session's slots in a pytest
    process without xdist, the xdist worker's part of them under ``-n``, its own slot in a
    pool worker or server; it inherits the session's memory cap. Elsewhere the detected
    GPUs and this process's CPU affinity. ``gpus`` or ``cores`` override either.

    Args:
        n: Number of slots, or ``"auto"``.
        gpus: The GPUs to plan over; the scope's, or detected, when omitted.
        cores: The usable cores; the scope's, or this process's affinity, when omitted.
        memory_limit_mb: Per-process GPU memory cap for every GPU slot.
    """
    count = parse_slot_count(n)
    if memory_limit_mb is not None and memory_limit_mb < 1:
        raise ValueError(f"memory_limit_mb={memory_limit_mb!r} must be a positive number of MB")
    scope = current_scope() if gpus is None and cores is None else None
    if scope is not None:
        gpus, cores = scope.gpus(), scope.cores()
        if memory_limit_mb is None:
            memory_limit_mb = scope.memory_limit_mb()
    gpu_list = detect_gpus() if gpus is None else list(gpus)
    if gpu_list:
        if count == "auto":
            count = len(gpu_list)
        chosen = [gpu_list[i % len(gpu_list)] for i in range(count)]
        uses = Counter(g.id for g in chosen)
        return tuple(
            DeviceSlot(
                index=i,
                kind="GPU",
                gpu=g.id,
                shared=uses[g.id] > 1,
                memory_limit_mb=memory_limit_mb,
                gpu_name=g.name,
            )
            for i, g in enumerate(chosen)
        )
    core_list = tuple(sorted(usable_cores() if cores is None else cores))
    if not core_list:
        raise ValueError("no usable CPU core to plan slots on")
    if count == "auto":
        count = len(core_list)
    if count > len(core_list):
        if scope is not None:
            where, advice = scope.description, ADVICE_SHARE
        elif cores is not None:
            where, advice = "the cores it was given", ADVICE_OUTSIDE
        else:
            where, advice = "this process's CPU affinity", ADVICE_OUTSIDE
        warnings.warn(
            cores_reused(count, core_list, where, advice),
            KerasMPWarning,
            stacklevel=2,
        )
    sets = split_evenly(core_list, count)
    core_uses = Counter(c for s in sets for c in s)
    return tuple(
        DeviceSlot(index=i, kind="CPU", cores=s, shared=any(core_uses[c] > 1 for c in s))
        for i, s in enumerate(sets)
    )


def plural(n: int, word: str) -> str:
    """``plural(1, "GPU")`` -> ``"1 GPU"``, ``plural(2, "core")`` -> ``"2 cores"``."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def cores_reused(slots: int, cores: Sequence[int], scope: str, advice: str, what: str = "") -> str:
    """The warning for more CPU slots than cores in ``scope``; ``what`` asked for them."""
    return CORES_REUSED_IN_SCOPE.format(
        what=what or f"plan_slots({slots})", scope=scope, cores=len(cores), core_word="core" if len(cores) == 1 else "cores",
        core_set="{" + ", ".join(map(str, cores)) + "}", advice=advice.format(cores=len(cores)),
    )


def dumps_slots(slots: Sequence[DeviceSlot]) -> str:
    return json.dumps([s.to_json() for s in slots])


def loads_slots(text: str) -> tuple[DeviceSlot, ...]:
    return tuple(DeviceSlot.from_json(d) for d in json.loads(text))
