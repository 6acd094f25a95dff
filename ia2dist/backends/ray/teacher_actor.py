"""``TeacherActor``: one frozen teacher replica in a Ray actor process.

The ``teacher_pool.TeacherPool`` starts one per placement-group bundle. ``run_shard`` runs
``ia2dist.teacher.extract.extract`` on a shard of examples and returns each shard as a
``PackedShard`` per part (``transport.pack_parts``) through the object store, next to a small
completion record that the driver reads (it never touches the payload). With a ``TeacherStore``
(``ia2dist.teacher.store``) the actor also persists every shard it extracts.

The actors also evaluate the frozen base model (the base and ICL baselines, and the base's
per-layer similarity to the ICL teacher): ``evaluate`` runs ``ia2dist.eval.runner.evaluate`` on the
replica the actor already holds. With ``gpus_per_actor`` k > 1 one replica spans the actor's k GPUs
(``ia2dist.model.placement.plan_device_map``: whole decoder layers per device under a per-device
budget, dispatched by accelerate).

A failure to load the model is kept and raised by every later call (so that the driver gets the
IA2Error's one line instead of a dead-actor traceback); ``reraise_task_error`` turns a failed
actor task into that line on the driver.
"""

from __future__ import annotations

import os

import ray
import torch

from ia2dist import procmem
from ia2dist.backends.ray.devices import worker_environment
from ia2dist.backends.ray.packing import unpack_records
from ia2dist.backends.ray.transport import pack_parts
from ia2dist.errors import IA2Error
from ia2dist.eval.runner import evaluate, shared_accuracy
from ia2dist.model.dtypes import DTYPES
from ia2dist.model.load import load_model, load_model_config, load_tokenizer
from ia2dist.model.placement import plan_device_map
from ia2dist.model.structure import attention_sites
from ia2dist.teacher.extract import extract, proven_decoding


class TeacherActor:
    """One frozen teacher replica. Load errors are kept and reported by ``info`` (so the driver
    gets the IA2Error's message instead of a dead-actor traceback)."""

    def __init__(self, model_cfg, extract_kwargs: dict, device: str, num_threads: int,
                 num_gpus: float = 0.0, reserve_bytes: int = 0):
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
                               f"({first_line(exc)}); give each replica more GPUs "
                               f"(dist.teacher_gpus), use model.dtype=bfloat16, or check "
                               f"`ia2dist plan`")
            return
        for param in self.model.parameters():
            param.requires_grad_(False)
        self._shared: dict[str, tuple] = {}

    def memory(self) -> dict:
        """This replica's resident memory: before loading, now, and its peak."""
        return procmem.report()

    def decoding(self) -> list[dict]:
        """The decode settings this replica proved (``ia2dist.teacher.extract.proven_decoding``)."""
        return proven_decoding()

    def info(self) -> dict:
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
        """Extract one shard; with a ``store`` also persist it. Returns (completion record: the
        shard's bytes, payload per part) as separate objects so the driver reads the small one
        only."""
        if self.load_error is not None:
            raise IA2Error(self.load_error)
        records = extract(self.model, self.tokenizer, prompts, uids, **self.extract_kwargs)
        if store is not None:
            store.write(shard_index, records)
        packed = pack_parts(records, parts, meta={"shard_index": shard_index, "attempt": attempt,
                                                  "pid": os.getpid()})
        done = {"act_nbytes": sum(p.act_nbytes for p in packed),
                "nbytes": sum(p.nbytes for p in packed)}
        return (done, *packed)

    def evaluate(self, plan, unit_key: str, name: str, with_demos: bool,
                 sim_refs=None) -> list[dict]:
        """Evaluate the frozen base as baseline ``name`` of the unit (writes its metrics.json and
        predictions.json; returns the result rows). The base's prompts without demos are the same
        for every unit: evaluated once per actor and reused (its similarity is per unit).
        ``sim_refs``: the unit's similarity-record shards (object refs) for the similarity."""
        if self.load_error is not None:
            raise IA2Error(self.load_error)
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
    budgets = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        budgets.append(min(free, int(total * 0.95)) - int(reserve_bytes))
    return plan_device_map(load_model_config(model_cfg), model_cfg.dtype, budgets)


# --------------------------------------------------------------------------------------------------
# An actor's failures, as the driver reports them
# --------------------------------------------------------------------------------------------------

def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters; its type when empty)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def reraise_task_error(exc: ray.exceptions.RayTaskError, where: str):
    """Raise a failed actor task as a one-line IA2Error: the actor's own IA2Error as it is,
    anything else prefixed with ``where``."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, IA2Error):
        raise IA2Error(str(cause)) from None
    raise IA2Error(f"{where}: {type(cause or exc).__name__}: {first_line(cause or exc)}; see the "
                   f"actor's log in the Ray temp dir") from None
