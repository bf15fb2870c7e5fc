"""Warm, pinned worker pools: the face (:class:`~pytest_kerasmp.WorkerPool`), the task queue, the parent's dispatcher, and ``child``, the loop inside a worker."""
