#!/usr/bin/env bash
# N processes of one rlft run on this machine, joined over localhost with gloo collectives: a
# multi-host run in miniature (each process plays a host with DEVICES_PER_PROCESS CPU devices).
#
# usage: launch/multiprocess_cpu.sh N EXPERIMENT.py[:PRESET] [--workdir DIR] [--config.a.b=VALUE ...]
# env:   DEVICES_PER_PROCESS  simulated CPU devices per process (default 1)
#        PORT                 coordinator port on localhost (default: a free one)
#        LOG_DIR              where processes 1..N-1 write their output (default: a new temp dir)
# Process 0 prints to this terminal. If any process fails, the others are stopped and its status
# is this script's status.
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N EXPERIMENT.py[:PRESET] [rlft run arguments ...]" >&2
  exit 2
fi
n=$1; shift
python=${PYTHON:-python}
devices=${DEVICES_PER_PROCESS:-1}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d -t rlft-processes.XXXXXX)}
mkdir -p "$log_dir"

pids=()
stop_all() { kill "${pids[@]}" 2>/dev/null || true; }
trap stop_all EXIT
trap 'stop_all; exit 143' TERM
trap 'stop_all; exit 130' INT

launch_one() {  # launch_one I ARGS...: process I of the run
  local i=$1; shift
  env JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
      RLFT_COORDINATOR="localhost:$port" RLFT_NUM_PROCESSES="$n" RLFT_PROCESS_ID="$i" \
      "$python" -m rlft run "$@"
}
for ((i = 0; i < n; i++)); do
  if ((i == 0)); then
    launch_one "$i" "$@" &
  else
    launch_one "$i" "$@" > "$log_dir/process-$i.log" 2>&1 &
  fi
  pids+=($!)
done
((n > 1)) && echo "multiprocess_cpu: $n processes x $devices devices on localhost:$port; logs of processes 1-$((n - 1)) in $log_dir" >&2

status=0
for ((i = 0; i < n; i++)); do
  wait -n && continue  # the next process to finish, whichever it is
  status=$?
  echo "multiprocess_cpu: a process exited with status $status; stopping the others (logs: $log_dir)" >&2
  break
done
exit "$status"
