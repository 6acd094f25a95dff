#!/usr/bin/env bash
# slurm/local/down.sh - stop what slurm/local/up.sh started, by PID file only.
#
# What:   cancels the cluster's jobs, stops its slurmd(s) and slurmctld, and munged only when up.sh
#         started it. Never touches other SLURM or Ray processes on the host.
# Launch: bash slurm/local/down.sh [--purge]   (--purge also deletes $IA2_SLURM_BASE: state, logs,
#         config). Same IA2_SLURM_BASE as up.sh (default /tmp/ia2dist-slurm).
set -uo pipefail
BASE=${IA2_SLURM_BASE:-/tmp/ia2dist-slurm}
export SLURM_CONF=$BASE/etc/slurm.conf
log() { echo "[slurm-local-down] $*" >&2; }
alive() {
  local pid st
  pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] || return 1
  st=$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\).*/\1/p' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}
stop_pidfile() {
  local f=$1 pid i
  alive "$f" || { rm -f "$f"; return 0; }
  pid=$(cat "$f"); log "stopping $(basename "$f" .pid) (pid $pid)"
  kill "$pid" 2>/dev/null
  for i in $(seq 1 150); do alive "$f" || break; sleep 0.1; done
  if alive "$f"; then log "pid $pid still alive, SIGKILL"; kill -9 "$pid" 2>/dev/null; fi
  rm -f "$f"
}
# 1. cancel every job first, so no job process outlives its slurmd
if alive "$BASE/run/slurmctld.pid"; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    scancel $jobs 2>/dev/null
    for i in $(seq 1 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 1; done
  fi
fi
# 2. daemons, in reverse start order
for f in "$BASE"/run/slurmd-*.pid; do if [ -e "$f" ]; then stop_pidfile "$f"; fi; done
stop_pidfile "$BASE/run/slurmctld.pid"
if [ -e "$BASE/run/munged.started-by-us" ]; then
  stop_pidfile /run/munge/munged.pid; rm -f "$BASE/run/munged.started-by-us"
fi
if [ "${1:-}" = --purge ]; then rm -rf "$BASE"; log "purged $BASE"; fi
log "done"
