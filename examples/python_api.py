"""Run an IA2 experiment from Python and read its results.

    python examples/python_api.py [RUN_DIR]

``ia2dist.run`` takes what ``ia2dist run`` takes: a YAML config (or a ``RunConfig``, or None for
the defaults) and dotted overrides, here as a mapping. This one is the demo, scaled down to a minute
on a laptop CPU: one process (``dist.backend: local``), N = 4, one seed, SFT against IA2 -> SFT.
It returns the run directory; ``metrics.json`` there holds every number of ``summary.md``.
"""

import json
import sys
from pathlib import Path

import ia2dist

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main(run_dir: str = "runs/python-api") -> dict:
    out = ia2dist.run(DEMO, {
        "run_dir": run_dir,
        "dist.backend": "local",
        "data.num_train": [4],
        "data.seeds": [0],
        "data.max_eval": 32,
        "train.methods": ["sft", "ia2_then_sft"],
        "train.epochs": 3,
        "eval.similarity_items": 8,
    })
    metrics = json.loads((out / "metrics.json").read_text())
    accuracy = {row["method"]: row["label_accuracy_mean"] for row in metrics["aggregate"]}
    for method, value in accuracy.items():
        print(f"{method:>14}  label accuracy {value:.3f}")
    print(f"report: {out / 'summary.md'}")
    return accuracy


if __name__ == "__main__":
    main(*sys.argv[1:])
