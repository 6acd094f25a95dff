# slurm/lib/run_or_resume.sh CONFIG [key=value ...] - start or resume `ia2dist` in a run directory.
#
# The arguments must name the run directory (run_dir=...; the sbatch scripts always pass one that
# is stable across requeues: runs/<job name>-<job id>). Three cases:
#   run_dir/status.json says complete  -> nothing to do (a requeue after the end), exit 0
#   run_dir/config.yaml exists         -> an earlier start of this job got that far: resume
#                                         `ia2dist train --overwrite` then `ia2dist eval`
#   otherwise                          -> `ia2dist run`
# What resumes today: the Ray teacher stage's finished shards (run_dir/N*_seed*/teacher_shards) and
# the one-process teacher cache (run_dir/N*_seed*/teacher) are reused, not extracted again;
# `train` checks that the model/data/extract config matches the saved one. What does NOT resume:
# training state. Every method is trained again from the start (DeepSpeed checkpoint/resume is not
# built yet), and evaluation and the report are redone. Replace this file by one call of
# `ia2dist run --resume` once the CLI has it.
set -euo pipefail
run_dir=
for arg in "$@"; do case "$arg" in run_dir=*) run_dir=${arg#run_dir=} ;; esac; done
[ -n "$run_dir" ] || { echo "run_or_resume.sh: pass run_dir=..." >&2; exit 2; }
log() { echo "[ia2dist-slurm $(date +%H:%M:%S)] $*" >&2; }
if grep -qs '"state": *"complete"' "$run_dir/status.json"; then
  log "$run_dir is complete; nothing to resume"
  exit 0
fi
if [ -f "$run_dir/config.yaml" ]; then
  log "resuming in $run_dir: reusing saved teacher shards, retraining every method, re-evaluating"
  child=
  trap 'if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; wait "$child"; fi; exit 143' TERM INT
  ia2dist train "$@" --overwrite & child=$!
  wait "$child"
  child=
  exec ia2dist eval "$@"
fi
log "starting ia2dist run in $run_dir"
exec ia2dist run "$@"
