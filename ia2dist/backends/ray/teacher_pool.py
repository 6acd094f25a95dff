"""``TeacherPool``: the teacher actors of a stage, their placement and their lifetime.

One ``teacher_actor.TeacherActor`` per bundle of one placement group (``placement_strategy``:
PACK, SPREAD, STRICT_PACK or STRICT_SPREAD), started and loaded before the first shard; the pool
says which actor takes the next shard (the healthy one with the fewest queued, up to
``max_shards_per_actor``) and kills them all (and frees the group) on ``kill``.

Restarts. When an actor process dies, Ray restarts it (up to ``max_restarts``); the scheduling loop
(``teacher_run``) re-queues the shards it was running and tells the pool (``lost``). The actor then
gets no work, and its pid reads None, until a ping comes back from the new process; an actor that
is permanently dead leaves the pool, and the pool fails (one-line IA2Error) when no actor is left.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ia2dist.backends.ray.cluster import check_resources
from ia2dist.backends.ray.messages import TeacherStageOptions
from ia2dist.backends.ray.teacher_actor import TeacherActor, first_line, reraise_task_error
from ia2dist.errors import IA2Error

log = logging.getLogger(__name__)

_RemoteTeacherActor = ray.remote(TeacherActor)


@dataclass
class PoolMember:
    """One actor of the pool and what the driver knows of it."""

    handle: object
    pid: int | None = None
    running: int = 0
    """Shards queued on it now."""
    healthy: bool = True
    ping: ray.ObjectRef | None = None
    """The ``info`` call asking a restarting actor whether it is back."""
    ping_errors: int = 0
    """Pings failed with a dead-actor error since the actor was last known alive."""
    down_since: float | None = None
    """When the actor was first known dead (monotonic), until a ping answers."""


class TeacherPool:
    """The teacher actors of a stage, one placement-group bundle each: starting them, which one
    takes the next shard, and restarts (an actor whose task died is known dead until a ping
    answers from its replacement, or leaves the pool for good)."""

    def __init__(self, options: TeacherStageOptions):
        self.options = options
        self.members: list[PoolMember] = []
        self.info: dict | None = None
        """The first actor's ``TeacherActor.info`` (layers, hidden size, vocabulary)."""
        self._pg = None

    def start(self, model_cfg, extract_kwargs: dict, device: str) -> None:
        """Check resources, place the bundles and load one teacher per actor (blocking)."""
        o = self.options
        check_resources(o.num_actors, o.cpus_per_actor, o.gpus_per_actor,
                        strategy=o.placement_strategy)
        bundle = {"CPU": o.cpus_per_actor} if o.cpus_per_actor > 0 else {}
        if o.gpus_per_actor > 0:
            bundle["GPU"] = o.gpus_per_actor
        self._pg = placement_group([dict(bundle) for _ in range(o.num_actors)],
                                   strategy=o.placement_strategy)
        try:
            ray.get(self._pg.ready(), timeout=o.ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.kill()
            raise IA2Error(f"teacher stage: the cluster did not free {o.num_actors} x {bundle} "
                           f"({o.placement_strategy}) within {o.ready_timeout_s:g} s; other jobs "
                           f"hold the resources, or lower num_actors / cpus/gpus per actor"
                           ) from None
        threads = max(1, int(o.cpus_per_actor))
        for i in range(o.num_actors):
            handle = _RemoteTeacherActor.options(
                num_cpus=o.cpus_per_actor, num_gpus=o.gpus_per_actor,
                max_restarts=o.max_restarts, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=i),
            ).remote(model_cfg, extract_kwargs, device, threads, o.gpus_per_actor,
                     o.reserve_bytes)
            self.members.append(PoolMember(handle))
        try:
            infos = ray.get([m.handle.info.remote() for m in self.members],
                            timeout=o.ready_timeout_s)
        except ray.exceptions.RayTaskError as exc:
            self.kill()
            reraise_task_error(exc, "teacher stage: loading the teacher")
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
            self.kill()
            raise IA2Error(f"teacher stage: teacher actors did not start within "
                           f"{o.ready_timeout_s:g} s ({type(exc).__name__}: {first_line(exc)}); "
                           f"see the actor logs in the Ray temp dir") from None
        for member, info in zip(self.members, infos):
            member.pid = info["pid"]
        self.info = infos[0]
        log.info("teacher stage: %d actor(s) ready (%s)", len(self.members), infos[0]["device"])

    def kill(self) -> None:
        """Kill the actors and free the placement group."""
        for member in self.members:
            try:
                ray.kill(member.handle, no_restart=True)
            except Exception:  # already dead
                pass
        self.members = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    @property
    def handles(self) -> list:
        return [m.handle for m in self.members]

    def pids(self) -> list[int | None]:
        return [m.pid for m in self.members]

    # ------------------------------------------------------------------ tasks
    def free(self) -> int | None:
        """The healthy actor with the fewest queued shards, below ``max_shards_per_actor``."""
        limit = self.options.max_shards_per_actor
        candidates = [i for i, m in enumerate(self.members) if m.healthy and m.running < limit]
        return min(candidates, key=lambda i: self.members[i].running) if candidates else None

    def submit(self, index: int, shard: int, prompts: list, uids: list[str], attempt: int,
               store, parts: list[list[int]] | None) -> list:
        """Queue a shard on actor ``index``: [ref of its completion record, refs of its parts]."""
        refs = self.members[index].handle.run_shard.options(
            num_returns=1 + (len(parts) if parts is not None else 1)).remote(
            shard, prompts, uids, attempt, store, parts)
        self.members[index].running += 1
        return list(refs)

    def finished(self, index: int) -> None:
        """A task of actor ``index`` ended (or was abandoned)."""
        if index < len(self.members):  # not killed meanwhile
            self.members[index].running -= 1

    def lost(self, index: int) -> bool:
        """A task of actor ``index`` died with it: known dead until a ping answers from its
        replacement. True when it was taken for healthy until now (a new failure)."""
        member = self.members[index]
        if not member.healthy:
            return False
        member.healthy = False
        member.pid, member.down_since = None, time.monotonic()
        member.ping = member.handle.info.remote()
        return True

    # ------------------------------------------------------------------ restarts
    def pings(self) -> dict:
        """{ping ref: actor index} of the restarting actors."""
        return {m.ping: i for i, m in enumerate(self.members) if m.ping is not None}

    def on_ping(self, index: int) -> None:
        """A restarted actor answered (back in the pool, with its new pid) or is gone for good
        (out of the pool, pid None). Until then it is known dead, whatever the timing:

        - ActorUnavailableError: Ray is restarting it (or the ping reached the dead process): ask
          again, for as long as a fresh actor may take to load its model (``ready_timeout_s``);
          on a loaded machine a restart takes many seconds and fails every ping meanwhile;
        - another actor error (ActorDiedError: out of restarts): gone, after two more asks (a
          ping sent in the instant of the death may fail like that too)."""
        member = self.members[index]
        ref, member.ping = member.ping, None
        if member.down_since is None:
            member.down_since = time.monotonic()
        try:
            member.pid = ray.get(ref)["pid"]
            member.healthy = True
            member.ping_errors, member.down_since = 0, None
            log.info("teacher stage: actor %d is back (pid %d)", index, member.pid)
            return
        except ray.exceptions.ActorUnavailableError as exc:
            if time.monotonic() - member.down_since < self.options.ready_timeout_s:
                time.sleep(0.2)  # it answers nothing while restarting: do not spin
                member.ping = member.handle.info.remote()
                return
            log.warning("teacher stage: actor %d leaves the pool (not back after %.0f s: %s)",
                        index, self.options.ready_timeout_s, first_line(exc))
        except ray.exceptions.RayActorError as exc:
            member.ping_errors += 1
            if member.ping_errors <= 2:
                member.ping = member.handle.info.remote()
                return
            log.warning("teacher stage: actor %d leaves the pool (%s)", index, first_line(exc))
        except ray.exceptions.RayTaskError as exc:
            log.warning("teacher stage: actor %d leaves the pool (%s)", index, first_line(exc))
        member.pid = None
        if not any(m.healthy or m.ping is not None for m in self.members):
            raise IA2Error(f"teacher stage: every teacher actor died and used up max_restarts="
                           f"{self.options.max_restarts}; check the actor logs in the Ray temp "
                           f"dir (out of memory?)")

    def wait_for(self, timeout_s: float) -> None:
        """Block until every restarting actor answers (or is gone for good)."""
        deadline = time.time() + timeout_s
        for index, member in enumerate(self.members):
            while member.ping is not None:
                ray.wait([member.ping], timeout=max(0.0, deadline - time.time()))
                if time.time() > deadline:
                    raise IA2Error(f"teacher stage: actor {index} did not come back within "
                                   f"{timeout_s:g} s; see the actor logs in the Ray temp dir")
                self.on_ping(index)
