# slurm/lib/job.sh - the machinery behind slurm/*.sbatch (sourced by them; not run directly).
#
# ia2_job MODE CONFIG [key=value ...]   (CONFIG may be "": no YAML, defaults + overrides)
#   MODE ray:    start a Ray cluster over the whole allocation (head on the batch node, one worker
#                per other node via srun, job-specific ports, token auth), wait until every node
#                joined, run ia2dist on the head with dist.backend=ray dist.ray_address=<head>,
#                tear the cluster down on exit.
#   MODE single: no external cluster: ia2dist starts what it needs itself on this node
#                (dist.backend=$IA2_BACKEND, default ray = a private Ray in the driver process).
#   Both: resume-or-run (slurm/lib/run_or_resume.sh), a fresh per-job Ray auth token, and
#   preemption handling: SIGUSR1 (sent before the time limit by `#SBATCH --signal=B:USR1@...`)
#   makes ia2dist save a checkpoint after its current optimizer step and stop (waits up to
#   IA2_STOP_GRACE=90 s), then requeues the job; SIGTERM (preemption, `scontrol requeue`, scancel)
#   reaches ia2dist too (it checkpoints if it gets the time) and stops the run and the cluster.
#   A requeued job starts the script again and resumes (see run_or_resume.sh).
#
# Environment (all optional):
#   IA2_REPO            repository root (default: $SLURM_SUBMIT_DIR, i.e. submit from the repo root)
#   IA2_VENV            virtualenv whose bin/ is put first on PATH (default $IA2_REPO/.venv if present)
#   IA2_RAY_AUTH        token (default) | off: Ray token authentication for the clusters started here
#   IA2_RAY_TOKEN_DIR   where the per-job token file is written, mode 0600 in a 0700 dir; must be
#                       visible on every node (default $HOME/.ia2dist/ray-auth)
#   IA2_RAY_PORT_BASE   first of 100 job-specific ports (default 20000 + (job id % 120) * 100)
#   IA2_RAY_WORKER_PORTS  MIN-MAX port range of Ray worker processes (default: OS-assigned)
#   IA2_RAY_HEAD_IP     address the head binds and advertises (default: first of `hostname -I`)
#   IA2_RAY_DASHBOARD   1 (default): dashboard on <head ip>:<base+1>, never 0.0.0.0; 0: none
#   IA2_RAY_METRICS     0 (default): no metrics export and no autoscaler monitor (a job's cluster
#                       has a fixed size); 1: Ray's Prometheus metrics export on every node and the
#                       monitor (its metrics on <base+4>); docs/security.md lists where they listen
#   IA2_RAY_TMP         node-local root of the Ray temp dirs (default /tmp; keep it short: Ray's
#                       unix socket paths must stay under 108 characters)
#   IA2_RAY_OBJECT_STORE_BYTES  object store per node (default: Ray's, 30% of memory)
#   IA2_RAY_JOIN_TIMEOUT  seconds to wait for every node to join (default 180)
#   IA2_BACKEND         single mode only: ray (default) or local (everything in one process)

_ia2_log() { echo "[ia2dist-slurm $(date +%H:%M:%S)] $*" >&2; }

_ia2_env() {
  IA2_REPO=${IA2_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
  cd "$IA2_REPO"
  IA2_VENV=${IA2_VENV:-$IA2_REPO/.venv}
  if [ -x "$IA2_VENV/bin/python" ]; then export PATH="$IA2_VENV/bin:$PATH"; fi
  export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
  # glibc returns freed large blocks (partitioned loads, ZeRO-3 gathers) to the OS; Ray workers
  # inherit it from the nodes' raylets
  export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-65536}
  IA2_JOB_KEY=${SLURM_JOB_ID:-$$}
}

# A fresh token per job start, never printed: 0600 file in a 0700 dir, path handed to every process
# (driver, head, srun'd workers inherit the environment) through RAY_AUTH_TOKEN_PATH.
_ia2_auth() {
  if [ "${IA2_RAY_AUTH:-token}" = off ]; then
    export RAY_AUTH_MODE=disabled
    unset RAY_AUTH_TOKEN RAY_AUTH_TOKEN_PATH
    _ia2_log "WARNING: Ray token authentication is OFF (IA2_RAY_AUTH=off): anyone who can reach" \
             "the head's ports can run code as $(id -un)"
    return
  fi
  local dir=${IA2_RAY_TOKEN_DIR:-$HOME/.ia2dist/ray-auth}
  (umask 077; mkdir -p "$dir")
  chmod 700 "$dir"
  IA2_TOKEN_FILE=$dir/job-$IA2_JOB_KEY.token
  (umask 077; python -c 'import secrets; print(secrets.token_hex(32), end="")' > "$IA2_TOKEN_FILE")
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$IA2_TOKEN_FILE
  unset RAY_AUTH_TOKEN
  _ia2_log "Ray token authentication on (token file $IA2_TOKEN_FILE, mode 0600)"
}

