"""The distributed run: Ray teacher stage -> object store -> Ray Train + DeepSpeed students.

``RayBackend`` replaces the one-process teacher extraction and training of
``ia2dist.pipeline.Experiment`` for ``dist.backend: ray``; splits, evaluation and the report stay in
the driver. Per (N, seed) unit:

1. the examples are ordered as the training loop will first visit them (dev first, then the
   training items in the loop's first-epoch order) and cut into shards;
2. a pump thread runs the teacher stage and publishes each finished shard's ObjectRef to a
   ``ShardBroker``; a release thread returns shards to the byte budget once every worker has read
   them; the stage persists every shard under ``unit/teacher_shards`` (reused by later runs);
3. for each method a ``TorchTrainer`` runs ``student_worker`` on ``dist.num_workers`` DeepSpeed ranks;
   the first method trains while extraction continues (``dist.pipeline``), later methods re-read the
   shards from the object store (spilled to disk if needed), nothing is recomputed;
4. rank 0 writes the consolidated adapter/model, the driver evaluates it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ray

from ia2dist import rundir
from ia2dist.errors import IA2Error
from ia2dist.orchestration.cluster import check_resources, connect
from ia2dist.orchestration.student_stage import ItemSpec, ShardBroker, resolve_ds_template, student_worker
from ia2dist.orchestration.teacher_stage import TeacherStage, TeacherStageOptions

log = logging.getLogger("ia2dist")


class RayBackend:
    def __init__(self, exp):
        from ia2dist.student.dsconfig import fill_ds_config

        self.exp = exp
        cfg = exp.cfg
        d = cfg.dist
        self.ds_template = resolve_ds_template(d.ds_config)
        # conflicts between the template and the run config fail here, before any work
        fill_ds_config(str(self.ds_template), train_cfg=cfg.train, model_dtype=cfg.model.dtype,
                       world_size=d.num_workers)
        need = d.teacher_actors * d.teacher_cpus + d.num_workers * d.cpus_per_worker
        num_cpus = d.num_cpus or max(os.cpu_count() or 1, math.ceil(need))
        self.ctx = connect(d.ray_address, num_cpus=num_cpus, object_store_bytes=d.object_store_bytes)
        try:
            stage_actors = d.teacher_actors if d.teacher_mode == "stage" else 0
            check_resources(stage_actors, d.teacher_cpus, d.teacher_gpus,
                            num_workers=0 if d.colocate else d.num_workers,
                            cpus_per_worker=d.cpus_per_worker,
                            gpus_per_worker=1.0 if d.use_gpu else 0.0,
                            strategy=d.placement_strategy)
            check_resources(0, num_workers=d.num_workers, cpus_per_worker=d.cpus_per_worker,
                            gpus_per_worker=1.0 if d.use_gpu else 0.0, what="student")
        except BaseException:
            self.ctx.shutdown()
            raise
        self.stage = None
        if d.teacher_mode == "stage":
            self.stage = TeacherStage(cfg.model, cfg.extract, max_new_tokens=exp.max_new_tokens,
                                      options=TeacherStageOptions(
                                          num_actors=d.teacher_actors, cpus_per_actor=d.teacher_cpus,
                                          gpus_per_actor=d.teacher_gpus,
                                          placement_strategy=d.placement_strategy,
                                          shard_size=d.shard_size, byte_budget=d.inflight_bytes,
                                          release_wait_s=3600.0))
        self.stats: list[dict] = []

    def close(self, keep_logs: bool = False) -> None:
        """Stop the teacher stage and disconnect (a private local Ray is stopped and its temp
        dir deleted, unless ``keep_logs``: a failed run keeps the Ray session logs)."""
        if self.stage is not None:
            self.stage.close()
        self.ctx.shutdown(keep_temp_dir=keep_logs)

    # ------------------------------------------------------------------ one unit
    def _ordered(self, unit):
        """(kind, index) of every example in the order the training loop first reads it: the
        training items of its first epoch, with the dev items where the first dev evaluation
        happens (after ``eval_every`` optimizer steps)."""
        from ia2dist.student.trainer import first_epoch_order

        t = self.exp.cfg.train
        seed = self.exp.cfg.seed * 1000 + unit.seed
        train = [("train", i) for i in first_epoch_order(len(unit.train), seed)]
        cut = min(len(train), t.eval_every * t.batch_size)
        return train[:cut] + [("dev", j) for j in range(len(unit.dev))] + train[cut:]

    def _specs(self, unit, order):
        """Item specs in the loop's index order (train items, then dev), pointing into shards."""
        from ia2dist.data.prompts import student_prompt
        from ia2dist.modeling import encode

        exp, size = self.exp, self.exp.cfg.dist.shard_size
        position = {key: k for k, key in enumerate(order)}
        examples = [("train", i, ex) for i, ex in enumerate(unit.train)]
        examples += [("dev", j, ex) for j, ex in enumerate(unit.dev)]
        prompt_ids = encode(exp.tokenizer, [student_prompt(ex) for _, _, ex in examples])
        icl = exp.cfg.train.label_type == "icl"
        specs = []
        for (kind, i, ex), ids in zip(examples, prompt_ids):
            k = position[(kind, i)]
            specs.append(ItemSpec(uid=ex.uid, prompt_ids=ids,
                                  target_ids=None if icl else exp.target_ids(ex, None),
                                  shard=k // size, offset=k % size))
        return specs

    def extract_unit(self, unit) -> None:
        """Teacher stage only (``ia2dist extract``): every shard persisted under
        unit/teacher_shards, where a later train/run with the same settings finds it."""
        if self.stage is None:
            raise IA2Error("dist.teacher_mode=online computes teacher outputs inside the students; "
                           "`ia2dist extract` needs dist.teacher_mode=stage")
        order = self._ordered(unit)
        pick = {"train": (unit.train, unit.train_demo_lists), "dev": (unit.dev, unit.dev_demo_lists)}
        prompts = [self._teacher_prompt(pick[k][1][i], pick[k][0][i]) for k, i in order]
        uids = [pick[k][0][i].uid for k, i in order]
        cache_dir = self._shard_dir(unit, uids)
        for index, _ref in self.stage.run(prompts, uids, cache_dir=cache_dir,
                                          cache_meta=self.exp.teacher_meta(unit, [])):
            self.stage.release(index)

    def _shard_dir(self, unit, ordered_uids: list[str]):
        return self.exp.teacher_dir(unit, "teacher_shards", ordered_uids,
                                    shard_size=self.exp.cfg.dist.shard_size)

    @staticmethod
    def _teacher_prompt(demos, ex) -> str:
        from ia2dist.data.prompts import teacher_prompt

        return teacher_prompt(demos, ex)

    def _unit_inputs(self, unit) -> dict:
        """Teacher prompts in read order, item specs and the unit's broker."""
        d = self.exp.cfg.dist
        order = self._ordered(unit)
        pick = {"train": (unit.train, unit.train_demo_lists), "dev": (unit.dev, unit.dev_demo_lists)}
        prompts = [self._teacher_prompt(pick[k][1][i], pick[k][0][i]) for k, i in order]
        uids = [pick[k][0][i].uid for k, i in order]
        specs = self._specs(unit, order)
        broker = ShardBroker.remote(math.ceil(len(order) / d.shard_size), d.num_workers)
        out = {"unit": unit, "prompts": prompts, "uids": uids, "specs": specs, "broker": broker}
        if self.stage is None:  # online teacher: workers need the ICL prompts in item order
            by_uid = dict(zip(uids, prompts))
            out["teacher_prompts"] = [by_uid[s.uid] for s in specs]
        return out

    def train_units(self, units, methods: list[str],
                    on_trained: Callable[[object, str, Path], None] | None = None) -> None:
        """Train every method on every unit in ONE Ray Train run (workers start once), while the
        teacher stage extracts unit after unit; then publish each method folder and call
        ``on_trained(unit, method, dir)`` (the driver evaluates there)."""
        exp, d = self.exp, self.exp.cfg.dist
        done, pending = [], {}
        for unit in units:  # a resumed run: methods an earlier attempt finished are not retrained
            for method in methods:
                final, tmp = unit.dir / method, rundir.staging_name(unit.dir / method)
                if exp.trained_dir(unit, method) is None and (tmp / "history.json").is_file():
                    rundir.commit_dir(tmp, final)  # trained, killed before it was published
                if exp.trained_dir(unit, method) is not None:
                    log.info("N=%d seed=%d: %s was trained by an earlier attempt", unit.n,
                             unit.seed, method)
                    done.append((unit, method, final))
                else:
                    pending.setdefault(unit.dir, (unit, []))[1].append(method)
        if on_trained is not None:
            for unit, method, final in done:
                on_trained(unit, method, final)
        if not pending:
            return
        inputs = [self._unit_inputs(unit) for unit, _ in pending.values()]
        pump = None
        if self.stage is not None:
            sequential = not d.pipeline or d.colocate
            pump = _Pump(self.stage, [(x["broker"], x["prompts"], x["uids"],
                                       self._shard_dir(x["unit"], x["uids"]),
                                       exp.teacher_meta(x["unit"], [])) for x in inputs],
                         eager_release=sequential)
            pump.start()
            if sequential:
                pump.join_production()
                if d.colocate:
                    self.stage.close()
        jobs, finals = [], []
        for x, (unit, unit_methods) in zip(inputs, pending.values()):
            for method in unit_methods:
                final = unit.dir / method
                tmp = rundir.staging_dir(final)
                finals.append((unit, method, tmp, final))
                job = {"key": unit.dir.name, "method": method, "seed": exp.cfg.seed * 1000 + unit.seed,
                       "broker": x["broker"], "specs": x["specs"], "num_train": len(unit.train),
                       "out_dir": str(tmp.resolve()),
                       "checkpoint": exp.checkpoint_options(unit, method)}
                if "teacher_prompts" in x:
                    job["teacher_prompts"] = x["teacher_prompts"]
                jobs.append(job)
        config = {"cfg": exp.cfg, "ds_template": str(self.ds_template),
                  "online": self.stage is None, "max_new_tokens": exp.max_new_tokens, "jobs": jobs}
        t0 = time.perf_counter()
        try:
            self._fit(config, len(jobs), [tmp for _, _, tmp, _ in finals])
        finally:
            if pump is not None:
                pump.stop()
                self.stats.append({"teacher": pump.summary()})
            for x in inputs:
                ray.kill(x["broker"])
        self.stats.append({"student": {"jobs": len(jobs), "train_s": time.perf_counter() - t0,
                                       "num_workers": d.num_workers,
                                       "examples": sum(len(j["specs"]) for j in jobs)}})
        unfinished = []
        for unit, method, tmp, final in finals:
            if not (tmp / "history.json").is_file():
                unfinished.append(f"N={unit.n} seed={unit.seed} {method}")
                continue
            rundir.commit_dir(tmp, final)
            if on_trained is not None:
                on_trained(unit, method, final)
        if unfinished:
            from ia2dist.checkpoint import STOP_FILE, Preempted

            if (exp.run_dir / STOP_FILE).exists():
                raise Preempted(f"stopped on request with {len(unfinished)} job(s) unfinished "
                                f"({', '.join(unfinished[:3])}); checkpoints saved, rerun to resume")
            raise IA2Error(f"student stage ended without finishing {', '.join(unfinished[:3])}")

    def _fit(self, config: dict, num_jobs: int, out_dirs: list[Path]) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        d = self.exp.cfg.dist
        storage = (self.exp.run_dir / ".ray_train").resolve()
        trainer = TorchTrainer(
            student_worker, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                         resources_per_worker={"CPU": d.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
            run_config=RunConfig(name=f"students-{time.time_ns()}", storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=d.max_failures)))
        log.info("training %d (unit, method) jobs on %d Ray Train workers (DeepSpeed %s)", num_jobs,
                 d.num_workers, self.ds_template.stem)
        done = threading.Event()
        watcher = threading.Thread(target=_watch_jobs, args=(out_dirs, done), daemon=True)
        watcher.start()
        try:
            trainer.fit()
        except Exception as exc:  # Ray wraps worker errors; surface the worker's own message
            raise IA2Error(f"student stage failed: {_root_message(exc)}") from None
        finally:
            done.set()
            watcher.join(2)


def _watch_jobs(out_dirs: list[Path], done: threading.Event) -> None:
    """Progress bar over the students' jobs (rank 0 writes history.json when one finishes)."""
    from ia2dist.progress import progress

    bar = progress(len(out_dirs), "students", "job", each=True)
    seen = 0
    while not done.wait(0.5):
        finished = sum((p / "history.json").exists() for p in out_dirs)
        bar.update(finished - seen)
        seen = finished
    bar.update(sum((p / "history.json").exists() for p in out_dirs) - seen)
    bar.close()


def _root_message(exc: BaseException) -> str:
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    text = str(seen).strip().splitlines()
    lines = [line for line in text if line.strip()]
    return lines[-1][:400] if lines else type(seen).__name__


class _Pump:
    """Drives the teacher stage in a thread, unit after unit: publishes each finished shard to its
    unit's broker, and returns shards every worker has read to the byte budget."""

    def __init__(self, stage: TeacherStage, units: list[tuple], eager_release: bool = False):
        self.stage, self.units, self.eager_release = stage, units, eager_release
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._stop = threading.Event()
        self._current = None
        self.per_unit: list[dict] = []
        self._threads = [threading.Thread(target=self._produce, daemon=True),
                         threading.Thread(target=self._release, daemon=True)]
        self.started = self.finished = None
        self.first_shard_at = None

    def start(self) -> None:
        self.started = time.perf_counter()
        for thread in self._threads:
            thread.start()

    def _produce(self) -> None:
        from ia2dist.progress import progress

        size = self.stage.options.shard_size
        bar = progress(sum(math.ceil(len(u[1]) / size) for u in self.units), "teacher shards",
                       "shard")
        try:
            for broker, prompts, uids, cache_dir, meta in self.units:
                self._current = broker
                for index, ref in self.stage.run(prompts, uids, cache_dir=cache_dir, cache_meta=meta):
                    if self.first_shard_at is None:
                        self.first_shard_at = time.perf_counter()
                    broker.put.remote(index, [ref])
                    bar.update(1)
                    if self.eager_release:  # stage after stage: the broker's ref keeps the shard
                        self.stage.release(index)
                stats = self.stage.stats
                self.per_unit.append({"cache_dir": str(cache_dir), "shards": stats.num_shards,
                                      "act_bytes": sum(stats.act_bytes), "reruns": stats.reruns,
                                      "from_cache": sum(stats.from_cache),
                                      "peak_inflight_bytes": stats.peak_inflight_bytes})
        except BaseException as exc:  # reaches the workers through the brokers
            self.error = exc
            message = f"teacher stage failed: {str(exc).splitlines()[0] if str(exc) else exc}"
            for broker, *_ in self.units:
                broker.fail.remote(message)
        finally:
            bar.close()
            self.finished = time.perf_counter()
            self._done.set()

    def _release(self) -> None:
        while not self._stop.is_set():
            broker = self._current
            if broker is not None:
                try:
                    for index in ray.get(broker.take_released.remote()):
                        self.stage.release(index)
                except Exception:  # the broker is gone at the end of the run
                    return
            self._stop.wait(0.1)

    def join_production(self) -> None:
        """Wait until every shard is extracted (stage-after-stage mode; shards are released as they
        are published, so the budget throttles extraction and never waits for the students)."""
        while not self._done.wait(0.1):
            pass
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()
        self._done.wait(5)
        if self.error is not None and not isinstance(self.error, IA2Error):
            log.warning("teacher stage: %s", self.error)

    def summary(self) -> dict:
        units = self.per_unit
        return {"extract_s": (self.finished or time.perf_counter()) - self.started,
                "first_shard_s": None if self.first_shard_at is None else
                self.first_shard_at - self.started,
                "byte_budget": self.stage._budget() if units else None,
                "peak_inflight_bytes": max((u["peak_inflight_bytes"] for u in units), default=0),
                "act_bytes": sum(u["act_bytes"] for u in units),
                "reruns": sum(u["reruns"] for u in units),
                "shards": sum(u["shards"] for u in units), "units": units}
