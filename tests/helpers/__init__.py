"""Helpers shared by both test tiers: one copy each.

- `cli_args`: the `ia2dist run/extract/train/eval` arguments of a tiny sst2 run;
- `write_sst2`: random sst2-shaped row files (the `sst2_files` fixture in conftest uses it);
- `refused`: the check of a refusal (exit status 2, one `error:` line naming what is wrong);
- `free_port` and `torchrun`: a test file launched as its own worker on CPU ranks (gloo).

Beside it: `listening.py` (the sockets a process tree listens on) and `gguf_fixtures.py` (tiny GGUF
files and wheels).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ia2dist.cli import main

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "data"
#: The sst2 fixture rows: (train, eval).
SST2 = (FIXTURES / "sst2_train.jsonl", FIXTURES / "sst2_validation.jsonl")

WORDS = ("good bad great awful fine dull bright grim happy sad film plot actor scene story music "
         "long short warm cold").split()


def write_sst2(path: Path, n: int, seed: int, words_per_row: int = 6) -> Path:
    """``n`` sst2 rows of seeded random words with random labels."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(words_per_row))
            fh.write(json.dumps({"idx": i, "sentence": text, "label": rng.randint(0, 1)}) + "\n")
    return path


def cli_args(run_dir, train, evals, *extra, num_train: int = 4, epochs: int = 2) -> list[str]:
    """The arguments of a tiny sst2 run on `tiny:llama` (one unit: N=num_train, seed 0), then
    ``extra`` (later settings win)."""
    return [f"run_dir={run_dir}", "model.name_or_path=tiny:llama", "data.task=sst2",
            f"data.train_path={train}", f"data.eval_path={evals}", f"data.num_train=[{num_train}]",
            "data.seeds=[0]", f"train.epochs={epochs}", "eval.similarity_items=4",
            "wandb.mode=disabled", *extra]


def refused(capsys, argv, *needles) -> str:
    """Run the CLI in this process; it must exit with status 2 and ONE `error:` line on stderr
    holding every needle. Returns the line."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: Path, *args, nproc: int = 2, timeout: int = 400,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Launch ``script`` with ``args`` on ``nproc`` local ranks (gloo, DeepSpeed on the CPU; the
    repository on the path); the test fails with the output's tail if the launch fails."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_ext"), "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
           str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
