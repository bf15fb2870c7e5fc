"""Local clusters of pinned tasks on 127.0.0.1 (:class:`~pytest_kerasmp.KerasCluster`) and the ports they claim."""
