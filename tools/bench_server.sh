#!/usr/bin/env bash
# Server benchmarks (docs/SERVER.md): `gram serve` on the default index (tools/serve_default.sh
# builds it) loaded by `gram bench` with the WANDS queries, closed loop at concurrency 1, 8 and 32,
# with continuous batching (--max-batch 16, the default, and 4) and without (--max-batch 1); then
# the same queries through the in-process engine (`gram search`) for the server's overhead.
#
#   tools/bench_server.sh [OUT_DIR] [SECONDS_PER_RUN]     # defaults: bench-out/server 30
#
# Each run writes OUT_DIR/mb<B>-c<C>/{report.json,latencies.csv,latency.svg}; a summary table
# goes to stdout and OUT_DIR/summary.md. Loopback only; every run is bounded by its duration.
# GRAM_BENCH_BATCHES sets the --max-batch values (default "16 4 1"). The server listens on port
# 18090 (GRAM_BENCH_PORT); the script stops if that port is taken.
set -euo pipefail
trap '[ -n "${pid:-}" ] && kill -TERM "$pid" 2>/dev/null || true' EXIT
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
out=${1:-bench-out/server}
secs=${2:-30}
index=${GRAM_DEFAULT_INDEX:-target/default-index}
queries=tools/queries/wands.txt
port=${GRAM_BENCH_PORT:-18090}
gram=target/release/gram
[ -f "$index/index.gram" ] || { echo "error: no index in $index: run tools/serve_default.sh once" >&2; exit 1; }
cargo build --release --bin gram
mkdir -p "$out"

serve() {
  # A server already on the port would answer /ready for ours, which then fails to bind.
  if curl -s -o /dev/null "http://127.0.0.1:$port/health"; then
    echo "error: port $port is taken (another server?): set GRAM_BENCH_PORT" >&2
    exit 1
  fi
  "$gram" serve --index "$index" --addr "127.0.0.1:$port" "$@" 2>>"$out/serve.log" &
  pid=$!
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { echo "error: gram serve exited (see $out/serve.log)" >&2; exit 1; }
    sleep 0.2
  done
  echo "error: gram serve not ready after 60 s" >&2
  exit 1
}

batches=${GRAM_BENCH_BATCHES:-16 4 1}
for mb in $batches; do
  # A deadline past what 32 clients wait in a closed loop (32 / QPS), and no queue-wait bound
  # (its 1 ms default answers 503 to every client past --max-batch, and a closed-loop client
  # resends at once): measure, do not shed.
  serve --max-batch "$mb" --max-queue 256 --timeout-ms 120000 --max-queue-wait-ms 0
  for c in 1 8 32; do
    echo "max-batch $mb, concurrency $c, $secs s" >&2
    "$gram" bench --url "http://127.0.0.1:$port" --queries "$queries" --concurrency "$c" \
      --duration "$secs" --warmup 2 --out "$out/mb$mb-c$c" >/dev/null
  done
  kill -TERM "$pid"
  # SIGTERM is a graceful stop: any other exit is the server failing, not to be read past.
  wait "$pid" || { echo "error: gram serve exited $? (see $out/serve.log)" >&2; exit 1; }
  pid=
done

# The in-process engine on the first 20 queries (one process, one query at a time).
grep -v '^#' "$queries" | sed -n 1,20p >"$out/queries-20.txt"
mapfile -t qs <"$out/queries-20.txt"
"$gram" search --index "$index" --k 300 --beam 10 "${qs[@]}" >"$out/inprocess.jsonl"
# The same 20 queries over HTTP, one at a time.
serve
"$gram" bench --url "http://127.0.0.1:$port" --queries "$out/queries-20.txt" --concurrency 1 \
  --count 20 --warmup 2 --out "$out/http-20" >/dev/null
kill -TERM "$pid"
wait "$pid" || { echo "error: gram serve exited $? (see $out/serve.log)" >&2; exit 1; }
pid=

python3 - "$out" $batches <<'PY' | tee "$out/summary.md"
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
batches = [int(b) for b in sys.argv[2:]]
def f(x, spec=".0f"):  # a summary of no answered requests holds nulls
    return "n/a" if x is None else format(x, spec)
print("| max-batch | concurrency | answered/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | engine p50 ms | overhead p50 ms |")
print("|---|---|---|---|---|---|---|---|---|---|")
for mb in batches:
    for c in (1, 8, 32):
        r = json.loads((out / f"mb{mb}-c{c}" / "report.json").read_text())
        l = r["latency_ms"]
        print(f"| {mb} | {c} | {r['qps']:.2f} | {f(l['p50'])} | {f(l['p90'])} | {f(l['p99'])} | {f(l['p999'])} | "
              f"{sum(r['errors'].values())} | {f(r['engine_ms']['p50'])} | {f(r['overhead_ms']['p50'], '.3f')} |")
stages = ("tokenize", "prefill", "decode", "postings", "scoring")
inproc = [sum(json.loads(l)["timings_ms"][s] for s in stages) for l in (out / "inprocess.jsonl").read_text().splitlines()]
http = json.loads((out / "http-20" / "report.json").read_text())
print()
print(f"20 queries one at a time: in-process engine p50 {statistics.median(inproc):.1f} ms; "
      f"over HTTP p50 {http['latency_ms']['p50']:.1f} ms, of which the engine {http['engine_ms']['p50']:.1f} ms; "
      f"serving overhead per request p50 {http['overhead_ms']['p50']:.3f} ms, max {http['overhead_ms']['max']:.3f} ms "
      f"(inside the server p50 {http['server_overhead_ms']['p50']:.3f} ms; client and loopback p50 "
      f"{http['client_ms']['p50']:.3f} ms)")
PY
