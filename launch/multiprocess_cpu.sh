#!/usr/bin/env bash
# N processes of one rlft run on this machine, joined over localhost with gloo collectives: a
# multi-host run in miniature (each process plays a host with DEVICES_PER_PROCESS CPU devices).
#
# usage: launch/multiprocess_cpu.sh N EXPERIMENT.py[:PRESET] [--workdir DIR] [--config.a.b=VALUE ...]
# env:   DEVICES_PER_PROCESS  simulated CPU devices per process (default 1)
#        PORT                 coordinator port on localhost (default: a free one)
#        LOG_DIR              where processes 1..N-1 write their output, process-I.log, and where every
#                             process's pid goes, process-I.pid (default: a new temp dir)
#        PYTHON               the interpreter (default: python)
#        STOP_TIMEOUT         seconds the processes get to exit after SIGTERM before SIGKILL (default 20)
# Process 0 prints to this terminal. If a process fails, the script names it (its status, its log
# and the log's last lines), stops the others and exits with the failed process's status. Stopping
# is SIGTERM (a training stage saves its last completed step and exits 143), then SIGKILL for any
# process still there after STOP_TIMEOUT seconds (JAX swallows SIGTERM outside training); then the
# script waits for every one. SIGTERM or SIGINT to the script stops them the same way (status 143 or
# 130). So no process of the run outlives the script, unless the script itself is SIGKILLed: then
# `kill -- -PGID` of its process group (its processes share it) or the pids in LOG_DIR stop them.
set -euo pipefail
if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "$0: needs bash >= 5.1 (wait -n -p), not $BASH_VERSION" >&2
  exit 2
fi
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N EXPERIMENT.py[:PRESET] [rlft run arguments ...]" >&2
  exit 2
fi
n=$1; shift
python=${PYTHON:-python}
devices=${DEVICES_PER_PROCESS:-1}
grace=${STOP_TIMEOUT:-20}
if [[ ! $grace =~ ^[0-9]+$ ]]; then
  echo "$0: STOP_TIMEOUT=$grace: expected a whole number of seconds" >&2
  exit 2
fi
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d -t rlft-processes.XXXXXX)}
mkdir -p "$log_dir"

declare -A index=()  # pid -> process index, for every process of the run not yet reaped
log_of() { if (($1 == 0)); then echo "the output above"; else echo "$log_dir/process-$1.log"; fi; }

stop_all() {  # SIGTERM to every process still running, SIGKILL after $grace s, then reap them all
  local running deadline=$((SECONDS + grace))
  running=$(jobs -rp)  # only the workers run in the background (each is the python process itself)
  if [[ -n $running ]]; then
    kill -TERM $running 2>/dev/null || true
    while running=$(jobs -rp) && [[ -n $running ]] && ((SECONDS < deadline)); do sleep 0.2; done
    if [[ -n $running ]]; then
      echo "multiprocess_cpu: SIGKILL to pid(s) $(echo $running) after ${grace} s (STOP_TIMEOUT)" >&2
      kill -KILL $running 2>/dev/null || true
    fi
  fi
  wait 2>/dev/null || true
  index=()
}
trap stop_all EXIT
# A second SIGTERM or SIGINT while stopping is ignored: the stop is bounded (STOP_TIMEOUT) and must finish.
trap 'trap "" TERM INT; echo "multiprocess_cpu: SIGTERM: stopping $n processes" >&2; stop_all; exit 143' TERM
trap 'trap "" TERM INT; echo "multiprocess_cpu: SIGINT: stopping $n processes" >&2; stop_all; exit 130' INT

launch_one() {  # launch_one I ARGS...: process I of the run; exec, so that the job's pid is python's
  local i=$1; shift
  exec env JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
      RLFT_COORDINATOR="localhost:$port" RLFT_NUM_PROCESSES="$n" RLFT_PROCESS_ID="$i" \
      "$python" -m rlft run "$@"
}
for ((i = 0; i < n; i++)); do
  if ((i == 0)); then
    launch_one "$i" "$@" &
  else
    launch_one "$i" "$@" > "$log_dir/process-$i.log" 2>&1 &
  fi
  index[$!]=$i
  echo "$!" > "$log_dir/process-$i.pid"
done
((n > 1)) && echo "multiprocess_cpu: $n processes x $devices devices on localhost:$port; logs of processes 1-$((n - 1)) in $log_dir" >&2

status=0
while ((${#index[@]} > 0)); do
  pid='' rc=0
  wait -n -p pid || rc=$?  # the next process to finish, whichever it is
  if [[ -z $pid ]]; then
    [[ -n $(jobs -p) ]] && continue
    break  # no process left to wait for
  fi
  [[ -v "index[$pid]" ]] || continue
  i=${index[$pid]}
  unset "index[$pid]"
  ((rc == 0)) && continue
  status=$rc
  how="status $rc"
  ((rc > 128)) && how+=" (128 + SIG$(kill -l "$rc" 2>/dev/null || echo $((rc - 128))))"
  echo "multiprocess_cpu: process $i exited with $how (log: $(log_of "$i")); stopping the others" >&2
  trap "" TERM INT  # see above
  if ((i > 0)) && [[ -s $log_dir/process-$i.log ]]; then
    echo "multiprocess_cpu: last lines of process $i's log:" >&2
    tail -n 15 "$log_dir/process-$i.log" | sed 's/^/  | /' >&2
  fi
  stop_all
  # Another process may have failed on its own (an error it printed before it was stopped).
  for ((j = 1; j < n; j++)); do
    if ((j != i)) && errors=$(grep -h '^rlft: error:' "$log_dir/process-$j.log" 2>/dev/null); then
      echo "multiprocess_cpu: process $j reported (log: $(log_of "$j")):" >&2
      sed 's/^/  | /' <<< "$errors" >&2
    fi
  done
  break
done
exit "$status"
