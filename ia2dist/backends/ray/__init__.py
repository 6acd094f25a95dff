"""The Ray backend (``dist.backend: ray``): the only package that imports ``ray``.

- ``backend``: ``RayBackend``: connects, checks the cluster, and drives a run (the teacher thread,
  the worker groups, the outcomes, the statistics).
- ``messages``: the typed values the parts exchange (``Task``, ``GroupConfig``, ``TaskResult``,
  ``RankPulls``, ``TeacherJob``, ``TeacherStageOptions``, ``StageStats``) and the ``RecordLease``
  that says when a unit's records can go.
- ``teacher_stage``: the ``TeacherStage`` that streams extracted shards under the byte budget;
  ``teacher_run``: one run's scheduling loop (``TeacherRun``); ``teacher_pool``: the actors'
  placement and restarts (``TeacherPool``); ``teacher_actor``: one frozen teacher replica
  (``TeacherActor``).
- ``budget``: ``ByteBudget``, the one owner of the bytes of teacher records in flight.
- ``transport``: shards from the actors to the worker ranks (``pack_parts``, ``fetch_records``,
  ``UnitRecords``, ``RecordFetcher``); ``packing``: a shard as flat numpy arrays.
- ``groups``: the worker groups (one Ray Train run each) and their ``TaskQueue``.
- ``cluster``: connect to (or start) a Ray cluster, check it can hold a stage, shut it down.
- ``devices``: the environment of a worker process (which devices, which threads).
- ``auth``: the private local Ray's per-run token and loopback-only ports (set before ray is
  imported).

Import the submodules directly; importing this package does not import ray.
"""
