#!/usr/bin/env bash
# ray_jobs/cluster.sh up|down|env - a Ray head on this machine for `ray job submit`, secure by default.
#
# What:     `up` starts `ray start --head --block` in the background with Ray token authentication
#           and a FRESH token in a user-only file (0600, never printed), its ports on IA2_RAY_HOST
#           (default 127.0.0.1: then every port listens on 127.0.0.1 only; give the node's internal
#           address to accept workers and clients from other machines, never 0.0.0.0:
#           docs/security.md lists the ports Ray then opens on every interface) and ports of its own
#           (IA2_RAY_PORT: GCS, +1 dashboard / Jobs API, +2 dashboard agent, +3 client server,
#           +4 the dashboard's own metrics; workers +10..+99), then waits until the Jobs API answers
#           and writes STATE_DIR/cluster.env (RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH: the
#           token's path, not its value). No metrics export and no autoscaler monitor (the cluster
#           has a fixed size; `ray status` needs the monitor) unless IA2_RAY_METRICS=1 (+5 metrics
#           export, +6 the monitor's metrics). `down` stops the head and deletes the token. `env`
#           prints the path of cluster.env.
# Hardware: this machine; IA2_RAY_CPUS / IA2_RAY_GPUS say how much of it Ray advertises.
# Launch:   bash ray_jobs/cluster.sh up && source ~/.ia2dist/clusters/local/cluster.env
#           bash ray_jobs/submit.sh ...; bash ray_jobs/cluster.sh down
# Other machines join a head on an internal address with the same token file (copy it with
#           user-only permissions):
#           RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<file> ray start --address=<host>:<port>
# Environment (defaults): IA2_CLUSTER_NAME (local), IA2_CLUSTER_STATE_DIR (~/.ia2dist/clusters/NAME),
#           IA2_RAY_HOST (127.0.0.1), IA2_RAY_PORT (a free port), IA2_RAY_CPUS, IA2_RAY_GPUS,
#           IA2_RAY_METRICS (0; 1 exports Ray's Prometheus metrics, on IA2_RAY_HOST where Ray
#           allows it, and runs the autoscaler monitor), IA2_RAY_AUTH (token; `off` turns
#           authentication off, with a warning: anyone who can reach the ports can then run code
#           as you).
# Rotate the token: `down` then `up` (every `up` writes a new one).
set -euo pipefail
cmd=${1:?usage: cluster.sh up|down|env}
name=${IA2_CLUSTER_NAME:-local}
state=${IA2_CLUSTER_STATE_DIR:-$HOME/.ia2dist/clusters/$name}
log() { echo "[ia2dist-cluster] $*" >&2; }

free_port_block() {  # a base port whose +0..+6 are free
  python3 - <<'EOF'
import socket
for _ in range(200):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
    if base > 65000:
        continue
    try:
        for off in range(7):
            with socket.socket() as t:
                t.bind(("127.0.0.1", base + off))
        print(base)
        break
    except OSError:
        continue
EOF
}

