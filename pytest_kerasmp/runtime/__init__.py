"""The local execution backend, cut by what runs where.

- ``process``: a child's one lifecycle (parent side) and its bootstrap (child side);
- ``wire``: what crosses the boundary (messages, transport, shared arrays);
- ``pool``: worker pools (``pool.child`` runs inside a worker);
- ``serve``: inference servers and their clients (``serve.child`` runs inside the server);
- ``cluster``: local clusters and their ports;
- ``backends``: the seam through which pools and servers find where they run.

Process and wire are below pool, serve and cluster; serve never imports pool.
"""
