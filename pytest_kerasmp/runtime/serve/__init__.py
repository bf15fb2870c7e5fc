"""Inference servers: the face (:class:`~pytest_kerasmp.InferenceServer`), its clients, and ``child``, the loop inside the server process."""
