"""A local cluster for the session's Keras backend: :class:`TFCluster`'s machinery (pinned warm
tasks, shared fate, claimed ports on 127.0.0.1, stacks of a stuck task, placement) with each
task's environment from the backend's adapter:

- TensorFlow: ``TF_CONFIG`` (``MultiWorkerMirroredStrategy`` reads it);
- JAX: ``jax.distributed``'s coordinator on task 0's port, bound to 127.0.0.1 only
  (``JAX_COORDINATOR_BIND_ADDRESS``), the process index, gloo for CPU collectives, and the
  same as ``keras.distribution.initialize()`` reads it;
- PyTorch: ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE`` for ``env://``.

In a task, :func:`init_distributed` joins the others (``keras.distribution.initialize()`` on
JAX; ``torch.distributed.init_process_group`` with gloo on CPU, NCCL on GPU; nothing on
TensorFlow, whose strategy joins when it is created).
"""

from __future__ import annotations

from pytest_kerasmp import frameworks
from pytest_kerasmp.runtime.cluster.cluster import TFCluster

_joined = False


class KerasCluster(TFCluster):
    """A cluster of ``workers`` tasks on this machine for the session's Keras backend (see the
    module docstring); the same arguments, methods and errors as :class:`TFCluster`."""

    def framework(self) -> frameworks.Framework:
        return frameworks.active()


def init_distributed() -> None:
    """In a task of a :class:`KerasCluster`: join the other tasks (once per process)."""
    global _joined
    if not _joined:
        frameworks.active().init_distributed()
        _joined = True


__all__ = ["KerasCluster", "init_distributed"]
