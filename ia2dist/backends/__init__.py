"""Where the work of a run happens.

- ``base``: the protocol: ``Work`` (what the driver asks for), ``Outcome`` (what finished) and
  ``Backend`` (``run(work)`` yields outcomes, ``close``, ``stats``).
- ``local``: ``LocalBackend`` (``dist.backend: local``), everything in this process.
- ``ray``: ``RayBackend`` (``dist.backend: ray``), teacher actors and worker groups; the only
  package that imports ``ray``.

Import the submodules directly; importing this package imports neither torch nor ray.
"""
