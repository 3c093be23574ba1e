#!/usr/bin/env bash
# SLURM batch script: one process per GPU, all GPUs of all nodes in one JAX job.
#
# Usage:
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm.sh \
#       experiments/calm.py:size=M /shared/runs/calm_m \
#       --config.ae_workdir=/shared/runs/ae_k4 --config.data.dir=/shared/data/pile_lm_8192 \
#       --config.data.tokenizer=/shared/llama3_tokenizer
#   (one process per node instead: --ntasks-per-node=1; each process then drives its 8 GPUs)
#
# srun starts one task per process; with SLURM_NTASKS > 1 launch/train.py calls
# jax.distributed.initialize(), which reads the coordinator, process count and id from
# SLURM's environment, and each process sees its own GPU(s).  Resubmit with the same
# workdir to resume; SLURM's SIGTERM before a time limit triggers a checkpoint
# (use --signal=TERM@120 to get two minutes' warning), after which the job exits with
# status 75 (EX_TEMPFAIL), never 0: a dependent job (--dependency=afterok) does not start.
#SBATCH --job-name=calm_jax
#SBATCH --signal=TERM@120
#SBATCH --output=calm_jax-%j.out
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,19p' "$0"; exit 2
fi
CONFIG="$1"; WORKDIR="$2"; shift 2
cd "${SLURM_SUBMIT_DIR:-.}"
srun --kill-on-bad-exit=1 python -m launch.train --config="$CONFIG" --workdir="$WORKDIR" "$@"
