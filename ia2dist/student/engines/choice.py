"""Which training engine a run's student jobs use, and why (plain Python; no deepspeed import).

ZeRO-3 on a group of ONE rank partitions nothing, yet gathers and frees every weight on every
forward and backward: on the SmolLM2-135M shape a whole job cost 2.6-3.7x the CPU time of its
forwards and backwards as plain PyTorch, against 1.1-1.3x with the plain engine
(``benchmarks/bench_job_cost.py``). So ``dist.ds_config: auto`` (the default) picks from the
layout:

- ``dist.backend: local``: the plain PyTorch engine (``TorchEngine``), one process;
- a worker group of one rank: the plain engine, the model loaded whole, unless the memory plan
  says a student rank does not fit one GPU, then ZeRO-3 with parameters and optimiser state
  offloaded to the host (``zero3_offload``);
- a group of several ranks: ZeRO-3 (``zero3``), the model partitioned over the group.

A template named in ``dist.ds_config`` (zero3, zero3_offload, zero2 or a JSON path) asks for
DeepSpeed explicitly: it is used on every layout of the Ray backend, one-rank groups included.

Checkpoints move between engines (``TorchEngine.load_checkpoint`` reads DeepSpeed's, and
``DeepSpeedEngine.load_checkpoint`` the plain engine's), so a job resumes on another layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

AUTO = "auto"


@dataclass(frozen=True)
class EngineChoice:
    """engine: "torch" (the plain engine) or "deepspeed"; template: the DeepSpeed template
    (name or path; None for the plain engine); reason: why, in words (run.log, the run's
    distributed_stats.json and each job's history.json say it)."""

    engine: str
    template: str | None
    reason: str

    def describe(self) -> str:
        what = "plain PyTorch engine" if self.engine == "torch" else f"DeepSpeed {self.template}"
        return f"{what}: {self.reason}"

    def record(self) -> dict:
        return asdict(self)


def choose_engine(dist, *, student_bytes: int | None = None,
                  gpu_bytes: int | None = None) -> EngineChoice:
    """The engine of ``dist`` (``DistConfig``). student_bytes: what the memory plan gives a
    student rank on the plain engine; gpu_bytes: memory of one GPU (None: unknown). Both only
    matter for a one-rank group on GPUs under ``ds_config: auto``."""
    if dist.backend == "local":
        return EngineChoice("torch", None, "dist.backend=local trains in this process")
    if dist.ds_config != AUTO:
        return EngineChoice("deepspeed", dist.ds_config,
                            f"dist.ds_config={dist.ds_config} asks for it")
    if dist.group_size > 1:
        return EngineChoice("deepspeed", "zero3", f"a group of {dist.group_size} ranks partitions "
                            f"the model over its ranks (dist.ds_config=auto)")
    if dist.use_gpu and student_bytes is not None and gpu_bytes is not None \
            and student_bytes > gpu_bytes:
        return EngineChoice("deepspeed", "zero3_offload",
                            f"the memory plan gives a student rank {student_bytes / 2**30:.1f} GiB "
                            f"but a GPU has {gpu_bytes / 2**30:.1f} GiB: ZeRO-3 offloads weights "
                            f"and optimiser state to the host (dist.ds_config=auto)")
    return EngineChoice("torch", None, "a group of one rank has nothing to partition; ZeRO-3 would "
                        "gather every weight on every pass (dist.ds_config=auto)")


def planned_template(dist) -> str | None:
    """The DeepSpeed template the memory plan sizes a student rank for before any fit check (the
    one-rank auto layout: None, the plain engine)."""
    return choose_engine(dist).template
