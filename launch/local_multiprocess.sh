#!/usr/bin/env bash
# N JAX processes on this machine, each with M simulated CPU devices: the multi-host runtime
# (coordinator on 127.0.0.1, gloo CPU collectives) without a cluster. Used by the tests; also a
# way to try a multi-host config on a laptop.
#
#   launch/local_multiprocess.sh -n 2 -d 4 -- --config=configs/demo_cpu.py --workdir=/tmp/mp \
#       --config.mesh.shape="(2,4,1)"
#
# Options: -n processes (2), -d devices per process (4), -m python module (mermed_jax.pretrain),
# -p coordinator port (a free one). Everything after -- goes to every process unchanged.
# Process 0 writes to this terminal; process i > 0 to $MERMED_LOG_DIR/process_i.log (default:
# a new temporary directory, printed). If any process fails, the others are stopped (a process
# whose peers died would otherwise wait in a collective forever) and the first failure's exit
# status is returned. SIGINT/SIGTERM are passed on to all processes (they save and exit).
set -euo pipefail

processes=2
devices=4
module=mermed_jax.pretrain
port=""
while getopts "n:d:m:p:" opt; do
  case "$opt" in
    n) processes="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    m) module="$OPTARG" ;;
    p) port="$OPTARG" ;;
    *) echo "usage: $0 [-n processes] [-d devices] [-m module] [-p port] -- ARGS..." >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift

python="${PYTHON:-python}"
source "$(dirname "$0")/preload_tcmalloc.sh"
if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
log_dir="${MERMED_LOG_DIR:-$(mktemp -d -t mermed_mp.XXXXXX)}"
mkdir -p "$log_dir"
echo "local_multiprocess: $processes processes x $devices devices, coordinator 127.0.0.1:$port, logs of processes > 0 in $log_dir" >&2

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -"${1:-TERM}" "$pid" 2>/dev/null || true; done
}
trap 'stop_all TERM' TERM INT

run_process() {
  exec env MERMED_COORDINATOR="127.0.0.1:$port" MERMED_NUM_PROCESSES="$processes" MERMED_PROCESS_ID="$1" \
      MERMED_CPU_COLLECTIVES=gloo JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
      "$python" -m "$module" "${@:2}"
}
for ((i = 0; i < processes; i++)); do
  if ((i == 0)); then
    run_process "$i" "$@" &
  else
    run_process "$i" "$@" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done

# Poll rather than `wait -n`: bash may reap a stopped process before `wait -n` asks for it.
status=0
while ((${#pids[@]} > 0)); do
  for idx in "${!pids[@]}"; do
    pid="${pids[$idx]}"
    kill -0 "$pid" 2>/dev/null && continue
    set +e
    wait "$pid"
    code=$?
    set -e
    unset "pids[$idx]"
    if ((code != 0 && status == 0)); then
      status=$code
      echo "local_multiprocess: process $pid exited with status $code; stopping the others" >&2
      stop_all TERM
      sleep 5
      stop_all KILL
    fi
  done
  # A SIGTERM sent to the whole process group (as schedulers do) also ends this sleep: not a failure.
  sleep 0.5 || true
done
exit "$status"
