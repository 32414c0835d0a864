#!/usr/bin/env bash
# Start N processes of one job on this machine over loopback: CPU devices, gloo collectives. Same code path as a
# cluster (jax.distributed, per-process data shards, process 0 writes files).
#
# Usage: launch/local_multiprocess.sh N [-- COMMAND...]
#   default COMMAND: python -m llava_jax.train --config configs/demo.py
# Variables:
#   LLAVA_DEVICES_PER_PROCESS  CPU devices each process simulates (default 4)
#   LLAVA_PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   LLAVA_LOG_DIR              where process i writes process_i.log (default ./multiprocess_logs)
# Exit status: 0 only if every process exited 0; the first failure stops the others.
set -uo pipefail
N=${1:?usage: launch/local_multiprocess.sh N [-- COMMAND...]}
shift
[ "${1:-}" = "--" ] && shift
if [ $# -eq 0 ]; then set -- python -m llava_jax.train --config configs/demo.py; fi
DEV=${LLAVA_DEVICES_PER_PROCESS:-4}
PORT=${LLAVA_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
LOG_DIR=${LLAVA_LOG_DIR:-multiprocess_logs}
mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEV" \
  LLAVA_COORDINATOR="127.0.0.1:$PORT" LLAVA_NUM_PROCESSES="$N" LLAVA_PROCESS_ID="$i" \
    "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
  echo "process $i: pid ${pids[$i]}, log $LOG_DIR/process_$i.log"
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
status=0
remaining=$N
while ((remaining > 0)); do
  wait -n -p done_pid "${pids[@]}"; rc=$?
  remaining=$((remaining - 1))
  if ((rc != 0)) && ((status == 0)); then
    status=$rc
    echo "process with pid $done_pid exited $rc; stopping the others" >&2
    kill "${pids[@]}" 2>/dev/null
  fi
done
tail -n 5 "$LOG_DIR/process_0.log"
exit $status
