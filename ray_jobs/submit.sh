#!/usr/bin/env bash
# ray_jobs/submit.sh - submit one `ia2dist run` to a running Ray cluster with `ray job submit`.
#
# What:     `python -m ia2dist.cli run CONFIG run_dir=RUN_DIR dist.backend=ray dist.ray_address=auto
#           EXTRA` as a Ray job: the repo is uploaded as the job's working dir (ray_jobs/runtime_env.yaml),
#           the driver runs on the head and joins the cluster it runs in ('auto'). Returns at once
#           and prints the submission id (WAIT=1: stream the logs until the job ends instead).
# Hardware: whatever the cluster has (dist.* in CONFIG/EXTRA says how much of it to use).
# Needs:    RAY_ADDRESS=http://<head>:<dashboard port> (the Jobs API lives on the dashboard) and, for a
#           cluster with token auth, RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH=<the cluster's token
#           file> (or the default ~/.ray/auth_token). Run from the repository root.
# Launch:   RAY_ADDRESS=http://10.0.0.1:8265 CONFIG=configs/sst2_llama.yaml bash ray_jobs/submit.sh
#           Follow: ray job logs -f <id>; status: ray job status <id>; stop: ray job stop <id>
#           (each with --address or RAY_ADDRESS); see ray_jobs/README.md.
# Environment (defaults): CONFIG (configs/demo.yaml), RUN_DIR (<repo>/runs/<id>, an absolute path
#           every node can write: the working dir is a temporary copy), JOB_ID (ia2dist-<time>),
#           EXTRA (more key=value overrides), WAIT (0).
set -euo pipefail
JOB_ID=${JOB_ID:-ia2dist-$(date +%Y%m%d-%H%M%S)}
CONFIG=${CONFIG-configs/demo.yaml}
RUN_DIR=${RUN_DIR:-$PWD/runs/$JOB_ID}
exec ray job submit --address "${RAY_ADDRESS:?set RAY_ADDRESS=http://<head>:<dashboard port>}" \
  --submission-id "$JOB_ID" --runtime-env ray_jobs/runtime_env.yaml \
  $([ "${WAIT:-0}" = 1 ] || echo --no-wait) -- \
  python -m ia2dist.cli run $CONFIG "run_dir=$RUN_DIR" ${EXTRA:-} dist.backend=ray dist.ray_address=auto
