#!/usr/bin/env bash
# slurm/local/wait.sh JOBID [timeout_s] - poll a job until it ends (`sbatch --wait` can return
# ~30 s late). Prints "STATE EXITCODE"; exit 0 iff COMPLETED. Needs SLURM_CONF for a local cluster.
j=$1 t=${2:-600}
for ((i = 0; i < t * 2; i++)); do
  s=$(scontrol show job "$j" 2>/dev/null | grep -oP 'JobState=\K\S+')
  case "$s" in
    PENDING|RUNNING|COMPLETING|CONFIGURING|REQUEUED|RESIZING|SUSPENDED|'') sleep 0.5 ;;
    *) echo "$s $(scontrol show job "$j" | grep -oP ' ExitCode=\K\S+')"; [ "$s" = COMPLETED ]; exit ;;
  esac
done
echo TIMEOUT; exit 1
