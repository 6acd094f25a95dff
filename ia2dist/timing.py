"""Where a job's time goes: wall and process CPU seconds per part of the job.

A ``JobClock`` is started for each student job (``clock``) and the code of each part marks itself
with ``part(name)``. Parts nest; time is charged to the INNERMOST open part only (a teacher record
fetched lazily inside a training step counts as ``teacher_wait``, not ``train``), so the parts never
overlap and their sum is at most the job's wall time; whatever no part claims is ``other``.
``part`` does nothing when no clock runs (a forward outside a job, a test calling ``train``).

CPU seconds are the process's (``time.process_time``: every thread of it, so a part may show more
CPU than wall seconds when torch computes on several threads).

The record, ``timing.json`` in the job's folder (``JobClock.summary``)::

    {"wall_s": 41.2, "cpu_s": 39.8,
     "parts": {"train": {"wall_s": 20.1, "cpu_s": 19.9}, "dev_eval": {...}, ..., "other": {...}}}
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator

#: The parts of a job, in the order reports show them.
PARTS = ("engine_setup", "train", "dev_eval", "checkpoint", "teacher_wait", "test_eval",
         "similarity")
#: What each part covers (report legends).
PART_TITLES = {
    "engine_setup": "adapter attach/remove, engine init/destroy",
    "train": "training forwards, backwards and optimizer steps",
    "dev_eval": "dev evaluations (early stopping, best-state copies and restore)",
    "checkpoint": "checkpoints, the consolidated save, history.json",
    "teacher_wait": "waiting for teacher records",
    "test_eval": "test evaluation",
    "similarity": "similarity to the ICL teacher",
    "other": "everything else (data, logging, synchronisation)",
}
#: The file a job's timing goes to, in its folder.
FILE = "timing.json"


class JobClock:
    """Wall (``time.perf_counter``) and CPU (``time.process_time``) seconds per part of one job."""

    def __init__(self):
        self.thread = threading.get_ident()
        self._start = self._mark = (time.perf_counter(), time.process_time())
        self._stack: list[str] = []
        self.wall = dict.fromkeys(PARTS, 0.0)
        self.cpu = dict.fromkeys(PARTS, 0.0)

    def _charge(self) -> None:
        """Charge the time since the last mark to the innermost open part (if any)."""
        now = (time.perf_counter(), time.process_time())
        if self._stack:
            name = self._stack[-1]
            self.wall[name] += now[0] - self._mark[0]
            self.cpu[name] += now[1] - self._mark[1]
        self._mark = now

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        if name not in self.wall:
            raise ValueError(f"unknown part {name!r}; use one of {', '.join(PARTS)}")
        self._charge()
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()

    def summary(self) -> dict:
        """Seconds so far: the job's wall and CPU time, and each part's (``other``: the rest)."""
        wall = time.perf_counter() - self._start[0]
        cpu = time.process_time() - self._start[1]
        parts = {name: {"wall_s": self.wall[name], "cpu_s": self.cpu[name]} for name in PARTS}
        parts["other"] = {"wall_s": max(wall - sum(self.wall.values()), 0.0),
                          "cpu_s": max(cpu - sum(self.cpu.values()), 0.0)}
        return {"wall_s": wall, "cpu_s": cpu, "parts": parts}


_current: JobClock | None = None


@contextlib.contextmanager
def clock() -> Iterator[JobClock]:
    """The running job's clock; a new one started (and stopped on exit) when none runs."""
    global _current
    if _current is not None:
        yield _current
        return
    _current = JobClock()
    try:
        yield _current
    finally:
        _current = None


def part(name: str) -> contextlib.AbstractContextManager:
    """Charge the time inside to ``name`` of the running job's clock (nothing without one, or in
    a thread other than the job's)."""
    if _current is None or _current.thread != threading.get_ident():
        return contextlib.nullcontext()
    return _current.part(name)


def clocked(function: Callable) -> Callable:
    """``function`` run inside ``clock()`` (the caller's running clock, or one of its own)."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        with clock():
            return function(*args, **kwargs)
    return run


def summary() -> dict:
    """``JobClock.summary`` of the running clock."""
    if _current is None:
        raise RuntimeError("no job clock runs; call this inside timing.clock()")
    return _current.summary()
