"""The local execution backend: the one child lifecycle, wire, transport, task queue,
dispatcher, pool, server, cluster, ports."""
