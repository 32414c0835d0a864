#!/usr/bin/env bash
# Start N processes of one job on this machine over loopback: CPU devices, gloo collectives. Same code path as a
# cluster (jax.distributed, per-process data shards, process 0 writes metrics/checkpoint metadata/progress).
#
# Usage: launch/local_multiprocess.sh N [-- COMMAND...]
#   default COMMAND: python -m llava_jax.demo --config configs/demo.py
#   e.g. launch/local_multiprocess.sh 2 -- python -m llava_jax.train --config configs/stage2_finetune.py:tiny \
#          --workdir workdir/mp --config.data.train_dir=... --config.data.tokenizer=...
# Variables:
#   LLAVA_DEVICES_PER_PROCESS  CPU devices each process simulates (default 4)
#   LLAVA_PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   LLAVA_LOG_DIR              where process i writes process_i.log (default ./multiprocess_logs)
# Each process gets LLAVA_COORDINATOR / LLAVA_NUM_PROCESSES / LLAVA_PROCESS_ID, which llava_jax.distributed reads.
# Exit status: 0 only if every process exited 0; otherwise the first non-zero status, and the first failure stops
# the others (without this script, jax's heartbeat stops them within 30 s).
set -uo pipefail
N=${1:?usage: launch/local_multiprocess.sh N [-- COMMAND...]}
shift
[ "${1:-}" = "--" ] && shift
if [ $# -eq 0 ]; then set -- python -m llava_jax.demo --config configs/demo.py; fi
DEV=${LLAVA_DEVICES_PER_PROCESS:-4}
PORT=${LLAVA_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
LOG_DIR=${LLAVA_LOG_DIR:-multiprocess_logs}
XLA_FLAGS="$(echo "${XLA_FLAGS:-}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//g') --xla_force_host_platform_device_count=$DEV"
mkdir -p "$LOG_DIR"
declare -A running=()   # pid -> process index
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="$XLA_FLAGS" PYTHONUNBUFFERED=1 \
  LLAVA_COORDINATOR="127.0.0.1:$PORT" LLAVA_NUM_PROCESSES="$N" LLAVA_PROCESS_ID="$i" \
    "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  running[$!]=$i
  echo "process $i: pid $!, log $LOG_DIR/process_$i.log"
done
trap 'kill "${!running[@]}" 2>/dev/null' INT TERM
status=0
while ((${#running[@]} > 0)); do
  wait -n -p done_pid "${!running[@]}"; rc=$?
  [ -z "${done_pid:-}" ] && continue  # interrupted by a trapped signal: wait again
  echo "process ${running[$done_pid]} (pid $done_pid) exited $rc"
  unset "running[$done_pid]"
  if ((rc != 0)) && ((status == 0)); then
    status=$rc
    ((${#running[@]} > 0)) && echo "stopping the others" >&2 && kill "${!running[@]}" 2>/dev/null
  fi
  done_pid=
done
exit $status
