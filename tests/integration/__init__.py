"""End-to-end runs: Ray clusters, DeepSpeed multi-process launches, SLURM, subprocess CLI runs."""
