#!/usr/bin/env bash
# Side by side, one machine, one run: the hardware floor, gram, llama.cpp and PyTorch on
# SmolLM2-135M-Instruct at the same precision (f32, bf16, f16), 2 threads: prefill of a 32-token
# prompt, decode at batch 1, decode at batch 10. gram runs first and last, so drift on a noisy
# machine shows. Writes bench-out/*.jsonl and bench-out/results.md (the table in docs/PERF.md).
#
# One-time set-up (llama-cpp-python builds llama.cpp from source, ~11 min on 2 cores):
#   python3 -m venv .venv && .venv/bin/pip install -r tools/requirements.txt
#   python3 -m venv .venv-bench && CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release" \
#     CMAKE_BUILD_PARALLEL_LEVEL=2 .venv-bench/bin/pip install --no-binary llama-cpp-python -r tools/bench-requirements.txt
# Then: tools/bench_side_by_side.sh            (about 10 minutes; keep the machine otherwise idle)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
threads=${THREADS:-2}
mkdir -p "$out"
tools/get_smollm2.sh >/dev/null
model=models/smollm2-135m-instruct
for py in .venv/bin/python .venv-bench/bin/python; do
  [ -x "$py" ] || { echo "error: $py missing; see the set-up lines at the top of $0" >&2; exit 1; }
done
for t in f32 bf16 f16; do
  [ -f "$out/smollm2-135m-$t.gguf" ] || .venv-bench/bin/python tools/convert_gguf.py "$model/model.gguf" "$out/smollm2-135m-$t.gguf" --type "$t" -q
done
cargo build --release --benches -q
# The floor before and after every engine's block: the host's speed drifts within a run, and
# each block's decode b1 is judged against the floors around it.
floor() { echo "floor $1..." >&2; tools/floor/run.sh > "$out/floor-$1.json"; }
floor 0
gram() { cargo bench -q --bench lm_throughput -- --model "$model" --threads "$threads" --dtype f32 --dtype bf16 --dtype f16 --dtype stored --reps 5; }
echo "gram (first)..." >&2
gram > "$out/gram.jsonl"
floor 1
echo "llama.cpp..." >&2
.venv-bench/bin/python tools/bench_peers.py --peer llamacpp --threads "$threads" --reps 5 \
  --gguf f32="$out/smollm2-135m-f32.gguf" --gguf bf16="$out/smollm2-135m-bf16.gguf" \
  --gguf f16="$out/smollm2-135m-f16.gguf" --gguf q4_1="$model/model.gguf" > "$out/llamacpp.jsonl"
floor 2
echo "torch..." >&2
.venv/bin/python tools/bench_peers.py --peer torch --threads "$threads" --reps 3 --dtype f32 --dtype bf16 > "$out/torch.jsonl"
floor 3
echo "gram (last)..." >&2
gram | sed 's/"peer":"gram"/"peer":"gram (rerun)"/' > "$out/gram_last.jsonl"
floor 4
# In the order they were made: the summary judges each file by the floors around it.
python3 tools/bench_peers.py --markdown "$out/floor-0.json" "$out/gram.jsonl" "$out/floor-1.json" \
  "$out/llamacpp.jsonl" "$out/floor-2.json" "$out/torch.jsonl" "$out/floor-3.json" \
  "$out/gram_last.jsonl" "$out/floor-4.json" > "$out/results.md"
cat "$out/results.md"
