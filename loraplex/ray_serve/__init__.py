"""Scale-out on Ray Serve (`loraplex serve --ray`; needs `pip install loraplex[ray]`).

One Gateway replica runs the single-machine server's HTTP app (keys, registry, splits, limits,
metrics, streaming); N EngineReplica replicas each run a full engine on their own device. The
gateway tags every adapter request with the version id as Serve's multiplexed model id, so
Serve routes a tenant's requests to a replica that already holds the tenant's adapter, while
any replica can still serve anyone (it loads the adapter first).

Shared state across nodes: the loraplex home ($LORAPLEX_HOME: the registry's SQLite file and
the adapter artifacts) must be on storage every node mounts at the same path. The gateway alone
opens the registry and hands replicas absolute artifact paths, which must therefore resolve on
every node; the model (a default name pulled into the home, or a checkpoint directory) likewise.
SQLite on a network file system is fine for one writer: keep one gateway replica.

Nothing here is imported by the single-machine server (loraplex.server).
"""
