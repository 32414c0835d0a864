#!/usr/bin/env bash
# Run the same command on every worker of a Cloud TPU VM pod slice (e.g. v5p-32 = 4 VMs x 4 chips).
#
#   launch/tpu_pod.sh configs/stage2_finetune.py:llava15_7b_v5p32 [extra trainer flags...]
#
# Variables you set:
#   TPU_NAME      the TPU VM name            ZONE     its zone           PROJECT   the GCP project (optional)
#   LLAVA_WORKDIR a gs:// or shared path for checkpoints and metrics (every worker writes its shards there)
#   LLAVA_REPO    where the repo is copied on the workers (default ~/llava_jax)
# jax.distributed auto-detects TPU pods: no coordinator flags. The repo is copied to every worker with scp, the
# requirements installed (jax[tpu] of the pinned version), then the trainer runs on all workers at once.
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
  python3 -m llava_jax.train --config $CONFIG --workdir $WORKDIR $*"
