"""The Ray teacher stage: frozen teacher replicas extracting shards, streamed under a byte budget.

A ``TeacherPool`` of ``TeacherActor``s (one teacher replica each, one placement-group bundle
each) runs ``ia2dist.teacher.extract.extract`` on shards of examples and returns each shard as a
``PackedShard`` (``transport.pack_parts``) through the object store. The driver-side
``TeacherStage`` owns the pool and the byte budget (``budget.ByteBudget``); its scheduling loop
(``_Run``, one per ``run``) yields ``(shard_index, ObjectRef)`` as shards finish, so a consumer
starts on the first shards while later ones are still being extracted.

Backpressure. Every shard holds bytes in the object store from the moment it is scheduled until the
consumer calls ``release(shard_index)``: while it runs, its upper bound (every example producing
max_new_tokens positions) is reserved; once finished, its actual size. A shard is only scheduled
when reserved + its bound <= ``byte_budget``, so the object store never holds more un-consumed
teacher output than the budget, and ``stats.peak_inflight_bytes`` records the high-water mark.

Failures. Each actor task returns two objects: a small completion record (read by the driver) and
the payload (never touched by the driver). When an actor process dies, Ray restarts it (up to
``max_restarts``); its tasks that had not finished fail with an actor error and their shards are
queued again. Finished shards are objects owned by the driver in the node's object store and
survive the actor, so they are never recomputed. A restarting actor gets no work until a ping
comes back from the new process; an actor that is permanently dead leaves the pool, and the stage
fails (one-line IA2Error) when no actor is left or a shard failed ``max_shard_attempts`` times.

With a ``TeacherStore`` (``ia2dist.teacher.store``), actors persist every finished shard under the
store's root (a filesystem the actors and the driver share), and a later run (or the one-process
backend) with the same settings serves those shards from disk instead of extracting them again.

Parts. A shard can travel as several objects ("parts"), e.g. one per rank of the worker groups
that read it: ``run(..., parts=part_of)`` assigns every example a part, each shard is returned as
one ``PackedShard`` per part (possibly empty), and a reader fetches only the part it needs.

The actors also evaluate the frozen base model (the base and ICL baselines, and the base's
per-layer similarity to the ICL teacher): ``evaluate`` runs ``ia2dist.eval.runner.evaluate`` on the
replica the actor already holds. With ``gpus_per_actor`` k > 1 one replica spans the actor's k GPUs
(``ia2dist.model.placement.plan_device_map``: whole decoder layers per device under a per-device
budget, dispatched by accelerate).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ia2dist.backends.ray.budget import ByteBudget
from ia2dist.backends.ray.cluster import STRATEGIES, check_resources
from ia2dist.backends.ray.packing import unpack_records
from ia2dist.backends.ray.transport import fetch_records, pack_parts
from ia2dist.errors import IA2Error
from ia2dist.eval.runner import evaluate, shared_accuracy
from ia2dist.model.dtypes import DTYPES
from ia2dist.records import TeacherRecord

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TeacherStageOptions:
    num_actors: int = 1
    """Teacher replicas (Ray actors), each holding one frozen copy of the model."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor (also its torch thread count, at least 1)."""
    gpus_per_actor: float = 0.0
    """GPUs per actor; fractions below 1 share a GPU between replicas (e.g. 0.5: two per GPU)."""
    placement_strategy: str = "PACK"
    """Placement-group strategy of the actors' bundles: PACK, SPREAD, STRICT_PACK or
    STRICT_SPREAD (one node per actor)."""
    shard_size: int = 32
    """Examples per shard (the unit of scheduling, transport, retry and caching)."""
    max_shards_per_actor: int = 2
    """Shards queued on one actor at a time (2: the next shard is ready when one finishes)."""
    byte_budget: int | None = None
    """Most bytes of un-released teacher output in the object store (None: half the cluster's
    object store). Must hold at least one shard's upper bound."""
    max_restarts: int = 3
    """Restarts of a dead actor process before it leaves the pool."""
    max_shard_attempts: int = 3
    """Attempts per shard (an attempt is lost when its actor dies) before the stage fails."""
    reserve_bytes: int = 0
    """Per-GPU memory a replica spanning several GPUs leaves free for activations and the KV cache
    (the layers are placed within each GPU's memory minus this)."""
    ready_timeout_s: float = 600.0
    """Seconds to wait for the placement group and the actors' model loading."""
    release_wait_s: float | None = 0.0
    """When every byte of the budget is held by yielded, un-released shards and nothing runs, wait
    this long for ``release`` from another thread before failing (0: fail at once; None: as long
    as it takes, until ``close``)."""