_ia2_ray_up() {
  local base=${IA2_RAY_PORT_BASE:-$(( 20000 + (IA2_JOB_KEY % 120) * 100 ))}
  local nnodes=${SLURM_JOB_NUM_NODES:-1} head_ip=${IA2_RAY_HEAD_IP:-$(hostname -I | awk '{print $1}')}
  local dash=() store=() monitor=()
  if [ "${IA2_RAY_DASHBOARD:-1}" = 1 ]; then
    dash=(--include-dashboard=true --dashboard-host="$head_ip" --dashboard-port=$((base + 1)))
  else
    dash=(--include-dashboard=false)
  fi
  # the dashboard process (it runs even without the dashboard) serves its own metrics: on a
  # job-specific port instead of Ray's fixed 44227
  export DASHBOARD_METRIC_PORT=$((base + 3))
  case "${IA2_RAY_METRICS:-0}" in
    0) export RAY_enable_metrics_collection=false; monitor=(--no-monitor) ;;
    1) export AUTOSCALER_METRIC_PORT=$((base + 4)) ;;
    *) _ia2_log "IA2_RAY_METRICS=$IA2_RAY_METRICS: use 1 to export Ray's metrics or 0 (default)"
       return 1 ;;
  esac
  case "$head_ip" in
    127.0.0.1|localhost)  # one node only; Ray would otherwise replace a loopback node address
      if [ "$nnodes" -gt 1 ]; then   # with the machine's own and listen on every interface
        _ia2_log "IA2_RAY_HEAD_IP=$head_ip: the other $((nnodes - 1)) node(s) cannot reach it; give the head's internal address"
        return 1
      fi
      export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
      if [ -z "${GLOO_SOCKET_IFNAME:-}" ] && [ -e /sys/class/net/lo ]; then export GLOO_SOCKET_IFNAME=lo; fi
      if [ -z "${NCCL_SOCKET_IFNAME:-}" ] && [ -e /sys/class/net/lo ]; then export NCCL_SOCKET_IFNAME=lo; fi ;;
  esac
  # node-specific arguments are added by ray_node.sh (temp dir, agent port, CPUs of the node)
  export IA2_RAY_BASE=$base IA2_RAY_ADDRESS=$head_ip:$base
  export IA2_RAY_COMMON="${IA2_RAY_OBJECT_STORE_BYTES:+--object-store-memory=$IA2_RAY_OBJECT_STORE_BYTES}"
  _ia2_log "Ray head on ${SLURMD_NODENAME:-$(hostname -s)} at $IA2_RAY_ADDRESS (ports $base-$((base + 99))), $nnodes node(s)"
  bash "$IA2_REPO/slurm/lib/ray_node.sh" head --port="$base" --ray-client-server-port=$((base + 2)) \
       --node-ip-address="$head_ip" "${dash[@]}" ${monitor[@]+"${monitor[@]}"} &
  IA2_HEAD_PID=$!
  if [ "$nnodes" -gt 1 ]; then
    srun --job-name=ray-workers --nodes=$((nnodes - 1)) --ntasks=$((nnodes - 1)) --ntasks-per-node=1 \
         --exclude="${SLURMD_NODENAME:-$(hostname -s)}" --kill-on-bad-exit=0 \
         bash "$IA2_REPO/slurm/lib/ray_node.sh" worker --address="$IA2_RAY_ADDRESS" &
    IA2_WORKERS_PID=$!
  fi
  python "$IA2_REPO/slurm/lib/ray_wait_nodes.py" "$IA2_RAY_ADDRESS" "$nnodes" \
         "${IA2_RAY_JOIN_TIMEOUT:-180}"
}

