"""The experiment as data and files: what a run is and what it has done, with no model and no
distribution in it.

- ``plan``: units, jobs, seeds and read orders as plain values (``Plan``; no I/O);
- ``order``: the first epoch's read order and each item's home rank, shared by teacher and student;
- ``status``: what an earlier attempt finished (and the publishing of complete staged folders);
- ``rundir``: the run directory's layout, config, state and logging;
- ``checkpoint``: training checkpoints (loop state + engine files), stop requests and resume;
- ``tracking``: wandb (or nothing) for steps, results and figures;
- ``memory_plan``: the memory each role needs and whether the run fits;
- ``prompt_estimate``: prompt lengths for ``ia2dist plan`` when only a model's config.json is there;
- ``runlock``: one writer per run directory (the lock, its heartbeat and takeover).
"""
