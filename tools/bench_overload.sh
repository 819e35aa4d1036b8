#!/usr/bin/env bash
# Issue 5's overload target, measured so that the host's speed cannot decide it: closed loops
# of 16 clients and open loops at RATE requests/s alternate, each run 60 s (SECONDS) against a
# fresh `gram serve` on the default index with its defaults, PAIRS times, then one closed loop
# more. The admitted requests' p99 of each open run is compared with the closed loops just
# before and after it, and all open runs' admitted latencies pooled against all closed ones'.
#
#   tools/bench_overload.sh RATE [PAIRS] [SECONDS] [OUT_DIR]   # defaults: 3 60 bench-out/overload
#
# RATE: twice what the closed loop answers on this box (run it once, or read `closed1`'s qps).
# The load generator runs under `nice -n 19` so the server has the cores first. Needs the
# default index (tools/serve_default.sh builds it) and port $GRAM_BENCH_PORT (default 18090) free. docs/SERVER.md has the
# results.
set -euo pipefail
# SIGTERM, not SIGINT: a background job of a script starts with SIGINT ignored, and the server
# installs its own handler only once it is up. It stops on either the same way.
trap '[ -n "${pid:-}" ] && kill -TERM "$pid" 2>/dev/null || true' EXIT
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
rate=${1:?usage: tools/bench_overload.sh RATE [PAIRS] [SECONDS] [OUT_DIR]}
pairs=${2:-3}
secs=${3:-60}
out=${4:-bench-out/overload}
index=${GRAM_DEFAULT_INDEX:-target/default-index}
gram=target/release/gram
# GRAM_SERVER_BIN: another build's server to compare (with an index of its format: GRAM_DEFAULT_INDEX)
server=${GRAM_SERVER_BIN:-$gram}
. tools/serve_lib.sh
check_index
cargo build --release --bin gram
mkdir -p "$out"

run() { # run NAME BENCH_FLAGS...
  local name=$1
  shift
  start_server "$out/$name.log"
  echo "$name: $*" >&2
  nice -n 19 "$gram" bench --url "$url" --queries tools/queries/wands.txt \
    --warmup 20 --timeout-s 30 --out "$out/$name" "$@" >"$out/$name.out" 2>&1
  kill -INT "$pid"
  wait "$pid"
  pid=
}

for i in $(seq "$pairs"); do
  run "closed$i" --concurrency 16 --duration "$secs"
  run "open$i" --rate "$rate" --duration "$secs"
done
run "closed$((pairs + 1))" --concurrency 16 --duration "$secs"

python3 tools/latency_summary.py overload "$out" "$pairs" | tee "$out/summary.md"