@dataclass
class StageStats:
    """What a ``TeacherStage.run`` did; lists are indexed by shard."""

    num_shards: int = 0
    attempts: list[int] = field(default_factory=list)
    """Extraction tasks submitted per shard (1 unless an actor died while running it)."""
    completions: list[int] = field(default_factory=list)
    """Times each shard finished (always 1 after a complete run)."""
    from_cache: list[bool] = field(default_factory=list)
    finished_at: list[float | None] = field(default_factory=list)
    """time.time() when the driver saw the shard finish."""
    released_at: list[float | None] = field(default_factory=list)
    act_bytes: list[int] = field(default_factory=list)
    """Activation payload per shard (sum over its records of L x T_i x D x bytes)."""
    reruns: int = 0
    actor_failures: int = 0
    peak_inflight_bytes: int = 0
    """Most bytes reserved at once (running upper bounds + finished, un-released shards)."""
    peak_held_bytes: int = 0
    """Most bytes of finished, un-released shards at once."""


# --------------------------------------------------------------------------------------------------
# The actor
# --------------------------------------------------------------------------------------------------

class TeacherActor:
    """One frozen teacher replica. Load errors are kept and reported by ``info`` (so the driver
    gets the IA2Error's message instead of a dead-actor traceback)."""

    def __init__(self, model_cfg, extract_kwargs: dict, device: str, num_threads: int,
                 num_gpus: float = 0.0, reserve_bytes: int = 0):
        from ia2dist import procmem
        from ia2dist.backends.ray.devices import worker_environment
        from ia2dist.model.load import load_model, load_tokenizer

        worker_environment(num_gpus > 0)
        torch.set_num_threads(num_threads)
        procmem.import_model_libraries()
        procmem.baseline()
        self.extract_kwargs = dict(extract_kwargs)
        self.extract_kwargs["act_dtype"] = DTYPES[extract_kwargs["act_dtype"]]
        self.load_error: str | None = None
        self.device_map: dict | None = None
        try:
            self.tokenizer = load_tokenizer(model_cfg)
            if num_gpus > 1:
                self.device_map = _device_map(model_cfg, reserve_bytes)
            self.model = load_model(model_cfg, device=device, device_map=self.device_map)
        except IA2Error as exc:
            self.load_error = str(exc)
            return
        except torch.OutOfMemoryError as exc:
            self.load_error = (f"teacher actor: out of memory loading {model_cfg.name_or_path} "
                               f"({_first_line(exc)}); give each replica more GPUs "
                               f"(dist.teacher_gpus), use model.dtype=bfloat16, or check "
                               f"`ia2dist plan`")
            return
        for param in self.model.parameters():
            param.requires_grad_(False)
        self._shared: dict[str, tuple] = {}

    def memory(self) -> dict:
        """This replica's resident memory: before loading, now, and its peak."""
        from ia2dist import procmem

        return procmem.report()

    def decoding(self) -> list[dict]:
        """The decode settings this replica proved (``ia2dist.teacher.extract.proven_decoding``)."""
        from ia2dist.teacher.extract import proven_decoding

        return proven_decoding()

    def info(self) -> dict:
        from ia2dist.model.structure import attention_sites

        if self.load_error is not None:
            raise IA2Error(self.load_error)
        devices = sorted({str(p.device) for p in self.model.parameters()})
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "device": ",".join(devices), "device_map": self.device_map,
                "num_layers": len(attention_sites(self.model)),
                "hidden": int(self.model.config.hidden_size),
                "vocab": int(self.model.config.vocab_size)}

    def run_shard(self, shard_index: int, prompts: list, uids: list[str], attempt: int,
                  store=None, parts: list[list[int]] | None = None) -> tuple:
        """Extract one shard; with a ``store`` also persist it. Returns (completion record,
        payload per part) as separate objects so the driver reads the small one only."""
        from ia2dist.teacher.extract import extract

        if self.load_error is not None:
            raise IA2Error(self.load_error)
        started = time.time()
        records = extract(self.model, self.tokenizer, prompts, uids, **self.extract_kwargs)
        if store is not None:
            store.write(shard_index, records)
        packed = pack_parts(records, parts, meta={"shard_index": shard_index, "attempt": attempt,
                                                  "pid": os.getpid()})
        done = {"shard_index": shard_index, "attempt": attempt, "pid": os.getpid(),
                "act_nbytes": sum(p.act_nbytes for p in packed),
                "nbytes": sum(p.nbytes for p in packed),
                "num_positions": sum(int(p.offsets[-1]) for p in packed), "started": started,
                "finished": time.time()}
        return (done, *packed)

    def evaluate(self, plan, unit_key: str, name: str, with_demos: bool,
                 sim_refs=None) -> list[dict]:
        """Evaluate the frozen base as baseline ``name`` of the unit (writes its metrics.json and
        predictions.json; returns the result rows). The base's prompts without demos are the same
        for every unit: evaluated once per actor and reused (its similarity is per unit).
        ``sim_refs``: the unit's similarity-record shards (object refs) for the similarity."""
        if self.load_error is not None:
            raise IA2Error(self.load_error)
        plan.tokenizer = self.tokenizer
        unit = plan.unit(unit_key)
        shared = None
        if not with_demos:
            if name not in self._shared:
                self._shared[name] = shared_accuracy(self.model, self.tokenizer, plan, unit)
            shared = self._shared[name]
        sim = None
        if sim_refs is not None and not with_demos:
            sim = [rec for ref in sim_refs for rec in unpack_records(ray.get(ref))]
        return evaluate(self.model, self.tokenizer, plan, unit, name, with_demos=with_demos,
                        sim_records=sim, shared=shared)


