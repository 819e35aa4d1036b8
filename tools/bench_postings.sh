#!/usr/bin/env bash
# gram's code -> posting store at paper scale (JD's test set: 9.7 M products, 2.5 M codes,
# 60 M postings) against tantivy holding the same postings (tools/postings-bench).
#
#   tools/bench_postings.sh                    # paper scale
#   PRODUCTS=100000 CODES=25000 POSTINGS=600000 tools/bench_postings.sh   # small
#
# Env: PRODUCTS CODES POSTINGS SEED QUERIES ROUNDS OUT (default bench-out/postings)
#      KEEP_TANTIVY=1 keeps the tantivy index even when it is over 5 GB;
#      SKIP_BUILD=1 runs the tool as already built.
# Writes OUT/synth.json, OUT/tantivy.json, OUT/query.json (one JSON line each) and
# OUT/*.time (/usr/bin/time -v of each step, when present).
set -euo pipefail
cd "$(dirname "$0")/.."

PRODUCTS=${PRODUCTS:-9700000}
CODES=${CODES:-2500000}
POSTINGS=${POSTINGS:-60000000}
SEED=${SEED:-1}
QUERIES=${QUERIES:-1000}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-bench-out/postings}
INDEX="$OUT/gram"
TDIR="$OUT/tantivy"
mkdir -p "$OUT"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release --manifest-path tools/postings-bench/Cargo.toml
fi
BIN=tools/postings-bench/target/release/postings-bench

timed() { # NAME CMD...: stdout to OUT/NAME.json, resource use to OUT/NAME.time
  local name=$1
  shift
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -v -o "$OUT/$name.time" "$@" >"$OUT/$name.json"
  else
    "$@" >"$OUT/$name.json"
  fi
  cat "$OUT/$name.json"
}

echo "== synth: $PRODUCTS products, $CODES codes, $POSTINGS postings" >&2
timed synth "$BIN" synth --products "$PRODUCTS" --codes "$CODES" --postings "$POSTINGS" \
  --seed "$SEED" --out "$INDEX"
echo "== tantivy" >&2
timed tantivy "$BIN" tantivy --index "$INDEX" --out "$TDIR"
echo "== query: $QUERIES queries x $ROUNDS rounds" >&2
timed query "$BIN" query --index "$INDEX" --tantivy "$TDIR" --queries "$QUERIES" --rounds "$ROUNDS"

size=$(du -sb "$TDIR" | cut -f1)
if [ "${KEEP_TANTIVY:-0}" != 1 ] && [ "$size" -gt 5000000000 ]; then
  echo "== removing the tantivy index ($size bytes > 5 GB)" >&2
  rm -rf "$TDIR"
fi
