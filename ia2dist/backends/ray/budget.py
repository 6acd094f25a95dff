"""``ByteBudget``: the one owner of the teacher stage's byte budget (no ray, no torch).

Every shard holds bytes in the object store from the moment it is scheduled until its consumer
releases it: while it runs, its upper bound is *reserved*; once finished, its actual size is
*held* (and reserved) under a key ``(tag, shard)`` together with its payload (the object refs the
stage hands out). A shard is scheduled only when ``fits(bound)``, so the object store never holds
more un-consumed teacher output than ``limit``. The scheduling loop and the consumers run in
different threads: every change goes through this object's lock, and ``wait`` wakes on a release.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable

from ia2dist.errors import IA2Error


class ByteBudget:
    """Bytes reserved and held against ``limit``. The stage sets ``limit`` from its options at
    the start of each run (half the cluster's object store by default, known once Ray is
    connected); what is held stays held across runs."""

    def __init__(self, limit: int = 0):
        self.limit = int(limit)
        self._lock = threading.Condition()
        self._reserved = 0
        self._held: dict[Hashable, int] = {}
        self._payloads: dict[Hashable, object] = {}
        self._closed = False

    # ------------------------------------------------------------------ reservations
    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more can be reserved now."""
        with self._lock:
            return self._reserved + nbytes <= self.limit

    def reserve(self, nbytes: int) -> int:
        """Reserve ``nbytes`` (a shard starts running); the bytes reserved now."""
        with self._lock:
            self._reserved += nbytes
            return self._reserved

    def unreserve(self, nbytes: int) -> None:
        """Give back a reservation (a running shard finished, failed or was abandoned)."""
        with self._lock:
            self._reserved -= nbytes

    # ------------------------------------------------------------------ held shards
    def hold(self, key: Hashable, nbytes: int, payload) -> tuple[int, int]:
        """A finished shard of ``nbytes`` is held under ``key`` until ``release``; (bytes reserved,
        bytes held) now."""
        with self._lock:
            self._held[key] = nbytes
            self._payloads[key] = payload
            self._reserved += nbytes
            return self._reserved, sum(self._held.values())

    def payload(self, key: Hashable):
        with self._lock:
            return self._payloads[key]

    def release(self, key: Hashable) -> int:
        """Free a held shard (thread-safe; wakes ``wait``); the bytes freed."""
        with self._lock:
            if key not in self._held:
                raise KeyError(key)
            nbytes = self._held.pop(key)
            self._reserved -= nbytes
            self._payloads.pop(key, None)
            self._lock.notify_all()
            return nbytes

    def keys(self, where: Callable[[Hashable], bool] = lambda key: True) -> list:
        """The keys held now (those ``where`` accepts)."""
        with self._lock:
            return [key for key in self._held if where(key)]

    def held_bytes(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def reserved_bytes(self) -> int:
        with self._lock:
            return self._reserved

    # ------------------------------------------------------------------ waiting
    def wait(self, timeout_s: float | None) -> None:
        """Every byte is held by shards a consumer has not released and nothing runs: wait for a
        release from another thread for up to ``timeout_s`` (0: not at all; None: as long as it
        takes, until ``close``). Returns once something was released; raises IA2Error otherwise."""
        with self._lock:
            held = dict(self._held)
            if timeout_s is None:  # in slices, so that a close ends it
                while self._held == held and not self._closed:
                    self._lock.wait(timeout=1.0)
                if self._closed:
                    raise IA2Error("teacher stage: closed while waiting for the consumers")
                return
            if timeout_s > 0:
                self._lock.wait(timeout=timeout_s)
                if self._held != held:
                    return
        raise IA2Error(f"teacher stage: the consumer holds {len(held)} shard(s) "
                       f"({sum(held.values())} bytes) and the byte budget of {self.limit} "
                       f"leaves no room for the next shard; call release(shard) after using a "
                       f"shard, or raise byte_budget")

    def close(self) -> None:
        """End every ``wait`` (the stage is closing); ``open`` makes waiting possible again."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def open(self) -> None:
        with self._lock:
            self._closed = False
