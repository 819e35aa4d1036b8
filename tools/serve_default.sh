#!/usr/bin/env bash
# The main job on a fresh machine, with no manual step: build gram, index the bundled catalog
# with the bundled default model, and serve it over HTTP. The default model is
# models/gram-icecat-2m (a 2.4 M-parameter GRAM model trained by tools/train on the real
# chorus-icecat catalog; its model card says how) and the catalog is its 19,406 Icecat products
# with their attribute codes (models/gram-icecat-2m/catalog.jsonl).
#
#   tools/serve_default.sh [gram serve flags...]     # default --addr 127.0.0.1:8080
#
# Idempotent: an index newer than its inputs whose checksums hold and that this model opens and
# searches is not rebuilt (GRAM_DEFAULT_INDEX sets
# its directory; default target/default-index). Stop the server with Ctrl-C (SIGINT) or
# SIGTERM: requests in flight are answered first.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
model=models/gram-icecat-2m
catalog=$model/catalog.jsonl
index=${GRAM_DEFAULT_INDEX:-target/default-index}

cargo build --release --bin gram
gram=target/release/gram
ix="$index/index.gram"
if [ -f "$ix" ] && [ "$ix" -nt "$catalog" ] && [ "$ix" -nt "$model/model.safetensors" ] &&
  [ "$ix" -nt "$model/gram.json" ] &&
  "$gram" index inspect "$index" >/dev/null 2>&1 &&
  "$gram" search --index "$index" --model "$model" --k 1 mouse >/dev/null 2>&1; then
  echo "default index: $index is up to date"
else
  echo "default index: building $index (19,406 Icecat products; 15–40 s on 2 cores)"
  "$gram" index build --model "$model" --catalog "$catalog" --out "$index"
fi
# The address the server will take: the last --addr given, else the default.
addr=127.0.0.1:8080
prev=
for a in "$@"; do
  case $a in
  --addr=*) addr=${a#--addr=} ;;
  *) [ "$prev" = --addr ] && addr=$a ;;
  esac
  prev=$a
done
echo "serving $index; try: curl -s 'http://$addr/search?q=wireless+mouse&k=3'"
# --model: this checkout's model, which the check above searched with (the index names the
# path it was built from, which may be another clone's, or gone once the repository moved).
exec "$gram" serve --index "$index" --model "$model" "$@"
