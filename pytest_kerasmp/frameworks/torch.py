"""The PyTorch backend of Keras: what pinning, servers, clusters and seeding need of it.

Keras' torch backend picks its device when Keras is imported, by ``torch.cuda.is_available()``,
which initialises CUDA's driver and so poisons fork; pinning names the device instead
(``KERAS_TORCH_DEVICE``) and has torch ask NVML (``PYTORCH_NVML_BASED_CUDA_CHECK=1``), so a
forkserver that imported Keras on torch still forks children that can use CUDA. Threads and
the memory cap go through torch's own API right after ``import torch``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from pytest_kerasmp.frameworks.base import CompiledForward, Forward, Framework, SlotLike
from pytest_kerasmp.frameworks.jax import ranks

#: Keeps ``torch.cuda.is_available()`` from initialising CUDA (it asks NVML instead).
NVML_CHECK = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
#: Bound on the rendezvous (a task waiting for task 0's store); the cluster's run bound ends it sooner.
STORE_TIMEOUT_S = 300


class Adapter(Framework):
    name = "torch"
    module = "torch"
    title = "PyTorch"
    live_type = ("Tensor", "torch.Tensor")
    warm_keras = True
    #: Keras imports TensorFlow when it is installed (saving, seeding): its absl banner and
    #: glog-format info lines are chatter here too.
    chatter = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|I\d{4} [\d:.]+ )")

    def quiet_environ(self) -> dict[str, str]:
        import os

        return {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}

    def environ(self, slot: SlotLike, growth: bool) -> dict[str, str]:
        # Only the pinned GPU is visible, as cuda:0; growth is torch's own way (it reserves
        # nothing up front); a cap is a per-process fraction, applied in configure().
        device = "cuda:0" if slot.kind == "GPU" else "cpu"
        return {**NVML_CHECK, "KERAS_TORCH_DEVICE": device}

    def preload_environ(self) -> dict[str, str]:
        return dict(NVML_CHECK)

    def memory_growth(self, environ: dict[str, str]) -> bool:
        try:
            slot = json.loads(environ.get("PYTEST_KERASMP_SLOT", ""))
        except ValueError:
            return False
        return slot.get("kind") == "GPU" and slot.get("memory_limit_mb") is None

    def initialized(self) -> bool:
        """Whether CUDA was initialised here (or this process was forked from one that had)."""
        torch = sys.modules.get("torch")
        cuda = getattr(torch, "cuda", None)
        if cuda is None or not hasattr(cuda, "is_initialized"):
            return False
        return bool(cuda.is_initialized() or cuda._is_in_bad_fork())

    def configure(self, module: Any, slot: SlotLike) -> None:
        """Threads from the slot's cores; a GPU slot's cap as a memory fraction of the GPU."""
        torch = module
        if slot.threads:
            torch.set_num_threads(slot.threads)
            try:
                torch.set_num_interop_threads(slot.threads)
            except RuntimeError:  # set already, or parallel work started: once only in torch
                pass
        if slot.kind == "GPU" and slot.memory_limit_mb is not None and torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory / 2**20
            torch.cuda.set_per_process_memory_fraction(min(slot.memory_limit_mb / total, 1.0), 0)

    def seed(self, module: Any, seed: int, determinism: bool) -> None:
        module.manual_seed(seed)
        if determinism:
            module.use_deterministic_algorithms(True, warn_only=True)

    def forward(self, model: Any, inputs: Sequence[tuple[tuple[Any, ...], str, str]]) -> Forward:
        """The model called eagerly under ``torch.inference_mode()`` on Keras' torch device
        (no tracing: any batch size runs as it comes; ``traces()`` stays 0)."""
        import torch
        from keras.src.backend.torch.core import get_device

        device = get_device()
        multi = len(inputs) > 1

        def run(*xs: Any) -> list[Any]:
            with torch.inference_mode():
                ts = [torch.from_numpy(x).to(device) for x in xs]
                out = model(ts if multi else ts[0], training=False)
                outs = out if isinstance(out, (list, tuple)) else [out]
                return [o.detach().cpu().numpy() for o in outs]

        return CompiledForward(run, lambda: 0)

    def cluster_environ(self, spec: dict[str, list[str]], task_type: str, index: int) -> dict[str, str]:
        """``torch.distributed``'s ``env://`` rendezvous: task 0's address and port."""
        addresses, rank = ranks(spec, task_type, index)
        host, port = addresses[0].rsplit(":", 1)
        return {
            "MASTER_ADDR": host, "MASTER_PORT": port, "RANK": str(rank),
            "WORLD_SIZE": str(len(addresses)), "LOCAL_RANK": str(rank),
            # Collectives' sockets on loopback too (gloo on CPU, NCCL's bootstrap on GPU).
            "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo",
        }

    def init_distributed(self) -> None:
        """``torch.distributed`` over gloo on a CPU slot, NCCL on a GPU slot, its rendezvous
        on loopback only: ``env://`` would make task 0's ``TCPStore`` listen on every
        interface whatever ``MASTER_ADDR`` says, so task 0 binds the store's socket to
        ``MASTER_ADDR`` itself and hands it over (``master_listen_fd``)."""
        import datetime
        import os
        import socket

        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            return
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        timeout = datetime.timedelta(seconds=STORE_TIMEOUT_S)
        # The classic store (use_libuv=False): the libuv one listened on a handed-over socket
        # only from pytorch#150215 (2025) on, and GPU users bring their own torch.
        if rank == 0:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((host, port))
                listener.listen(world)
                store = dist.TCPStore(  # type: ignore[attr-defined]
                    host, port, world, True, timeout, wait_for_workers=False, master_listen_fd=os.dup(listener.fileno()),
                    use_libuv=False)
        else:
            store = dist.TCPStore(host, port, world, False, timeout, use_libuv=False)  # type: ignore[attr-defined]
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=store, rank=rank, world_size=world)
