"""Distribution with Ray: the only package that imports ``ray``.

- ``cluster``: connect to (or start) a Ray cluster, check it can hold a stage, shut it down.
- ``packing``: a shard of TeacherRecords as a few flat numpy arrays (zero-copy transport through
  the object store).
- ``teacher_stage``: a pool of frozen-teacher actors extracting shards, streamed to consumers under
  a byte budget, with actor restarts and re-runs of unfinished shards.

Import the submodules directly; importing this package does not import ray.
"""
