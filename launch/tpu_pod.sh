#!/usr/bin/env bash
# Run the same command on every worker of a Cloud TPU VM pod slice (e.g. v5p-32 = 4 VMs x 4 chips).
#
#   TPU_NAME=my-v5p ZONE=us-east5-a LLAVA_WORKDIR=gs://bucket/runs/7b_s2 \
#     launch/tpu_pod.sh configs/scale.py:7b_stage2_v5p32 --config.data.train_dir=... [trainer flags...]
#   python -m llava_jax.train --config configs/scale.py:7b_stage2_v5p32 --dry_run    # first: does it fit?
#
# Variables you set:
#   TPU_NAME       the TPU VM name          ZONE   its zone          PROJECT  the GCP project (optional)
#   LLAVA_WORKDIR  a gs:// bucket path or a filesystem every worker mounts: checkpoints (each worker writes its
#                  shards), metrics and the exported model. Rerunning with the same workdir resumes.
#   LLAVA_REPO     where the repo is copied on the workers (default ~/llava_jax)
# The repo (without .git and workdir*) is copied to every worker with scp, the pinned requirements and jax[tpu] of
# the same version installed, then the trainer starts on all workers at once. LLAVA_CLUSTER=auto makes it call
# jax.distributed.initialize() with no arguments: jax reads the coordinator and worker ids from the TPU metadata.
# A worker that dies stops the others within jax's heartbeat (30 s); this script then exits non-zero.
# Trainer flags are passed through a remote shell: quote values with spaces twice.
set -euo pipefail
CONFIG=${1:?usage: launch/tpu_pod.sh CONFIG [trainer flags...]}
shift
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
WORKDIR=${LLAVA_WORKDIR:?set LLAVA_WORKDIR (gs://bucket/run or a shared path)}
REPO=${LLAVA_REPO:-llava_jax}
GCLOUD=(gcloud compute tpus tpu-vm)
PROJ=(${PROJECT:+--project="$PROJECT"})
here=$(cd "$(dirname "$0")/.." && pwd)
JAX_VERSION=$(sed -n 's/^jax==//p' "$here/requirements.txt")
tar -C "$here" --exclude=.git --exclude='workdir*' -czf /tmp/llava_jax_repo.tgz .
"${GCLOUD[@]}" scp /tmp/llava_jax_repo.tgz "$TPU_NAME":/tmp/ --worker=all --zone="$ZONE" "${PROJ[@]}"
"${GCLOUD[@]}" ssh "$TPU_NAME" --worker=all --zone="$ZONE" "${PROJ[@]}" --command="
  set -e; mkdir -p ~/$REPO && tar -C ~/$REPO -xzf /tmp/llava_jax_repo.tgz && cd ~/$REPO &&
  pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION' &&
  LLAVA_CLUSTER=auto PYTHONUNBUFFERED=1 python3 -m llava_jax.train --config $CONFIG --workdir $WORKDIR $*"