def _device_map(model_cfg, reserve_bytes: int) -> dict:
    """One replica over every GPU Ray gave this actor: whole layers per device, each device's
    weights within its free memory (at most 95% of its total) minus ``reserve_bytes`` (activations,
    KV cache)."""
    from ia2dist.model.load import load_model_config
    from ia2dist.model.placement import plan_device_map

    budgets = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        budgets.append(min(free, int(total * 0.95)) - int(reserve_bytes))
    return plan_device_map(load_model_config(model_cfg), model_cfg.dtype, budgets)


_RemoteTeacherActor = ray.remote(TeacherActor)


def _owned(rec: TeacherRecord) -> TeacherRecord:
    """A copy of ``rec`` that owns its memory (contiguous, writable)."""
    clone = (lambda t: None if t is None else t.clone(memory_format=torch.contiguous_format))
    return TeacherRecord(uid=rec.uid, response_ids=clone(rec.response_ids),
                         acts_LTD=clone(rec.acts_LTD), topk_ids_Tk=clone(rec.topk_ids_Tk),
                         topk_logprobs_Tk=clone(rec.topk_logprobs_Tk))


# --------------------------------------------------------------------------------------------------
# The pool: the actors, and what the driver knows of each
# --------------------------------------------------------------------------------------------------

@dataclass
class PoolMember:
    handle: object
    pid: int | None = None
    running: int = 0
    healthy: bool = True
    ping: ray.ObjectRef | None = None
    failures: int = 0
    ping_errors: int = 0
    """Pings failed with a dead-actor error since the actor was last known alive."""
    down_since: float | None = None
    """When the actor was first known dead (monotonic), until a ping answers."""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _reraise_task_error(exc: ray.exceptions.RayTaskError, where: str):
    cause = getattr(exc, "cause", None)
    if isinstance(cause, IA2Error):
        raise IA2Error(str(cause)) from None
    raise IA2Error(f"{where}: {type(cause or exc).__name__}: {_first_line(cause or exc)}; see the "
                   f"actor's log in the Ray temp dir") from None


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
            _reraise_task_error(exc, "teacher stage: loading the teacher")
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
            self.kill()
            raise IA2Error(f"teacher stage: teacher actors did not start within "
                           f"{o.ready_timeout_s:g} s ({type(exc).__name__}: {_first_line(exc)}); "
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
        member.failures += 1
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
                        index, self.options.ready_timeout_s, _first_line(exc))
        except ray.exceptions.RayActorError as exc:
            member.ping_errors += 1
            if member.ping_errors <= 2:
                member.ping = member.handle.info.remote()
                return
            log.warning("teacher stage: actor %d leaves the pool (%s)", index, _first_line(exc))
        except ray.exceptions.RayTaskError as exc:
            log.warning("teacher stage: actor %d leaves the pool (%s)", index, _first_line(exc))
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


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------

