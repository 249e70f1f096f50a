#!/usr/bin/env bash
# One rlft run on every worker of a Cloud TPU VM slice (one process per worker, all its chips).
#
# usage: TPU_NAME=my-v5e-32 ZONE=us-central2-b launch/tpu_pod.sh EXPERIMENT.py[:PRESET] [--workdir gs://... or a shared dir] [--config.a.b=VALUE ...]
# env:   REPO  the checkout on the workers (default: ~/rlft; install it on every worker first, e.g.
#              `gcloud compute tpus tpu-vm ssh $TPU_NAME --worker=all --command "pip install -e ~/rlft"`)
#
# RLFT_DISTRIBUTED=detect makes `rlft run` call jax.distributed.initialize() without arguments, which
# reads the slice's metadata (coordinator = worker 0). The work directory must be shared by all
# workers (GCS or a network file system).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo=${REPO:-~/rlft}
args=$(printf '%q ' "$@")
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd $repo && RLFT_DISTRIBUTED=detect ${PYTHON:-python3} -m rlft run $args"