case "$cmd" in
  up)
    if [ -f "$state/head.pid" ] && kill -0 "$(cat "$state/head.pid")" 2>/dev/null; then
      log "cluster '$name' is already running (pid $(cat "$state/head.pid")); source $state/cluster.env"
      exit 0
    fi
    (umask 077; mkdir -p "$state")
    chmod 700 "$state"
    host=${IA2_RAY_HOST:-127.0.0.1}
    if [ "$host" = 0.0.0.0 ]; then
      log "IA2_RAY_HOST=0.0.0.0 would expose the dashboard on every interface; give this node's internal address"
      exit 2
    fi
    port=${IA2_RAY_PORT:-$(free_port_block)}
    net_env=(DASHBOARD_METRIC_PORT=$((port + 4)))   # the dashboard's own metrics (Ray: 44227)
    case "$host" in
      # Ray replaces a loopback node address with this machine's own and then opens its gRPC
      # ports on every interface, unless multi-machine clusters are off (its switch for
      # single-machine Ray, honoured on every platform): keeps everything on 127.0.0.1
      # (clients need it too: Ray would turn their 127.0.0.1 into that address; cluster.env has
      # it); the student workers' gloo and NCCL connections go over the loopback interface
      127.0.0.1|localhost)
        net_env+=(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)
        if [ -z "${GLOO_SOCKET_IFNAME:-}" ] && [ -e /sys/class/net/lo ]; then net_env+=(GLOO_SOCKET_IFNAME=lo); fi
        if [ -z "${NCCL_SOCKET_IFNAME:-}" ] && [ -e /sys/class/net/lo ]; then net_env+=(NCCL_SOCKET_IFNAME=lo); fi ;;
    esac
    # metrics off: no metrics export, and no autoscaler monitor (a cluster of fixed size needs no
    # autoscaler; Ray starts it with a metrics server of its own, and `ray status` reads it)
    metrics=(--no-monitor)
    case "${IA2_RAY_METRICS:-0}" in
      0) net_env+=(RAY_enable_metrics_collection=false) ;;
      1) metrics=(--metrics-export-port=$((port + 5)))
         net_env+=(AUTOSCALER_METRIC_PORT=$((port + 6))) ;;
      *) log "IA2_RAY_METRICS=${IA2_RAY_METRICS}: use 1 to export Ray's metrics or 0 (default) to keep them off"
         exit 2 ;;
    esac
    temp_dir=$(mktemp -d /tmp/ia2ray_XXXXXX)   # short: Ray's unix sockets need < 108 characters
    if [ "${IA2_RAY_AUTH:-token}" = off ]; then
      log "WARNING: Ray token authentication is OFF (IA2_RAY_AUTH=off): anyone who can reach $host:$port-$((port + 99)) can run code as $(id -un)"
      auth_env=(RAY_AUTH_MODE=disabled)
      printf 'export RAY_AUTH_MODE=disabled\n' > "$state/auth.env"
    else
      (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32), end="")' > "$state/token")
      auth_env=(RAY_AUTH_MODE=token "RAY_AUTH_TOKEN_PATH=$state/token")
      printf 'export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=%q\n' "$state/token" > "$state/auth.env"
    fi
    resources=()
    if [ -n "${IA2_RAY_CPUS:-}" ]; then resources+=(--num-cpus="$IA2_RAY_CPUS"); fi
    if [ -n "${IA2_RAY_GPUS:-}" ]; then resources+=(--num-gpus="$IA2_RAY_GPUS"); fi
    (umask 077; : > "$state/head.log")
    env -u RAY_AUTH_TOKEN "${auth_env[@]}" "${net_env[@]}" RAY_USAGE_STATS_ENABLED=0 \
      RAY_worker_niceness="${RAY_worker_niceness:-0}" \
      setsid ray start --head --block --node-ip-address="$host" --port="$port" \
        --include-dashboard=true --dashboard-host="$host" --dashboard-port=$((port + 1)) \
        --dashboard-agent-listen-port=$((port + 2)) --ray-client-server-port=$((port + 3)) \
        --min-worker-port=$((port + 10)) --max-worker-port=$((port + 99)) \
        ${metrics[@]+"${metrics[@]}"} --temp-dir="$temp_dir" --disable-usage-stats \
        ${resources[@]+"${resources[@]}"} >> "$state/head.log" 2>&1 < /dev/null &
    echo $! > "$state/head.pid"
    echo "$temp_dir" > "$state/temp_dir"
    { cat "$state/auth.env"; printf 'export RAY_ADDRESS=%q\n' "http://$host:$((port + 1))"
      for kv in "${net_env[@]}"; do
        case "$kv" in RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=*) printf 'export %s\n' "$kv" ;; esac
      done; } > "$state/cluster.env"
    chmod 600 "$state/cluster.env" "$state/auth.env"
    for _ in $(seq 1 120); do
      if ! kill -0 "$(cat "$state/head.pid")" 2>/dev/null; then
        log "the Ray head exited; see $state/head.log"; tail -5 "$state/head.log" >&2; exit 1
      fi
      if (source "$state/cluster.env"; ray job list >/dev/null 2>&1); then
        log "cluster '$name' up: GCS $host:$port, Jobs API http://$host:$((port + 1)) ($( [ "${IA2_RAY_AUTH:-token}" = off ] && echo 'NO authentication' || echo "token auth, token file $state/token (0600)"))"
        log "use it: source $state/cluster.env"
        exit 0
      fi
      sleep 1
    done
    log "the Jobs API did not answer within 120 s; see $state/head.log"
    exit 1
    ;;
  down)
    if [ -f "$state/head.pid" ]; then
      pid=$(cat "$state/head.pid")
      kill -TERM "$pid" 2>/dev/null || true   # `ray start --block` stops this node's processes
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    if [ -f "$state/temp_dir" ]; then rm -rf "$(cat "$state/temp_dir")"; fi
    rm -f "$state/token" "$state/cluster.env" "$state/auth.env" "$state/head.pid" "$state/temp_dir"
    log "cluster '$name' stopped; its token is deleted"
    ;;
  env)
    echo "$state/cluster.env"
    ;;
  *)
    echo "usage: cluster.sh up|down|env" >&2; exit 2 ;;
esac