_ia2_ray_down() {
  local pid step
  if [ -n "${IA2_WORKERS_PID:-}" ]; then
    # SIGTERM to the tasks of the workers' step (killing srun itself would SIGKILL them)
    for step in $(squeue -h -s -j "$SLURM_JOB_ID" -o '%i %j' 2>/dev/null | awk '$2 == "ray-workers" {print $1}'); do
      scancel --signal=TERM "$step" 2>/dev/null || true
    done
  fi
  # ray start --block stops its node's processes on SIGTERM
  if [ -n "${IA2_HEAD_PID:-}" ]; then kill -TERM "$IA2_HEAD_PID" 2>/dev/null || true; fi
  for pid in ${IA2_WORKERS_PID:-} ${IA2_HEAD_PID:-}; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true   # still there after 20 s
    wait "$pid" 2>/dev/null || true
  done
  IA2_WORKERS_PID= IA2_HEAD_PID=
}

_ia2_cleanup() {
  if [ -n "${IA2_DRIVER_PID:-}" ] && kill -0 "$IA2_DRIVER_PID" 2>/dev/null; then
    kill -TERM "$IA2_DRIVER_PID" 2>/dev/null || true
    wait "$IA2_DRIVER_PID" 2>/dev/null || true
  fi
  IA2_DRIVER_PID=
  _ia2_ray_down
  if [ -n "${IA2_TOKEN_FILE:-}" ]; then rm -f "$IA2_TOKEN_FILE"; fi
}

_ia2_on_usr1() {  # time limit ahead: checkpoint, requeue; SLURM's SIGTERM then stops the rest
  _ia2_log "SIGUSR1: time limit near; asking ia2dist to checkpoint and stop, then requeueing job $SLURM_JOB_ID"
  if [ -n "${IA2_DRIVER_PID:-}" ] && kill -0 "$IA2_DRIVER_PID" 2>/dev/null; then
    kill -USR1 "$IA2_DRIVER_PID" 2>/dev/null || true
    local waited=0
    while kill -0 "$IA2_DRIVER_PID" 2>/dev/null && [ "$waited" -lt "${IA2_STOP_GRACE:-90}" ]; do
      sleep 1; waited=$((waited + 1))
    done
    _ia2_log "ia2dist stopped after ${waited} s (checkpoint saved)"
  fi
  scontrol requeue "$SLURM_JOB_ID" || _ia2_log "scontrol requeue failed (job submitted without --requeue?)"
}

_ia2_on_term() {
  _ia2_log "SIGTERM: stopping the run and the Ray cluster (preempted, requeued or cancelled)"
  _ia2_cleanup
  exit 143
}

ia2_job() {
  local mode=$1; shift
  set -uo pipefail
  _ia2_env
  _ia2_log "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) start $(( ${SLURM_RESTART_COUNT:-0} + 1 ))" \
           "on ${SLURM_JOB_NODELIST:-$(hostname -s)}, mode $mode, repo $IA2_REPO"
  trap _ia2_on_usr1 USR1
  trap _ia2_on_term TERM INT
  trap _ia2_cleanup EXIT
  _ia2_auth
  local config=$1; shift
  local first=() defaults=() forced=()
  if [ -n "$config" ]; then first=("$config"); fi
  if [ "$mode" = ray ]; then
    _ia2_ray_up || { _ia2_log "the Ray cluster did not come up"; exit 1; }
    forced=(dist.backend=ray "dist.ray_address=$IA2_RAY_ADDRESS")
  else
    forced=("dist.backend=${IA2_BACKEND:-ray}")
    # a private Ray advertises the CPUs SLURM gave the job, not the whole machine's (overridable)
    if [ -n "${SLURM_CPUS_ON_NODE:-}" ]; then defaults=("dist.num_cpus=$SLURM_CPUS_ON_NODE"); fi
  fi
  # in the background so that signals reach the traps while it runs
  bash "$IA2_REPO/slurm/lib/run_or_resume.sh" ${first[@]+"${first[@]}"} \
       ${defaults[@]+"${defaults[@]}"} "$@" "${forced[@]}" &
  IA2_DRIVER_PID=$!
  local rc=0
  while :; do
    wait "$IA2_DRIVER_PID"; rc=$?
    # a trapped signal (USR1) interrupts wait with rc > 128 while the driver still runs
    kill -0 "$IA2_DRIVER_PID" 2>/dev/null || break
  done
  IA2_DRIVER_PID=
  _ia2_log "ia2dist finished with exit status $rc"
  exit "$rc"
}
