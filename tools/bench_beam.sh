#!/usr/bin/env bash
# Beam search side by side, one machine, one run: the hardware floor, gram, and transformers +
# prefix_allowed_tokens_fn on SmolLM2-135M-Instruct, 2 threads (gram on the GGUF's stored Q4_1 /
# Q8_0 blocks, computing in f32 on their exact values; transformers on the same values
# dequantized to f32 at load: the same numbers, 96 MB of weights a step against 538 MB; and gram
# once more on f32 weights, transformers' precision),
# beam 10, max 16 new tokens, the same ~20-token prompts (real WANDS queries in a template), a trie
# of 100k codes. gram runs first and last, so drift on a noisy machine shows. Also times the
# trie build for 2.5M codes. Writes bench-out/beam-*.json* and bench-out/results-beam.md (the
# table in docs/PERF.md).
#
# One-time set-up: python3 -m venv .venv && .venv/bin/pip install -r tools/requirements.txt
# Then: tools/bench_beam.sh          (about 10 minutes; keep the machine otherwise idle)
# Knobs: THREADS (2), QUERIES (10: the same queries for gram and transformers), OUT (bench-out).
# transformers runs with its default attention (sdpa), as a user would.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
threads=${THREADS:-2}
queries=${QUERIES:-10}
model=models/smollm2-135m-instruct
mkdir -p "$out"
[ -x .venv/bin/python ] || { echo "error: .venv missing; see the set-up line at the top of $0" >&2; exit 1; }
tools/get_smollm2.sh >/dev/null
codes="$out/codes-100k.txt"
big="$out/codes-2.5m.txt"
[ -s "$codes" ] || .venv/bin/python tools/make_codes.py --out "$codes" --n 100000 \
  --tokenizer "$model" --max-tokens 15
[ -s "$big" ] || .venv/bin/python tools/make_codes.py --out "$big" --n 2500000
cargo build --release --benches -q
bench() { cargo bench -q --bench beam_search -- --model "$model" --threads "$threads" "$@"; }

echo "floor..." >&2
tools/floor/run.sh > "$out/floor.json"
echo "gram (first)..." >&2
bench --codes "$codes" --queries "$queries" > "$out/beam-gram.jsonl"
# The same precision as transformers: f32 weights on both sides (gram's default above streams
# the stored Q4_1 / Q8_0 blocks, 96 MB a step where f32 reads 538 MB).
echo "gram, f32 weights..." >&2
bench --codes "$codes" --queries "$queries" --dtype f32 --modes full > "$out/beam-gram-f32.jsonl"
echo "transformers + prefix_allowed_tokens_fn..." >&2
# Through a file: a failure in a process substitution escapes `set -e`, and the oracle would
# run with no prompts.
bench --print-prompts --queries "$queries" > "$out/prompts.txt"
[ -s "$out/prompts.txt" ] || { echo "error: no prompts from the bench" >&2; exit 1; }
prompts=()
while IFS= read -r p; do prompts+=(--prompt "$p"); done < "$out/prompts.txt"
.venv/bin/python tools/beam_oracle.py --model "$model" --codes "$codes" --beam 10 \
  --max-new-tokens 16 --time 1 --threads "$threads" --attn sdpa "${prompts[@]}" > "$out/beam-hf.json"
echo "gram (last)..." >&2
bench --codes "$codes" --queries "$queries" > "$out/beam-gram-last.jsonl"
echo "trie build, 2.5M codes..." >&2
bench --codes "$big" --trie-only > "$out/trie-2.5m.jsonl"

python3 - "$out" "$threads" <<'EOF' > "$out/results-beam.md"
import json, sys
out = sys.argv[1]
rows = lambda f: [json.loads(l) for l in open(f"{out}/{f}") if l.strip()]
floor = json.load(open(f"{out}/floor.json"))
threads = sys.argv[2]
# The best f32 FMA peak the floor measured (AVX-512 where the CPU has it, else AVX2).
peak = max(v[threads]["best"] for k, v in floor.items() if k.startswith("fp32_fma_gflops") and threads in v)
bw = floor["read_bw_gbps"][threads]["best"]
hf = json.load(open(f"{out}/beam-hf.json"))
first, last = rows("beam-gram.jsonl"), rows("beam-gram-last.jsonl")
f32 = rows("beam-gram-f32.jsonl")
trie = rows("trie-2.5m.jsonl")[0]
print(f"Floor: {peak:.0f} GFLOP/s f32 FMA, {bw:.1f} GB/s read ({threads} threads).\n")
print(f"transformers {hf['transformers']} + prefix_allowed_tokens_fn, {hf['threads']} threads, "
      f"{hf['runs']} queries: median {hf['median_s']*1e3:.0f} ms, p99 {hf['p99_s']*1e3:.0f} ms.\n")
print("| gram run | weights | normalize | median ms | p99 ms | HF / gram (median) | rows | GFLOP | compute floor ms | gram / floor |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name, rs in (("first", first), ("f32", f32), ("last", last)):
    for r in rs:
        if r["kind"] != "beam":
            continue
        fl = r["gflop_mean"] / peak * 1e3
        print(f"| {name} | {r.get('dtype', 'stored')} | {r['normalize']} | {r['ms_median']:.0f} | {r['ms_p99']:.0f} | "
              f"{hf['median_s']*1e3/r['ms_median']:.1f}x | {r['rows_mean']:.0f} | "
              f"{r['gflop_mean']:.1f} | {fl:.0f} | {r['ms_median']/fl:.2f} |")
print("\n| gram run | normalize | queries sharing steps | QPS | rows |")
print("|---|---|---|---|---|")
for name, rs in (("first", first), ("last", last)):
    for r in rs:
        if r["kind"] == "beam_batch":
            print(f"| {name} | {r['normalize']} | {r['batch']} | {r['qps']:.1f} | {r['rows']} |")
for r in first:
    if r["kind"] == "unconstrained":
        print(f"\nUnconstrained (no trie), beam {r['beam']}, {r['queries']} queries: "
              f"{r['invalid']} of {r['returned']} returned sequences are not codes "
              f"({100 * r['invalid_rate']:.0f} %); constrained: 0 by construction (tested).")
print(f"\nTrie: {trie['codes']:,} codes, {trie['tokens']:,} tokens → {trie['nodes']:,} nodes, "
      f"{trie['bytes']/2**20:.0f} MiB; tokenizing {trie['tokenize_s']:.1f} s, compiling "
      f"{trie['build_s']:.2f} s ({trie['threads']} threads).")
EOF
cat "$out/results-beam.md"
