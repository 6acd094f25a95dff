"""The Ray Train student stage: DeepSpeed workers consuming teacher shards as they arrive.

The driver hands every worker the same item list (prompt and target token ids) and a ``ShardBroker``
actor through which the teacher stage's ObjectRefs arrive. ``LazyItems`` resolves an item's teacher
record the first time the training loop touches it: it waits for the shard holding it, reads the
shard zero-copy from the object store, and keeps it for later epochs and methods (re-reads never
recompute). The teacher stage extracts examples in the order the loop visits them in its first
epoch (``first_epoch_order``), so training starts on the first shards while extraction continues.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ray

from ia2dist.errors import IA2Error


@ray.remote(num_cpus=0)
class ShardBroker:
    """Holds the ObjectRefs of finished teacher shards (wrapped in lists so Ray passes the refs, not
    their values) and tracks which shards every consumer has read."""

    def __init__(self, num_shards: int, num_consumers: int):
        self._refs: dict[int, list] = {}
        self._events = {i: asyncio.Event() for i in range(num_shards)}
        self._readers: dict[int, set[int]] = {i: set() for i in range(num_shards)}
        self._num_consumers = num_consumers
        self._released: set[int] = set()
        self._to_report: list[int] = []
        self._error: str | None = None

    def put(self, index: int, wrapped_ref: list) -> None:
        self._refs[index] = wrapped_ref
        self._events[index].set()

    def fail(self, message: str) -> None:
        """The producer failed: wake every waiting consumer with the error."""
        self._error = message
        for event in self._events.values():
            event.set()

    async def get(self, index: int) -> list:
        await self._events[index].wait()
        if index not in self._refs:
            raise RuntimeError(self._error or f"teacher shard {index} was never produced")
        return self._refs[index]

    def consumed(self, index: int, consumer: int) -> None:
        self._readers[index].add(consumer)
        if len(self._readers[index]) >= self._num_consumers and index not in self._released:
            self._released.add(index)
            self._to_report.append(index)

    def take_released(self) -> list[int]:
        out, self._to_report = self._to_report, []
        return out


@dataclass
class ItemSpec:
    """What a worker needs to build a StudentItem besides the teacher record."""

    uid: str
    prompt_ids: list[int]
    target_ids: list[int] | None  # None: the teacher's own response (label_type icl)
    shard: int
    offset: int


class LazyItems(Sequence):
    """StudentItems whose teacher records are fetched from the broker on first access."""

    def __init__(self, specs: list[ItemSpec], broker, consumer: int, num_layers: int,
                 need_topk: bool):
        self.specs, self.broker, self.consumer = specs, broker, consumer
        self.num_layers, self.need_topk = num_layers, need_topk
        self._shards: list[list] = []
        self._items: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index not in self._items:
            self._items[index] = self._build(self.specs[index])
        return self._items[index]

    def _records(self, shard: int) -> list:
        """Records of ``shard``, fetching every earlier shard first: shards are produced in index
        order and return to the byte budget once read, so reading in order can never wait on a
        shard the budget keeps from being produced (whatever order the loop asks in)."""
        from ia2dist.orchestration.packing import unpack_records

        for index in range(len(self._shards), shard + 1):
            (ref,) = ray.get(self.broker.get.remote(index))
            records = unpack_records(ray.get(ref))
            for rec in records:
                self._check(rec)
            self._shards.append(records)
            self.broker.consumed.remote(index, self.consumer)
        return self._shards[shard]

    def _check(self, rec) -> None:
        if rec.acts_LTD.shape[0] != self.num_layers:
            raise IA2Error(f"example {rec.uid}: teacher activations have {rec.acts_LTD.shape[0]} "
                           f"layers but the student has {self.num_layers}; extract with the "
                           "student's base model")
        if self.need_topk and rec.topk_logprobs_Tk is None:
            raise IA2Error(f"example {rec.uid}: soft_sft needs the teacher's top-k; set extract.topk")

    def _build(self, spec: ItemSpec):
        from ia2dist.student.batching import StudentItem

        rec = self._records(spec.shard)[spec.offset]
        assert rec.uid == spec.uid, (rec.uid, spec.uid)
        targets = spec.target_ids if spec.target_ids is not None else rec.response_ids.tolist()
        return StudentItem(uid=spec.uid, prompt_ids=spec.prompt_ids, target_ids=targets, teacher=rec)


def resolve_ds_template(name: str) -> Path:
    """'zero3' -> <repo>/ds_configs/zero3.json; a path is used as is."""
    path = Path(name).expanduser()
    if path.suffix == ".json" or os.sep in name:
        if not path.is_file():
            raise IA2Error(f"dist.ds_config: {name} does not exist; use zero3, zero3_offload, zero2 "
                           "or the path of a DeepSpeed JSON template")
        return path.resolve()
    bundled = Path(__file__).resolve().parents[2] / "ds_configs" / f"{name}.json"
    if not bundled.is_file():
        raise IA2Error(f"dist.ds_config: no template named {name!r} in {bundled.parent}; use zero3, "
                       "zero3_offload, zero2 or a JSON file path")
    return bundled


def student_worker(config: dict) -> None:
    """Ray Train worker: load the base model once, then for every (unit, method) job build a fresh
    student (same seeded adapter init as the one-process path), train it with DeepSpeed and save it
    consolidated. Every rank runs every job, so ZeRO collectives stay aligned."""
    import copy
    import gc

    import torch
    import torch.distributed as dist

    cfg = config["cfg"]
    if not cfg.dist.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(max(1, int(cfg.dist.cpus_per_worker)))
    from ia2dist.modeling import attention_sites, load_model
    from ia2dist.student.deepspeed_engine import init_distributed

    init_distributed()
    device = None
    if cfg.dist.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    base = load_model(cfg.model, device=device)
    for param in base.parameters():
        param.requires_grad_(False)
    num_layers = len(attention_sites(base))
    unit_items: dict[str, tuple] = {}
    for job in config["jobs"]:
        if (Path(job["out_dir"]) / "history.json").is_file():
            continue  # finished before this worker group was restarted
        if job["key"] not in unit_items:
            unit_items[job["key"]] = _unit_items(base, job, config, dist.get_rank(), num_layers)
        train_items, dev_items = unit_items[job["key"]]
        from ia2dist.checkpoint import Preempted

        try:
            _train_job(copy.deepcopy(base), job, config, train_items, dev_items)
        except Preempted:  # checkpoint saved: end normally, the driver reports the stop
            break
        gc.collect()
    import ray.train

    ray.train.report({"jobs": len(config["jobs"])})


def _unit_items(base, job: dict, config: dict, rank: int, num_layers: int):
    """The unit's training and dev items, shared by all its methods (records are read once)."""
    if config["online"]:
        return _online_items(base, job, config)
    lazy = LazyItems(job["specs"], job["broker"], rank, num_layers,
                     "soft_sft" in config["cfg"].train.methods)
    n_train = job["num_train"]
    return _View(lazy, 0, n_train), _View(lazy, n_train, len(lazy))


