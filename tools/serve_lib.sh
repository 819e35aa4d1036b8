# Sourced by tools/bench_overload.sh and tools/bench_soak.sh: one `gram serve` on the default
# index at port $port (GRAM_BENCH_PORT, default 18090: not the main job's 8080, so a running
# tools/serve_default.sh does not stop a benchmark), started and waited for the same way by both.
#
#   index=...; server=...        # the index directory and the server binary
#   check_index                  # exits unless $index holds an index
#   start_server LOG             # starts "$server" serve --index "$index" (stderr to LOG),
#                                # sets pid, returns once /ready answers; exits on failure

port=${GRAM_BENCH_PORT:-18090}
# The default index's model, from this checkout (the index names the path it was built from).
model=${model:-models/gram-icecat-2m}
url=http://127.0.0.1:$port

check_index() {
  [ -f "$index/index.gram" ] || { echo "error: no index in $index: run tools/serve_default.sh once" >&2; exit 1; }
}

start_server() {
  local log=$1
  # A server already on the port would answer /ready for ours, which then fails to bind.
  if curl -s -o /dev/null "$url/health"; then
    echo "error: port $port is taken (another server? GRAM_BENCH_PORT sets it)" >&2
    exit 1
  fi
  "$server" serve --index "$index" --model "$model" --addr "127.0.0.1:$port" 2>"$log" &
  pid=$!
  for _ in $(seq 240); do
    curl -sf "$url/ready" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { echo "error: gram serve exited: $log" >&2; exit 1; }
    sleep 0.5
  done
  echo "error: not ready in 120 s: $log" >&2
  exit 1
}
