#!/usr/bin/env bash
# Starts launch/train.py on every worker of a Cloud TPU VM pod slice.
#
# Usage:
#   launch/tpu_pod.sh <tpu-name> <zone> <config> <workdir> [extra flags...]
# Example (CALM-M on a v5p-64; data and workdirs on GCS or a shared disk):
#   launch/tpu_pod.sh my-pod us-east5-a experiments/calm.py:size=M gs://bucket/runs/calm_m \
#       --config.ae_workdir=gs://bucket/runs/ae_k4 --config.data.dir=gs://bucket/data/pile_lm_8192 \
#       --config.data.tokenizer=gs://bucket/llama3_tokenizer
#
# Every worker runs the same command; CALM_DISTRIBUTED=1 makes launch/train.py call
# jax.distributed.initialize(), which discovers the pod's topology by itself.  The repo
# must be checked out at $REPO (default ~/calm_jax) on every worker (e.g. a prior
#   gcloud compute tpus tpu-vm ssh <tpu-name> --zone=<zone> --worker=all \
#       --command="git clone <url> ~/calm_jax && pip install -e ~/calm_jax 'jax[tpu]'").
# Run it again with the same workdir to resume after a preemption.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,18p' "$0"; exit 2
fi
TPU="$1"; ZONE="$2"; CONFIG="$3"; WORKDIR="$4"; shift 4
REPO="${REPO:-~/calm_jax}"
EXTRA=""
for a in "$@"; do EXTRA+=" $(printf '%q' "$a")"; done
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd $REPO && CALM_DISTRIBUTED=1 python -m launch.train --config=$(printf '%q' "$CONFIG") \
    --workdir=$(printf '%q' "$WORKDIR")$EXTRA 2>&1 | tee -a /tmp/calm_jax_train.log"