def _train_job(model, job: dict, config: dict, train_items, dev_items) -> None:
    import torch
    import torch.distributed as dist

    from ia2dist.checkpoint import Checkpointer
    from ia2dist.modeling import apply_adapter
    from ia2dist.student.deepspeed_engine import DeepSpeedEngineFactory
    from ia2dist.student.trainer import train

    cfg, seed = config["cfg"], job["seed"]
    torch.manual_seed(seed)
    model = apply_adapter(model, cfg.train.adapter, seed=seed)
    factory = DeepSpeedEngineFactory(config["ds_template"], model_dtype=cfg.model.dtype)
    rank = dist.get_rank()
    options = job.get("checkpoint")
    checkpointer = Checkpointer(**options, rank=rank) if options is not None else None
    try:
        result = train(model, train_items, dev_items, job["method"], cfg.train, seed=seed,
                       engine_factory=factory, validate_items=False, checkpointer=checkpointer)
    except BaseException:
        if factory.engine is not None:
            factory.engine.destroy()
        raise
    out_dir = Path(job["out_dir"])
    factory.engine.save_consolidated(out_dir)
    if rank == 0:
        tmp = out_dir / ".history.json.tmp"
        tmp.write_text(json.dumps({"history": result.history, "phases": result.phases,
                                   "world_size": dist.get_world_size(),
                                   "resumed_from": result.resumed_from}, indent=1))
        os.replace(tmp, out_dir / "history.json")
    factory.engine.destroy()
    dist.barrier()


class _View(Sequence):
    """A contiguous window of a LazyItems (train = first part, dev = the rest)."""

    def __init__(self, items: LazyItems, start: int, stop: int):
        self.items, self.start, self.stop = items, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.items[self.start + index]


def _online_items(base, job: dict, config: dict):
    """Online teacher: this worker runs the frozen base model on the ICL prompts itself, before
    any training (every rank runs the same prompts, so collectives stay aligned and no activations
    cross the network)."""
    import torch

    from ia2dist.modeling import load_tokenizer
    from ia2dist.student.batching import StudentItem
    from ia2dist.teacher.extract import extract

    cfg = config["cfg"]
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    records = extract(base, load_tokenizer(cfg.model), job["teacher_prompts"],
                      [s.uid for s in job["specs"]], max_new_tokens=config["max_new_tokens"],
                      stop_strings=tuple(cfg.extract.stop_strings),
                      batch_size=cfg.extract.batch_size, act_dtype=dtypes[cfg.extract.act_dtype],
                      topk=cfg.extract.topk)
    items = [StudentItem(uid=s.uid, prompt_ids=s.prompt_ids,
                         target_ids=s.target_ids if s.target_ids is not None
                         else rec.response_ids.tolist(), teacher=rec)
             for s, rec in zip(job["specs"], records)]
    n_train = job["num_train"]
    return items[:n_train], items[n_train:]
