#!/usr/bin/env bash
# Issue 5's ten-minute run at twice the saturating rate, rerunnable: ONE `gram serve` on the
# default index (its defaults) lives through a closed loop of 16 clients (CLOSED seconds), an
# open loop at RATE requests/s (OPEN seconds), and the closed loop again; its RSS is sampled
# every 10 s throughout; then SIGINT, and its exit status is kept. The summary compares the
# admitted requests' p99 under overload with the closed loops around it, counts 503s and other
# errors, and says how the RSS moved after the overload's first minute.
#
#   tools/bench_soak.sh RATE [OPEN_SECONDS] [CLOSED_SECONDS] [OUT_DIR]
#   # defaults: 600 120 bench-out/soak; about OPEN + 2 × CLOSED seconds
#
# RATE: twice what the closed loop answers on this box (`tools/bench_overload.sh` prints it as
# closed1's answered/s). The load generator runs under `nice -n 19` so the server has the cores
# first. Needs the default index (tools/serve_default.sh builds it) and port $GRAM_BENCH_PORT (default 18090) free.
# docs/SERVER.md has the results. tools/bench_overload.sh alternates fresh servers instead,
# which makes the host's drift visible; this one is for growth and crashes over time.
set -euo pipefail
# SIGTERM, not SIGINT: a background job of a script starts with SIGINT ignored, and the server
# installs its own handler only once it is up. It stops on either the same way.
trap '[ -n "${pid:-}" ] && kill -TERM "$pid" 2>/dev/null || true; [ -n "${sampler:-}" ] && kill "$sampler" 2>/dev/null || true' EXIT
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
rate=${1:?usage: tools/bench_soak.sh RATE [OPEN_SECONDS] [CLOSED_SECONDS] [OUT_DIR]}
open_s=${2:-600}
closed_s=${3:-120}
out=${4:-bench-out/soak}
for n in "$rate" "$open_s" "$closed_s"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "error: RATE and the durations are positive integers, not '$n'" >&2; exit 2; }
done
index=${GRAM_DEFAULT_INDEX:-target/default-index}
gram=target/release/gram
server=$gram
. tools/serve_lib.sh
check_index
cargo build --release --bin gram
mkdir -p "$out"
rm -f "$out/rss.tsv" "$out/server.exit" "$out/phase"

start_server "$out/server.log"

# RSS every 10 s: seconds since ready, the phase running, kB. The phase file is replaced, never
# rewritten in place, so the sampler never reads it empty.
phase() { echo "$1" >"$out/phase.tmp" && mv "$out/phase.tmp" "$out/phase"; }
# Each line: seconds since ready (from /proc/uptime, to the hundredth), the phase, RSS in kB,
# then clock ticks so far: the server's CPU time (user + system, `/proc/PID/stat` fields 14 and
# 15), every process's (`/proc/stat`, all CPUs: user, nice, system, irq, softirq, steal) and the
# hypervisor's steal alone. The summary turns them into cores busy, minute by minute.
sample() { # one line of rss.tsv; fails once the server is gone
  local kb ticks host
  kb=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null) && [ -n "$kb" ] &&
    ticks=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}') &&
    [ -n "$ticks" ] &&
    host=$(awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9, $9}' /proc/stat) &&
    echo "$(awk -v s="$start" '{printf "%.2f", $1 - s}' /proc/uptime) $(cat "$out/phase") $kb $ticks $host" >>"$out/rss.tsv"
}
phase ready
start=$(awk '{print $1}' /proc/uptime)
(
  while sample; do
    # In the background with no inherited output, so that killing this loop leaves no sleep
    # holding a pipe the script's output goes to.
    sleep 10 </dev/null >/dev/null 2>&1 &
    wait $!
  done
) &
sampler=$!

died() { # the server is gone during $1: keep its exit status and stop
  local status=0
  wait "$pid" || status=$?
  pid=
  echo "exit status $status: died during $1" >"$out/server.exit"
  echo "error: gram serve died during $1 (exit status $status): $out/server.log" >&2
  exit 1
}

load() { # load NAME BENCH_FLAGS...
  local name=$1
  shift
  phase "$name"
  echo "$name: $*" >&2
  # `gram bench` fails only when nothing was answered; the server's state says why.
  nice -n 19 "$gram" bench --url "$url" --queries tools/queries/wands.txt \
    --warmup 20 --timeout-s 30 --out "$out/$name" "$@" >"$out/$name.out" 2>&1 ||
    echo "warning: gram bench failed in $name: $out/$name.out" >&2
  kill -0 "$pid" 2>/dev/null || died "$name"
}
load closed1 --concurrency 16 --duration "$closed_s"
load open --rate "$rate" --duration "$open_s"
load closed2 --concurrency 16 --duration "$closed_s"
phase stop
kill "$sampler" 2>/dev/null || true
sampler=
sample || died "the last RSS sample" # the RSS after the load
curl -s "$url/metrics" >"$out/metrics.txt" || died "the read of /metrics"
# A graceful stop finishes the requests in flight: seconds at most. A second signal after a
# minute makes it quit at once (exit status 130).
kill -INT "$pid"
for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
how="after SIGINT"
if kill -0 "$pid" 2>/dev/null; then
  echo "warning: gram serve still running a minute after SIGINT; signalling again" >&2
  kill -INT "$pid"
  how="after a second SIGINT (the first did not stop it within a minute)"
fi
status=0
wait "$pid" || status=$?
pid=
echo "exit status $status $how" >"$out/server.exit"

python3 tools/latency_summary.py soak "$out" | tee "$out/summary.md"
