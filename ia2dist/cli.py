"""Command line: ``ia2dist <verb> [CONFIG.yaml] [key=value ...] [flags]``.

Verbs: extract (teacher responses + activations), train (methods), eval (baselines + trained
methods, report), run (the whole experiment; continues any run directory that is not complete),
status (a run directory's state), plan (memory per role), export (a checkpoint -> adapter / full
model), compare (several runs' reports in one table). Overrides use dotted config paths, e.g.
``train.lr=3e-4 data.num_train=[2,4,8] model.name_or_path=/models/llama-3.2-1b``.
Errors caused by input print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

VERBS = {
    "extract": "extract ICL teacher responses and per-layer activations for every (N, seed)",
    "train": "train methods on the teacher outputs (extracting them first when absent)",
    "eval": "evaluate baselines and the trained methods of a run directory, write the report",
    "run": "the whole experiment: extract -> train each method -> eval -> report; on a run_dir "
           "that is not complete, continue it (finished work reused, jobs continue from "
           "checkpoints)",
    "status": "print a run directory's state (complete, partial, running, failed, preempted, "
              "interrupted) and what is done and left",
    "plan": "print the memory each process role needs for the configured cluster shape, the GPUs "
            "it uses in all and whether it fits (exit status 1 when not); needs only the model's "
            "config.json: no weights are loaded, no dataset is downloaded, and without the "
            "tokenizer files or local data the prompt lengths are estimated",
}

EPILOG = """\
config: a YAML file with sections model, data, extract, train, eval, wandb, dist (see
docs/config.md); omitted fields take their defaults, so no file is needed for the embedded demo.
protocol: reference (default; the paper code's choices) or ia2dist sets the defaults of the
options listed in docs/paper.md "Differences from the reference". Overrides: key=value with dotted paths,
values parsed as YAML, e.g.
  ia2dist run configs/demo.yaml data.num_train=[2,4] train.methods=[sft,ia2_then_sft]
"""


STATUS_EPILOG = """

States: complete (every planned job trained and evaluated, baselines evaluated, report written
after them), partial (the last verb finished its part, work is left), running (a live process
holds the run directory), interrupted (it was running and its process is gone), failed (with the
error), preempted (stopped on request after checkpointing). `ia2dist run` continues every state but
complete; extract, train and eval never make a run complete unless nothing is left.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ia2dist", description="IA2 (ICL activation alignment) "
                                     "trainer.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, text in VERBS.items():
        if verb == "status":
            p = sub.add_parser(verb, help=text, description=text + STATUS_EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            p.add_argument("run_dir", metavar="RUN_DIR")
            p.add_argument("--json", action="store_true", help="print status.json as it is")
            p.add_argument("--state", action="store_true",
                           help="print only the state word ('none' for a directory without a run)")
            continue
        p = sub.add_parser(verb, help=text, description=text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("args", nargs="*", metavar="CONFIG|key=value",
                       help="optional YAML config first, then overrides like train.lr=3e-4")
        if verb != "plan":
            p.add_argument("--overwrite", action="store_true",
                           help="replace existing outputs (run dir for extract/run, method folders "
                                "for train, metrics for eval) instead of refusing")
        if verb == "train":
            p.add_argument("--method", action="append", metavar="METHOD",
                           help="method to train (repeatable); default: train.methods from config")
        if verb == "plan":
            p.set_defaults(overwrite=False)
        if verb in ("train", "run"):
            p.add_argument("--resume-from", metavar="CHECKPOINT",
                           help="continue the job this checkpoint belongs to from it (e.g. "
                                "RUN/N4_seed0/checkpoints/ia2/p0_s0000050) instead of from the job's "
                                "latest checkpoint; other jobs resume from their latest as usual")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit without running")
    exp = sub.add_parser("export", help="turn a training checkpoint into a consolidated PEFT adapter "
                         "or full HF model (safetensors), optionally merged",
                         description="Write the student of CHECKPOINT (RUN/N*_seed*/checkpoints/"
                         "METHOD/NAME, one-process or DeepSpeed ZeRO) as a PEFT adapter or a full "
                         "model in safetensors, built from the run's saved config.")
    exp.add_argument("checkpoint", metavar="CHECKPOINT")
    exp.add_argument("--out", metavar="DIR", help="output directory (default: "
                     "RUN/exports/N{n}_seed{r}-METHOD-NAME)")
    exp.add_argument("--merge", action="store_true",
                     help="also write the base model with the adapter merged in (DIR/merged)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    cmp = sub.add_parser("compare", help="merge the reports of several run directories (tasks, "
                         "models) into one markdown table and figure",
                         description="Print one markdown comparison of the reports (metrics.json) "
                         "of RUN_DIRs: every method's accuracy / ECE / similarity at the chosen "
                         "sweep points, the paired differences (IA2 -> SFT minus SFT, ...) with "
                         "their 95% intervals, and the phases still improving at their limit.")
    cmp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    cmp.add_argument("--out", metavar="FILE.md", help="also write the markdown to FILE.md and the "
                     "figure of IA2 -> SFT minus SFT against N to FILE.png")
    return parser


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.version:
        from ia2dist import __version__

        print(__version__)
        return 0
    if not ns.verb:
        parser.print_help()
        return 2
    from ia2dist.errors import IA2Error

    try:
        return _dispatch(ns)
    except IA2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the run directory's status.json says 'failed'", file=sys.stderr)
        return 130
    except Exception as exc:
        from ia2dist.experiment.checkpoint import Preempted

        if isinstance(exc, Preempted):
            print(f"stopped: {exc}", file=sys.stderr)
            return 143
        raise


def _dispatch(ns) -> int:
    from ia2dist.config import dump_yaml, load_config

    if ns.verb == "compare":
        from ia2dist.eval.compare import compare

        print(compare(ns.run_dirs, ns.out), end="")
        return 0
    if ns.verb == "export":
        from ia2dist.export import export

        out = export(ns.checkpoint, ns.out, merge=ns.merge, overwrite=ns.overwrite)
        print(f"done: {out}")
        return 0
    if ns.verb == "status":
        return _status(ns)
    config_path, overrides = _split_args(ns.args)
    cfg = load_config(config_path, overrides, extra_checks=lambda c: _choice_problems(ns, c))
    if ns.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from ia2dist import driver

    if ns.verb == "plan":
        report, fits = driver.memory_report(cfg)
        print(report)
        return 0 if fits else 1
    if ns.verb in ("train", "run"):
        _stop_on_signals(cfg.run_dir)
    if cfg.dist.backend == "ray" and cfg.dist.ray_address is None:
        from ia2dist.backends.ray.auth import private_ray_settings

        private_ray_settings()
    if ns.verb == "extract":
        out = driver.run_extract(cfg, overwrite=ns.overwrite)
    elif ns.verb == "train":
        out = driver.run_train(cfg, methods=ns.method, overwrite=ns.overwrite,
                                 resume_from=ns.resume_from)
    elif ns.verb == "eval":
        out = driver.run_eval(cfg, overwrite=ns.overwrite)
    else:
        out = driver.run_all(cfg, overwrite=ns.overwrite, resume_from=ns.resume_from)
    final = out / "summary.md"
    print(f"done: {final if final.exists() else out}")
    return 0


def _choice_problems(ns, cfg) -> list[str]:
    """The command line's choices beyond the config (--method, --resume-from), checked in the
    same pass as the config, before anything is written or loaded."""
    from ia2dist.config import METHODS, expand_grid, unknown_method

    problems = []
    methods = getattr(ns, "method", None) or []
    for name in methods:
        if name not in METHODS:
            problems.append(f"--method {name}: {unknown_method(name)}")
        elif name not in cfg.train.methods:
            problems.append(f"--method {name}: not in train.methods ({', '.join(cfg.train.methods)}); "
                            f"add it (train.methods=[...,{name}]) so that the run directory plans it")
    resume_from = getattr(ns, "resume_from", None)
    if resume_from:
        from pathlib import Path

        from ia2dist.experiment.checkpoint import read_identity
        from ia2dist.errors import IA2Error

        path = Path(resume_from).expanduser()
        if not (path / "state.json").is_file():
            problems.append(f"--resume-from {resume_from}: not a checkpoint (no state.json); pass "
                            "a directory like RUN/N4_seed0/checkpoints/ia2/p0_s0000050")
            return problems
        try:
            ident = read_identity(path)["identity"]
        except IA2Error as exc:
            problems.append(f"--resume-from {resume_from}: {exc}")
            return problems
        planned = {(n, r, m if len(pts) == 1 else f"{m}-{p.tag}")
                   for m in (methods or cfg.train.methods) if m in METHODS
                   for pts in [expand_grid(cfg.train, m)] for p in pts
                   for n in cfg.data.num_train for r in cfg.data.seeds}
        name = f"{ident.get('method')}-{ident['setting']}" if ident.get("setting") \
            else ident.get("method")
        if (ident.get("n"), ident.get("seed"), name) not in planned:
            problems.append(f"--resume-from {resume_from}: a checkpoint of N={ident.get('n')} "
                            f"seed={ident.get('seed')} {name}, which this command does not train; "
                            "check data.num_train, data.seeds, train.methods and --method")
    return problems


def _status(ns) -> int:
    """`ia2dist status RUN_DIR`: the state recorded in status.json (a dead writer shows as
    interrupted); exit status 0, or 2 when the directory holds no run."""
    import json
    from pathlib import Path

    from ia2dist.experiment import rundir
    from ia2dist.errors import IA2Error

    run_dir = Path(ns.run_dir).expanduser()
    state = rundir.read_state(run_dir)
    if ns.state:
        print(state.get("state", "none"))
        return 0
    if not state:
        raise IA2Error(f"status: {run_dir} holds no run (no readable status.json); check the path")
    if ns.json:
        print(json.dumps(state, indent=1))
        return 0
    from ia2dist.driver import describe_progress

    print(f"{run_dir}: {describe_progress(state)}")
    return 0


def _stop_on_signals(run_dir: str) -> None:
    """SIGTERM / SIGUSR1 (a scheduler preempting or requeueing the job): every training job saves a
    checkpoint after its current optimizer step and stops; a second signal exits at once."""
    import signal
    from pathlib import Path

    from ia2dist.experiment.checkpoint import request_stop

    def handler(signum, frame):
        if getattr(handler, "fired", False):
            raise SystemExit(128 + signum)
        handler.fired = True
        print(f"ia2dist: {signal.Signals(signum).name}: checkpointing and stopping after the "
              "current step (send it again to exit now)", file=sys.stderr, flush=True)
        request_stop(Path(run_dir).expanduser())

    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, handler)
    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
