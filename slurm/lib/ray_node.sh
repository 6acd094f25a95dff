# slurm/lib/ray_node.sh head|worker [ray start args] - one Ray node of a job's cluster, in the
# foreground (--block): SIGTERM stops this node's Ray processes, nothing else on the host (unlike
# `ray stop`, which kills every Ray on the machine, other jobs' included), and removes its temp
# dir. Called by job.sh; the environment (auth token, IA2_RAY_*) comes from it, through srun on
# the worker nodes.
set -uo pipefail
role=$1; shift
node=${SLURM_NODEID:-0}
# node-local, short (unix socket paths < 108 chars), unique per job and node (several jobs, or
# several SLURM "nodes" of a test cluster, may share a host)
tmp=${IA2_RAY_TMP:-/tmp}/ray_${SLURM_JOB_ID:-$$}_$node
rm -rf "$tmp"; mkdir -p "$tmp"
workers=(--min-worker-port=0 --max-worker-port=0)   # OS-assigned: no clash with other jobs
if [ -n "${IA2_RAY_WORKER_PORTS:-}" ]; then
  workers=(--min-worker-port="${IA2_RAY_WORKER_PORTS%-*}" --max-worker-port="${IA2_RAY_WORKER_PORTS#*-}")
fi
args=(--block --disable-usage-stats --temp-dir="$tmp" "${workers[@]}"
      --dashboard-agent-listen-port=$((IA2_RAY_BASE + 10 + node))
      --num-cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}" ${IA2_RAY_COMMON:-})
if [ "$role" = head ]; then args+=(--head); fi
# the job is ending when this node is stopped: no drain period (Ray's default is 30 s)
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
# the job's workers are its compute: the job's priority, not Ray's default nice 15
export RAY_worker_niceness=${RAY_worker_niceness:-0}
ray start "${args[@]}" "$@" > "$tmp/ray_start.log" 2>&1 &
pid=$! stopping=0 tree=
descendants() {  # every process below pid $1 (ps --ppid, level by level)
  local level=$1 kids all=
  while [ -n "$level" ]; do
    kids=$(ps -o pid= --ppid "$(echo $level | tr ' ' ,)" 2> /dev/null | xargs)
    all="$all $kids" level=$kids
  done
  echo $all
}
# remember the node's processes before stopping it: some (the dashboard's module processes)
# outlive `ray start` for a moment and would otherwise write into the deleted temp dir
trap 'stopping=1; tree=$(descendants $pid); kill -TERM $pid 2>/dev/null' TERM INT
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
wait "$pid"; rc=$?
if [ $stopping = 0 ]; then
  echo "ray $role on $(hostname -s) (SLURM node $node) exited with status $rc; log tail:" >&2
  tail -n 20 "$tmp/ray_start.log" >&2
fi
# this node's Ray processes (those seen at the stop, and any whose command line names the temp
# dir) may still be exiting, and writing into it, after `ray start --block` returns: wait for
# them (10 s at most, then KILL) before deleting it
mine="--temp-dir=$tmp( |\$)|$tmp/"
alive() {
  local p
  for p in $tree; do kill -0 "$p" 2> /dev/null && return 0; done
  pgrep -f -- "$mine" > /dev/null 2>&1
}
for _ in $(seq 1 50); do alive || break; sleep 0.2; done
if alive; then
  kill -KILL $tree 2> /dev/null; pkill -KILL -f -- "$mine" 2> /dev/null; sleep 0.5
fi
rm -rf "$tmp"
exit $rc
