# slurm/lib/run_or_resume.sh CONFIG [key=value ...] - start or resume `ia2dist run` in a run directory.
#
# The arguments must name the run directory (run_dir=...; the sbatch scripts always pass one that
# is stable across requeues: runs/<job name>-<job id>). `ia2dist run` itself resumes a run
# directory it made before: finished teacher shards, trained methods and metrics are reused and
# every unfinished (N, seed, method) job continues from its latest complete checkpoint; a complete
# run is left as it is. This wrapper only says which case the job log is looking at, reading the
# run's state through `ia2dist status` (the one reader of status.json): an `ia2dist eval` run on a
# partial directory leaves it partial, so a requeued job continues it.
set -euo pipefail
run_dir=
for arg in "$@"; do case "$arg" in run_dir=*) run_dir=${arg#run_dir=} ;; esac; done
[ -n "$run_dir" ] || { echo "run_or_resume.sh: pass run_dir=..." >&2; exit 2; }
log() { echo "[ia2dist-slurm $(date +%H:%M:%S)] $*" >&2; }
state=$(ia2dist status --state "$run_dir" 2>/dev/null || echo none)
case "$state" in
  complete) log "$run_dir is complete; nothing to resume" ;;
  none) log "starting ia2dist run in $run_dir" ;;
  *) log "resuming in $run_dir (state: $state): finished work is reused, unfinished jobs continue from their checkpoints" ;;
esac
exec ia2dist run "$@"