class TeacherStage:
    """Driver of the teacher actor pool. Use as a context manager (``close`` kills the actors)::

        with TeacherStage(model_cfg, extract_cfg, max_new_tokens=T, options=opts) as stage:
            for shard, ref in stage.run(prompts, uids):
                records = fetch_records(ref)   # or hand ``ref`` to a consumer actor
                ...
                stage.release(shard)

    ``extract_cfg`` is an ``ExtractConfig`` (stop strings, batch size, storage dtype, top-k);
    ``max_new_tokens`` is the resolved T. One stage (one pool of loaded teachers) serves any
    number of runs. It owns the ``pool`` (``TeacherPool``) and the ``budget`` (``ByteBudget``);
    a run's scheduling loop (``_Run``) uses both through their methods.
    """

    def __init__(self, model_cfg, extract_cfg, *, max_new_tokens: int,
                 options: TeacherStageOptions | None = None):
        self.model_cfg = model_cfg
        self.options = options or TeacherStageOptions()
        self.extract_kwargs = {"max_new_tokens": int(max_new_tokens),
                               "stop_strings": tuple(extract_cfg.stop_strings),
                               "batch_size": int(extract_cfg.batch_size),
                               "act_dtype": str(extract_cfg.act_dtype),
                               "topk": int(extract_cfg.topk or 0)}
        self.stats = StageStats()
        self.pool = TeacherPool(self.options)
        self.budget = ByteBudget()
        self._tag_stats: dict[str | None, StageStats] = {}
        self._active_run: Iterator | None = None
        self._check_options()

    # ------------------------------------------------------------------ lifecycle
    def _check_options(self) -> None:
        o = self.options
        problems = []
        if o.num_actors < 1:
            problems.append(f"num_actors must be >= 1, got {o.num_actors}")
        if o.cpus_per_actor <= 0 and o.gpus_per_actor <= 0:
            problems.append("an actor needs cpus_per_actor > 0 or gpus_per_actor > 0")
        if o.shard_size < 1:
            problems.append(f"shard_size must be >= 1, got {o.shard_size}")
        if o.max_shards_per_actor < 1:
            problems.append(f"max_shards_per_actor must be >= 1, got {o.max_shards_per_actor}")
        if o.placement_strategy not in STRATEGIES:
            problems.append(f"placement_strategy {o.placement_strategy!r} is not one of "
                            f"{', '.join(STRATEGIES)}")
        if self.extract_kwargs["act_dtype"] not in DTYPES:
            problems.append(f"act_dtype {self.extract_kwargs['act_dtype']!r} is not one of "
                            f"{', '.join(DTYPES)}")
        if problems:
            raise IA2Error("teacher stage: " + "; ".join(problems))

    def _device(self) -> str:
        if self.model_cfg.device != "auto":
            return self.model_cfg.device
        return "cuda" if self.options.gpus_per_actor > 0 else "cpu"

    def start(self) -> TeacherStage:
        """Check resources, place the bundles and load one teacher per actor (blocking)."""
        if self.pool.members:
            return self
        self.budget.open()
        if not ray.is_initialized():
            raise IA2Error("teacher stage: Ray is not connected; call "
                           "ia2dist.backends.ray.cluster.connect(...) first")
        self.pool.start(self.model_cfg, self.extract_kwargs, self._device())
        return self

    def close(self) -> None:
        """Kill the actors and free the placement group (shards already yielded stay readable
        while their refs live); a run waiting for the budget ends."""
        self.budget.close()
        self.pool.kill()

    def __enter__(self) -> TeacherStage:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def actor_pids(self) -> list[int | None]:
        """Current process id of each actor: None while it is known dead (from its first failed
        task until a ping answers from its replacement, or for good)."""
        return self.pool.pids()

    def wait_for_actors(self, timeout_s: float = 120.0) -> list[int | None]:
        """Block until every restarting actor answers (or is gone for good); the actors' pids."""
        self.pool.wait_for(timeout_s)
        return self.actor_pids()

    @property
    def actors(self) -> list:
        return self.pool.handles

    # ------------------------------------------------------------------ sizes and budget
    def shard_bound(self, num_examples: int) -> int:
        """Upper bound of a shard's bytes: every example producing max_new_tokens positions."""
        info = self.pool.info
        assert info is not None, "start() first"
        k = self.extract_kwargs["topk"]
        if k < 0:  # the whole vocabulary
            k = info["vocab"]
        per_position = (info["num_layers"] * info["hidden"]
                        * DTYPES[self.extract_kwargs["act_dtype"]].itemsize + 8 + k * 12)
        return num_examples * self.extract_kwargs["max_new_tokens"] * per_position \
            + 8 * (num_examples + 1)

    def budget_limit(self) -> int:
        """The byte budget of a run: ``byte_budget``, or half the cluster's object store."""
        if self.options.byte_budget is not None:
            return int(self.options.byte_budget)
        return int(ray.cluster_resources().get("object_store_memory", 0) // 2)

    def release(self, shard_index: int, tag: str | None = None) -> int:
        """The consumer is done with a yielded shard (of the run ``tag``): drop the stage's
        reference and free its bytes from the budget (thread-safe); the bytes freed."""
        try:
            freed = self.budget.release((tag, shard_index))
        except KeyError:
            raise ValueError(f"shard {shard_index} of {tag!r} is not held (never yielded or "
                             f"released)") from None
        stats = self._tag_stats.get(tag)
        if stats is not None and shard_index < len(stats.released_at):
            stats.released_at[shard_index] = time.time()
        return freed

    def release_tag(self, tag: str | None) -> int:
        """Release every held shard of the run ``tag`` (its consumers are all done); returns the
        bytes freed."""
        return sum(self.release(shard, tag)
                   for _, shard in self.budget.keys(lambda key: key[0] == tag))

    def held_bytes(self) -> int:
        """Bytes of yielded, unreleased shards (all runs)."""
        return self.budget.held_bytes()

    def tag_stats(self, tag: str | None) -> StageStats | None:
        return self._tag_stats.get(tag)

    # ------------------------------------------------------------------ the run
    def run(self, prompts: Sequence, uids: Sequence[str], *, store=None,
            parts: Sequence[int] | None = None, num_parts: int | None = None,
            tag: str | None = None) -> Iterator[tuple[int, list]]:
        """Extract every prompt; yield (shard_index, refs to its PackedShard per part) as shards
        finish.

        Shard i holds examples [i * shard_size, (i + 1) * shard_size). Every shard is yielded
        exactly once; call ``release(i, tag)`` (or ``release_tag(tag)``) when done with it so
        later shards fit the byte budget; shards of earlier runs (other tags) stay held until
        released. Arguments, resources and the budget are checked here, before anything is
        scheduled. ``parts``: a part index (0..num_parts-1) per example; each shard then travels
        as one object per part (see the module docstring). With a ``store``
        (``ia2dist.teacher.store.TeacherStore`` of these uids) each finished shard is saved there
        and shards it already holds are read back instead of extracted; a saved shard made with
        other settings raises IA2Error (never silently reused).
        """
        if len(prompts) != len(uids):
            raise IA2Error(f"teacher stage: {len(prompts)} prompts but {len(uids)} uids; pass one "
                           f"uid per prompt")
        self.start()
        size = self.options.shard_size
        shards = [(list(prompts[i:i + size]), list(uids[i:i + size]))
                  for i in range(0, len(prompts), size)]
        shard_parts = None
        if parts is not None:
            count = num_parts or (max(parts) + 1 if len(parts) else 1)
            shard_parts = [[[k for k in range(len(shard[1])) if parts[i * size + k] == p]
                            for p in range(count)] for i, shard in enumerate(shards)]
        budget = self.budget.limit = self.budget_limit()
        bounds = [self.shard_bound(len(s[1])) for s in shards]
        if bounds and max(bounds) > budget:
            raise IA2Error(f"teacher stage: byte_budget {budget} is smaller than one shard's upper "
                           f"bound of {max(bounds)} bytes ({size} examples x T="
                           f"{self.extract_kwargs['max_new_tokens']}); raise byte_budget or lower "
                           f"shard_size")
        if self._active_run is not None:
            self._active_run.close()  # one run at a time: an unfinished one is abandoned
        n = len(shards)
        self.stats = StageStats(num_shards=n, attempts=[0] * n, completions=[0] * n,
                                from_cache=[False] * n, finished_at=[None] * n,
                                released_at=[None] * n, act_bytes=[0] * n)
        self._tag_stats[tag] = self.stats
        for key in self.budget.keys(lambda key: key[0] == tag):  # a rerun of the same tag
            self.budget.release(key)
        self._active_run = _Run(self, shards, bounds, store, shard_parts, tag).loop()
        return self._active_run

    def run_records(self, prompts: Sequence, uids: Sequence[str], **run_kwargs
                    ) -> list[TeacherRecord]:
        """Every record, in input order, as tensors owning their memory (the whole output is
        held at the end: for runs that fit in memory)."""
        by_shard: dict[int, list[TeacherRecord]] = {}
        for shard, refs in self.run(prompts, uids, **run_kwargs):
            by_shard[shard] = [_owned(r) for r in fetch_records(refs)]
            self.release(shard, run_kwargs.get("tag"))
        return [rec for shard in sorted(by_shard) for rec in by_shard[shard]]


@dataclass
class _Task:
    shard: int
    actor: int
    payload: list
    reserved: int


class _Run:
    """The scheduling loop of one ``TeacherStage.run``: its shards, what runs where, what waits
    to be yielded. The actors are the stage's ``pool``, the bytes its ``budget``."""

    def __init__(self, stage: TeacherStage, shards: list[tuple[list, list[str]]],
                 bounds: list[int], store, parts: list[list[list[int]]] | None,
                 tag: str | None = None):
        self.pool, self.budget, self.options = stage.pool, stage.budget, stage.options
        self.shards, self.bounds = shards, bounds
        self.store, self.parts, self.tag = store, parts, tag
        self.stats = stage.stats
        self.pending: deque[int] = deque(range(len(shards)))
        self.running: dict[ray.ObjectRef, _Task] = {}
        self.to_yield: deque[int] = deque()

    def _from_cache(self, shard: int) -> bool:
        """Serve a finished shard from the store (True) when it holds it."""
        if self.store is None:
            return False
        records = self.store.read(shard)
        if records is None:
            return False
        packed = pack_parts(records, self.parts[shard] if self.parts is not None else None,
                            meta={"shard_index": shard, "cached": True})
        self.stats.from_cache[shard] = True
        self._finish(shard, [ray.put(p) for p in packed], sum(p.nbytes for p in packed),
                     sum(p.act_nbytes for p in packed))
        return True

    def _finish(self, shard: int, payload: list, nbytes: int, act_nbytes: int) -> None:
        reserved, held = self.budget.hold((self.tag, shard), nbytes, payload)
        self.stats.peak_inflight_bytes = max(self.stats.peak_inflight_bytes, reserved)
        self.stats.peak_held_bytes = max(self.stats.peak_held_bytes, held)
        self.stats.completions[shard] += 1
        self.stats.act_bytes[shard] = act_nbytes
        self.stats.finished_at[shard] = time.time()
        self.to_yield.append(shard)

    def _schedule(self) -> None:
        while self.pending:
            shard = self.pending[0]
            bound = self.bounds[shard]
            if not self.budget.fits(bound):
                return
            if self.stats.attempts[shard] == 0 and self._from_cache(shard):
                self.pending.popleft()
                continue
            actor_index = self.pool.free()
            if actor_index is None:
                return
            self.pending.popleft()
            prompts, uids = self.shards[shard]
            self.stats.attempts[shard] += 1
            refs = self.pool.submit(actor_index, shard, prompts, uids, self.stats.attempts[shard],
                                    self.store, self.parts[shard] if self.parts is not None
                                    else None)
            reserved = self.budget.reserve(bound)
            self.stats.peak_inflight_bytes = max(self.stats.peak_inflight_bytes, reserved)
            self.running[refs[0]] = _Task(shard, actor_index, refs[1:], bound)

    def _on_actor_failure(self, task: _Task, exc: Exception) -> None:
        self.stats.reruns += 1
        shard_uids = self.shards[task.shard][1]
        if self.stats.attempts[task.shard] >= self.options.max_shard_attempts:
            raise IA2Error(f"teacher stage: shard {task.shard} (uids {shard_uids[0]}..) lost its "
                           f"actor {self.stats.attempts[task.shard]} times ({_first_line(exc)}); "
                           f"check the actor logs (out of memory?) or lower shard_size")
        log.warning("teacher stage: actor %d died running shard %d (%s); re-running it",
                    task.actor, task.shard, _first_line(exc))
        self.pending.appendleft(task.shard)
        if self.pool.lost(task.actor):
            self.stats.actor_failures += 1

    def _on_done(self, ref: ray.ObjectRef) -> None:
        task = self.running.pop(ref)
        self.pool.finished(task.actor)
        self.budget.unreserve(task.reserved)
        try:
            done = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._on_actor_failure(task, exc)
            return
        except ray.exceptions.RayTaskError as exc:
            _reraise_task_error(exc, f"teacher stage: shard {task.shard}")
        self._finish(task.shard, task.payload, done["nbytes"], done["act_nbytes"])

    def loop(self) -> Iterator[tuple[int, ray.ObjectRef]]:
        try:
            yield from self._loop()
        finally:
            # An abandoned run (consumer stopped early, or an error): its tasks still finish on
            # their actors, but no longer count against the actors' queues or the budget.
            for task in self.running.values():
                self.pool.finished(task.actor)
                self.budget.unreserve(task.reserved)
            self.running.clear()

    def _loop(self) -> Iterator[tuple[int, ray.ObjectRef]]:
        while True:
            self._schedule()
            if self.to_yield:
                shard = self.to_yield.popleft()
                yield shard, self.budget.payload((self.tag, shard))
                continue
            if not self.running and not self.pending:
                return  # a restarting actor's ping is picked up by the next run
            pings = self.pool.pings()
            waiting = list(self.running) + list(pings)
            if not waiting:
                self.budget.wait(self.options.release_wait_s)
                continue
            # A short timeout lets releases from other threads open the budget.
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
            for ref in ready:
                if ref in pings:
                    self.pool.on_ping(pings[ref])
                else:
                    self._on_done(ref)
