"""Run the benchmark set and write ``benchmarks/results/latest.json`` and ``latest.md``.

    python -m benchmarks.run_all            # the CPU set (+ the GPU tier when CUDA is available)
    python -m benchmarks.run_all --quick    # a smaller, faster pass (harness check)
    python -m benchmarks.run_all --only extract student

Each benchmark runs both sides in this process (the distributed one: in ``ia2dist run``
subprocesses) on the same model, data and machine; figures go to files, nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import time
import traceback

from benchmarks.common import RESULTS_DIR, machine, write_json

ORDER = ("extract", "student", "eval", "memory", "pipeline", "gpu")
TITLES = {"extract": "Teacher extraction vs the reference (examples/s)",
          "student": "Student training vs the reference loop (examples/s, effective batch 4)",
          "eval": "Evaluation batching: dev evaluations and short-prompt prefill (SmolLM2-135M shape)",
          "memory": "Memory: activation bytes per example",
          "pipeline": "Distributed run (Ray teacher stage -> Ray Train/DeepSpeed students)",
          "gpu": "GPU tier (1B-class Llama, random weights)"}


def _module(name: str):
    import importlib

    return importlib.import_module(f"benchmarks.bench_{name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=ORDER)
    parser.add_argument("--out", default=str(RESULTS_DIR / "latest"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start_machine = machine()
    results, timings = {}, {}
    for name in args.only or ORDER:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            results[name] = _module(name).run(quick=args.quick)
        except Exception as exc:  # report and go on: one broken benchmark must not hide the rest
            results[name] = {"name": name, "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc(),
                             "markdown": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
        timings[name] = time.perf_counter() - t0
        print(results[name]["markdown"], f"\n({timings[name]:.0f} s)\n", flush=True)
    end_machine = machine()
    report = {"machine": start_machine, "load_at_end": end_machine["loadavg_1_5_15"],
              "quick": args.quick, "seconds": timings, "results": results}
    out = os.path.abspath(args.out)
    write_json(__import__("pathlib").Path(out + ".json"), report)
    with open(out + ".md", "w") as fh:
        fh.write(markdown(report))
    print(f"wrote {out}.json and {out}.md")
    return 0


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# ia2dist benchmarks ({m['date']})", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB, "
             f"torch {m['torch']} ({m['torch_threads']} threads), Python {m['python']}, "
             f"CUDA: {'yes, ' + m.get('gpu', '') if m['cuda'] else 'no'}. Load average "
             f"(1/5/15 min) at start {m['loadavg_1_5_15']}, at end {report['load_at_end']}."
             + (" Quick pass (reduced sizes)." if report["quick"] else ""), ""]
    for name in ORDER:
        if name not in report["results"]:
            continue
        lines += [f"## {TITLES[name]}", "", report["results"][name]["markdown"],
                  "", f"({report['seconds'][name]:.0f} s)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
