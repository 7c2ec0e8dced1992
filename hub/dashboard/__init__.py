"""The hub's fleet dashboard: four server-rendered pages and Prometheus metrics.

::

    DistributionServer (fleet table, bytes served) ─┐
    AdapterStore (versions, gates/) ────────────────┼─▶ SnapshotSource ─▶ pages / attention ─▶ web
    run folders (hub-run.json, eval history) ───────┘      (snapshot.py)    (pure)       (web.py)
                                                                               └─▶ metrics

A part of ``zk0-hub run`` (same lifetime, readiness and logging); read-only.
"""
