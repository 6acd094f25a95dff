"""ray_jobs/sweep.py - a learning rate x N x seed sweep as Ray jobs, one job per cell.

What:     submits `python -m ia2dist.cli run CONFIG` for every (lr, N, seed) cell to a running Ray
          cluster (Jobs API, runtime env from ray_jobs/runtime_env.yaml: the repo as working dir),
          each into RUN_ROOT/lr<lr>_N<N>_seed<seed>; prints one submission id per cell. With
          --wait, polls until every job ends, prints a status table and exits 1 if any failed.
          The jobs share the cluster: Ray queues what does not fit (--max-running limits it).
Needs:    RAY_ADDRESS=http://<head>:<dashboard port> (or --address) and the cluster's auth token in
          the environment (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH) when it has token auth.
Launch:   from the repository root:
            python ray_jobs/sweep.py --config configs/sst2_llama.yaml --lrs 1e-3 3e-4 --ns 4 8 \
                --seeds 0 1 2 --run-root /shared/runs/sweep1 --wait
Follow:   ray job list; ray job logs -f <id>; ray job stop <id>   (ray_jobs/README.md)
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def cells(lrs, ns, seeds):
    """(lr, N, seed) in a stable order: lr fastest, then N, then seed."""
    return [(lr, n, seed) for seed, n, lr in itertools.product(seeds, ns, lrs)]


def entrypoint(config: str | None, run_dir: Path, lr: str, n: int, seed: int, extra: list[str]) -> str:
    # cells with the same (N, seed) share teacher outputs through one cache next to the cells, and
    # their wandb runs one group named after the sweep's folder
    args = ["python -m ia2dist.cli run", config or "", f"run_dir={run_dir}", f"train.lr={lr}",
            f"'data.num_train=[{n}]'", f"'data.seeds=[{seed}]'",
            f"extract.cache_dir={run_dir.parent / 'teacher_cache'}",
            f"wandb.group={run_dir.parent.name}", *extra,
            "dist.backend=ray", "dist.ray_address=auto"]
    return " ".join(a for a in args if a)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=None, help="http://<head>:<dashboard port> (default: RAY_ADDRESS)")
    p.add_argument("--config", default="configs/demo.yaml", help="run YAML ('' for none)")
    p.add_argument("--lrs", nargs="+", default=["1e-3", "3e-4", "1e-4"])
    p.add_argument("--ns", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--run-root", default=None, help="absolute dir for the cells' run dirs "
                   "(default <repo>/runs/<sweep name>)")
    p.add_argument("--name", default=f"ia2sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every cell")
    p.add_argument("--max-running", type=int, default=0, help="submit at most this many at a time (0: all)")
    p.add_argument("--wait", action="store_true", help="wait for every job and report")
    args = p.parse_args(argv)

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    runtime_env = yaml.safe_load((REPO / "ray_jobs" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    run_root = Path(args.run_root or REPO / "runs" / args.name).resolve()
    pending = cells(args.lrs, args.ns, args.seeds)
    ids: dict[str, tuple] = {}
    while pending or (args.wait and any(s not in TERMINAL for s in _statuses(client, ids).values())):
        running = sum(s not in TERMINAL for s in _statuses(client, ids).values())
        while pending and (args.max_running <= 0 or running < args.max_running):
            lr, n, seed = pending.pop(0)
            cell = f"lr{lr}_N{n}_seed{seed}"
            job_id = client.submit_job(
                entrypoint=entrypoint(args.config, run_root / cell, lr, n, seed, args.extra),
                submission_id=f"{args.name}-{cell}", runtime_env=runtime_env,
                metadata={"sweep": args.name, "lr": str(lr), "num_train": str(n), "seed": str(seed)})
            ids[job_id] = (lr, n, seed)
            running += 1
            print(job_id, flush=True)
        if not args.wait and not pending:
            break
        time.sleep(5)
    if not args.wait:
        return 0
    statuses = _statuses(client, ids)
    for job_id, (lr, n, seed) in ids.items():
        print(f"{statuses[job_id]:10s} lr={lr} N={n} seed={seed}  {job_id}  {run_root}/lr{lr}_N{n}_seed{seed}")
    return 0 if all(s == str(JobStatus.SUCCEEDED) for s in statuses.values()) else 1


def _statuses(client, ids) -> dict[str, str]:
    return {job_id: str(client.get_job_status(job_id)) for job_id in ids}


if __name__ == "__main__":
    sys.exit(main())
