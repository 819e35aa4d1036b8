#!/usr/bin/env bash
# One GPU session for gram's CUDA backend (issue 7), end to end, sized to fit one device call:
#   0. where the CUDA libraries are (LD_LIBRARY_PATH for cudarc's dlopen), nvidia-smi
#   1. tests/gpu on the bundled default model (every op and whole searches against the CPU)
#   2. random real-shaped checkpoints + prompts (make_inputs.py)
#   3. gram bench-codes --device cuda on both shaped models and the default model (+ profile)
#   4. tests/gpu again with the shaped models (logits + beam parity against the CPU)
#   5. the HF transformers peer on the same prompts, same GPU
#   6. torch's copy bandwidth and bf16 matmul (the roofline)
# Everything lands in $W; $OUT gets at most 8 files (the device tool's limit): the logs
# concatenated, the JSONL results, and a tarball of everything.
#
# Needs two binaries built on the CPU machine and carried in .devbin/ (git-ignored):
#   cargo build --release && cargo test --release --test gpu --no-run
#   mkdir -p .devbin && strip -o .devbin/gram target/release/gram &&
#     strip -o .devbin/gpu-tests target/release/deps/gpu-<hash>
# and for step 12: cargo bench --bench beam_step_gpu --no-run &&
#     strip -o .devbin/beam-step-bench target/release/deps/beam_step_gpu-<hash>
# Env knobs: STEPS (default "0 1 2 3 4 5 6 7"; 8 = the profile run; 9 = serving under load, after 7;
# 10 = each op's cost inside a replayed pass, by knocking it out with GRAM_CUDA_SKIP_OPS, after 2;
# 11 = the device beam step's test and compute-sanitizer; 12 = the device beam step's bench;
# SERVE_VARIANTS="--max-batch 16|--max-batch 64" runs step 9 once per set of `gram serve` flags;
# SERVE_CLIENTS, default "1 8 32": step 9's closed-loop concurrencies; SERVE_BINS: step 9's server
# binaries in order (default this build; ".devbin/gram OLD .devbin/gram OLD" alternates two); SERVE_MODEL2=DIR: step 9 also
# serves an index of that model built on the GPU), BENCH_BUDGET_S (per model, 60), HF_BUDGET_S (per
# model, 40), HF_CAP_S (per config, 10), BASE (an earlier build's binary: step 3 runs it too, same configs),
# ALT_ENV (settings for a second run of the same build in step 3, e.g. GRAM_CUDA_ROWS_GEMM=0), EXTRAS (0 skips
# step 3's cuBLAS-only and eager comparison runs).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gram-device-out}
W=/tmp/gw
INPUTS=/tmp/gram-gpu
STEPS=${STEPS:-0 1 2 3 4 5 6 7}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-60}
HF_BUDGET_S=${HF_BUDGET_S:-40}
HF_CAP_S=${HF_CAP_S:-10}
mkdir -p "$W" "$OUT" "$INPUTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GRAM_REQUIRE_GPU=1 GRAM_REPO="$PWD" GRAM_KERNEL_CACHE="$W/kernel-cache" RUST_BACKTRACE=1
ts() { date +%H:%M:%S; }
log() { echo "[$(ts)] $*" | tee -a "$W/run.log"; pack; }
pack() {
  # At most 8 files back: the logs concatenated, the JSONL results, a tarball of everything.
  # Called after every step, so a run cut short still returns what it did.
  for f in "$W"/*.log "$W"/env.txt; do [ -f "$f" ] && { echo "===== $(basename "$f")"; cat "$f"; }; done > "$OUT/logs.txt"
  cat "$W"/gram-bench.jsonl "$W"/gram-bench-cublas.jsonl "$W"/gram-bench-eager.jsonl "$W"/gram-profile.jsonl \
    > "$OUT/gram-bench.jsonl" 2>/dev/null
  for f in gram-bench-base.jsonl gram-bench-alt.jsonl; do [ -f "$W/$f" ] && cp "$W/$f" "$OUT/"; done
  cat "$W"/hf_peer.jsonl > "$OUT/hf_peer.jsonl" 2>/dev/null
  [ -f "$W/beam-step-bench.jsonl" ] && cp "$W/beam-step-bench.jsonl" "$OUT/"
  tar czf "$OUT/all.tgz" -C "$W" --exclude kernel-cache . 2>/dev/null
}
has() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
GRAM=.devbin/gram
TESTS=.devbin/gpu-tests
chmod +x "$GRAM" "$TESTS" 2>/dev/null

# 0. Libraries: libcuda from the driver; NVRTC and cuBLAS from the toolkit or the pip wheels.
. tools/gpu/cuda_env.sh
if has 0; then
  {
    log "step 0: environment"
    nvidia-smi
    echo "gram LD_LIBRARY_PATH=$GLD"
    echo "GRAM_CUDA_INCLUDE=${GRAM_CUDA_INCLUDE:-}"
    find ${libdirs//:/ } -maxdepth 1 \( -name 'libnvrtc.so*' -o -name 'libcublas.so*' -o -name 'libcuda.so*' \) 2>/dev/null
    nproc; free -g | head -2
  } > "$W/env.txt" 2>&1
fi

# 1. GPU tests on the default model.
if has 1; then
  log "step 1: tests/gpu (default model)"
  LD_LIBRARY_PATH="$GLD" timeout -k 5 150 "$TESTS" --test-threads=1 --nocapture > "$W/gpu-tests.log" 2>&1
  log "step 1 exit $?: $(grep -E '^test result' "$W/gpu-tests.log")"
fi

# 2. Shaped checkpoints and prompts.
if has 2; then
  log "step 2: make_inputs"
  timeout -k 5 150 python3 tools/gpu/make_inputs.py --out "$INPUTS" > "$W/make_inputs.log" 2>&1
  log "step 2 exit $?"
  cp "$INPUTS/prompts.json" "$INPUTS/inputs-meta.json" "$W/" 2>/dev/null
fi

# 3. gram on the GPU.
if has 3; then
  head -64 tools/queries/wands.txt | sed 's/^/Q: /' > "$W/default-prompts.txt"
  for m in smollm2 qwen05b; do
    [ -f "$INPUTS/$m-shaped/model.safetensors" ] || { log "no $m model"; continue; }
    log "step 3: bench-codes $m"
    LD_LIBRARY_PATH="$GLD" timeout -k 5 $((BENCH_BUDGET_S + 40)) "$GRAM" bench-codes --device cuda --model "$INPUTS/$m-shaped" \
      --codes models/gram-icecat-2m/codes.txt --prompts "$INPUTS/prompts.json" \
      --beam 10 --beam 64 --batch 1 --batch 16 --batch 64 --reps 5 --config-s 4 \
      --budget-s "$BENCH_BUDGET_S" --profile --out "$W/gram-bench.jsonl" \
      --dump-codes "$W/gram-codes-$m.json" > "$W/bench-$m.log" 2>&1
    log "step 3 $m exit $?"
  done
  # Side by side with an earlier build (BASE=path to its binary): same configs, same call.
  for m in smollm2 qwen05b; do
    [ -n "${BASE:-}" ] && [ -f "$INPUTS/$m-shaped/model.safetensors" ] || continue
    chmod +x "$BASE"
    log "step 3: bench-codes $m with the base build $BASE"
    LD_LIBRARY_PATH="$GLD" timeout -k 5 $((BENCH_BUDGET_S + 40)) "$BASE" bench-codes --device cuda --model "$INPUTS/$m-shaped" \
      --codes models/gram-icecat-2m/codes.txt --prompts "$INPUTS/prompts.json" \
      --beam 10 --beam 64 --batch 1 --batch 16 --batch 64 --reps 5 --config-s 4 \
      --budget-s "$BENCH_BUDGET_S" --profile --out "$W/gram-bench-base.jsonl" > "$W/bench-$m-base.log" 2>&1
    log "step 3 $m base exit $?"
  done
  # The same build with other settings (ALT_ENV="NAME=value ...", e.g. GRAM_CUDA_ROWS_GEMM=0).
  for m in smollm2 qwen05b; do
    [ -n "${ALT_ENV:-}" ] && [ -f "$INPUTS/$m-shaped/model.safetensors" ] || continue
    log "step 3: bench-codes $m with $ALT_ENV"
    env $ALT_ENV LD_LIBRARY_PATH="$GLD" timeout -k 5 $((BENCH_BUDGET_S + 40)) "$GRAM" bench-codes --device cuda --model "$INPUTS/$m-shaped" \
      --codes models/gram-icecat-2m/codes.txt --prompts "$INPUTS/prompts.json" \
      --beam 10 --beam 64 --batch 1 --batch 16 --batch 64 --reps 5 --config-s 4 \
      --budget-s "$BENCH_BUDGET_S" --profile --out "$W/gram-bench-alt.jsonl" > "$W/bench-$m-alt.log" 2>&1
    log "step 3 $m alt exit $?"
  done
  for m in smollm2 qwen05b; do
    [ "${EXTRAS:-1}" = 1 ] && [ -f "$INPUTS/$m-shaped/model.safetensors" ] || continue
    log "step 3: bench-codes $m cuBLAS for every product (no few-row kernel, to compare)"
    GRAM_CUDA_SMALL_GEMM=0 GRAM_CUDA_ROWS_GEMM=0 LD_LIBRARY_PATH="$GLD" timeout -k 5 60 "$GRAM" bench-codes --device cuda --model "$INPUTS/$m-shaped" \
      --codes models/gram-icecat-2m/codes.txt --prompts "$INPUTS/prompts.json" \
      --beam 10 --beam 64 --batch 1 --reps 5 --config-s 3 --budget-s 25 \
      --out "$W/gram-bench-cublas.jsonl" > "$W/bench-$m-cublas.log" 2>&1
    log "step 3 $m cublas exit $?"
    log "step 3: bench-codes $m --eager (no graphs, to compare)"
    LD_LIBRARY_PATH="$GLD" timeout -k 5 60 "$GRAM" bench-codes --device cuda --eager --model "$INPUTS/$m-shaped" \
      --codes models/gram-icecat-2m/codes.txt --prompts "$INPUTS/prompts.json" \
      --beam 10 --beam 64 --batch 1 --batch 64 --reps 5 --config-s 3 --budget-s 25 \
      --out "$W/gram-bench-eager.jsonl" > "$W/bench-$m-eager.log" 2>&1
    log "step 3 $m eager exit $?"
  done
  log "step 3: bench-codes default model"
  LD_LIBRARY_PATH="$GLD" timeout -k 5 60 "$GRAM" bench-codes --device cuda --model models/gram-icecat-2m \
    --codes models/gram-icecat-2m/codes.txt --prompts "$W/default-prompts.txt" \
    --beam 10 --beam 64 --batch 1 --batch 16 --batch 64 --reps 5 --config-s 3 --budget-s 30 \
    --profile --out "$W/gram-bench.jsonl" > "$W/bench-default.log" 2>&1
  log "step 3 default exit $?"
fi

# 4. GPU tests with the shaped models too (whole-model parity).
if has 4; then
  log "step 4: tests/gpu with shaped models"
  LD_LIBRARY_PATH="$GLD" GRAM_GPU_MODELS="$INPUTS/smollm2-shaped:$INPUTS/qwen05b-shaped" timeout -k 5 200 "$TESTS" \
    --test-threads=1 --nocapture model_ beam_search graph_ programmatic_ > "$W/gpu-tests-shaped.log" 2>&1
  log "step 4 exit $?: $(grep -E '^test result' "$W/gpu-tests-shaped.log")"
fi

# 5. The HF peer.
if has 5; then
  for m in smollm2 qwen05b; do
    [ -f "$INPUTS/$m-shaped/model.safetensors" ] || continue
    log "step 5: hf_peer $m"
    timeout -k 5 $((HF_BUDGET_S + 60)) python3 tools/gpu/hf_peer.py --model "$INPUTS/$m-shaped" \
      --codes models/gram-icecat-2m/codes.txt --prompts "$INPUTS/prompts.json" \
      --beam 10 --beam 64 --batch 1 --batch 16 --batch 64 --max-new-tokens 16 --dtype bf16 \
      --budget-s "$HF_BUDGET_S" --config-cap-s "$HF_CAP_S" --out "$W/hf_peer.jsonl" \
      --dump-codes "$W/hf-codes-$m.json" > "$W/hf-$m.log" 2>&1
    log "step 5 $m exit $?"
  done
fi

# 6. Roofline numbers from torch.
if has 6; then
  log "step 6: bandwidth"
  timeout -k 5 60 python3 tools/gpu/bandwidth.py --out "$W/bandwidth.json" > "$W/bandwidth.log" 2>&1
  log "step 6 exit $?"
fi

# 8. Where a step's time goes: per-op GPU time (graphs off, stream drained around each op) and
# the GPU time of each replayed graph against the wall time (graphs on).
if has 8; then
  for m in smollm2 qwen05b; do
    [ -f "$INPUTS/$m-shaped/model.safetensors" ] || continue
    log "step 8: bench-codes $m --profile"
    LD_LIBRARY_PATH="$GLD" timeout -k 5 60 "$GRAM" bench-codes --device cuda --model "$INPUTS/$m-shaped" \
      --codes models/gram-icecat-2m/codes.txt --prompts "$INPUTS/prompts.json" \
      --beam 10 --beam 64 --batch 1 --batch 64 --reps 3 --config-s 2 --budget-s 30 --profile \
      --out "$W/gram-profile.jsonl" > "$W/profile-$m.log" 2>&1
    log "step 8 $m exit $?"
  done
fi

# 7. The whole path on the GPU: index build (teacher forcing), search and serve.
if has 7; then
  log "step 7: index build / search / serve --device cuda"
  head -3000 models/gram-icecat-2m/catalog.jsonl > "$W/catalog-3k.jsonl"
  for d in cuda cpu; do
    LD_LIBRARY_PATH="$GLD" timeout -k 5 120 "$GRAM" index build --device $d --model models/gram-icecat-2m \
      --catalog "$W/catalog-3k.jsonl" --out "$W/ix-$d" > "$W/index-$d.log" 2>&1
    log "step 7 index build $d exit $?"
    LD_LIBRARY_PATH="$GLD" timeout -k 5 60 "$GRAM" search --device $d --index "$W/ix-$d" --k 10 \
      "wireless mouse" "usb cable 2m" "laptop bag 15 inch" "hp toner black" > "$W/search-$d.jsonl" 2>> "$W/index-$d.log"
    log "step 7 search $d exit $?"
  done
  # The GPU-built index against the CPU-built one: same codes, and how many of each query's top 10
  # products agree (product-side probabilities differ by bf16 numerics: near-ties may swap).
  python3 - "$W/search-cuda.jsonl" "$W/search-cpu.jsonl" > "$W/search-compare.log" 2>&1 <<'PY'
import json, sys
a, b = ([json.loads(l) for l in open(f)] for f in sys.argv[1:3])
for x, y in zip(a, b):
    same_codes = [c["code"] for c in x["codes"]] == [c["code"] for c in y["codes"]]
    px, py = [p["id"] for p in x["products"]], [p["id"] for p in y["products"]]
    print(f"{x['query']!r}: codes {'same' if same_codes else 'DIFFER'}; top 10 in common {len(set(px) & set(py))}/10; first {px[:3]} vs {py[:3]}")
PY
  log "step 7 compare: $(tr '\n' ' ' < "$W/search-compare.log")"
  LD_LIBRARY_PATH="$GLD" "$GRAM" serve --device cuda --index "$W/ix-cuda" --addr 127.0.0.1:8088 > "$W/serve.log" 2>&1 &
  spid=$!
  python3 - > "$W/serve-check.log" 2>&1 <<'PY'
import json, time, urllib.request
base = "http://127.0.0.1:8088"
for _ in range(300):  # /ready answers 503 until the engine (CUDA context, kernels) is up
    try:
        print(urllib.request.urlopen(base + "/ready", timeout=2).read().decode()); break
    except Exception as e:
        time.sleep(0.2)
print(urllib.request.urlopen(base + "/health", timeout=2).read().decode())
t = time.time()
for q in ["wireless+mouse", "usb+cable", "laptop+bag"]:
    r = json.loads(urllib.request.urlopen(base + "/search?q=" + q + "&k=5", timeout=10).read())
    print(q, json.dumps(r)[:300])
print("3 searches in %.1f ms" % ((time.time() - t) * 1e3))
m = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
print("\n".join(l for l in m.splitlines() if "backend" in l or "gram_search" in l)[:2000])
PY
  kill $spid 2>/dev/null; wait $spid 2>/dev/null
  log "step 7 serve checked"
fi

# 9. Serving on the GPU under load (needs step 7's index): closed loops of 1, 8 and 32 clients
# against `gram serve --device cuda`, 15 s each (reports in $W/serve-i<index>-v<i>-c*/report.json), once
# per entry of SERVE_VARIANTS ("|"-separated extra `gram serve` flags; default: one run, none).
if has 9 && [ -f "$W/ix-cuda/index.gram" ]; then
  IFS='|' read -r -a variants <<< "${SERVE_VARIANTS:-}"
  [ ${#variants[@]} -eq 0 ] && variants=("")
  indexes=("$W/ix-cuda")
  # A second model's index (SERVE_MODEL2=DIR), built on the GPU from the same 3,000 products.
  if [ -n "${SERVE_MODEL2:-}" ]; then
    LD_LIBRARY_PATH="$GLD" timeout -k 5 120 "$GRAM" index build --device cuda --model "$SERVE_MODEL2" \
      --catalog "$W/catalog-3k.jsonl" --out "$W/ix2-cuda" > "$W/index2-cuda.log" 2>&1
    log "step 9 index build $SERVE_MODEL2 exit $?"
    [ -f "$W/ix2-cuda/index.gram" ] && indexes+=("$W/ix2-cuda")
  fi
  # SERVE_BINS: the server binaries, in this order (repeat them to alternate: "A B A B");
  # the load generator is always this build's.
  read -r -a sbins <<< "${SERVE_BINS:-$GRAM}"
  for bi in "${!sbins[@]}"; do
  sbin=${sbins[$bi]}
  chmod +x "$sbin" 2>/dev/null
  for ii in "${!indexes[@]}"; do
  for vi in "${!variants[@]}"; do
    extra=${variants[$vi]}
    # shellcheck disable=SC2086 # the flags split on purpose
    LD_LIBRARY_PATH="$GLD" "$sbin" serve --device cuda --index "${indexes[$ii]}" --addr 127.0.0.1:8089 \
      --timeout-ms 30000 $extra > "$W/serve-load-b$bi-i$ii-v$vi.log" 2>&1 &
    spid=$!
    for _ in $(seq 150); do curl -sf 127.0.0.1:8089/ready > /dev/null 2>&1 && break; sleep 0.2; done
    for c in ${SERVE_CLIENTS:-1 8 32}; do
      d="$W/serve-b$bi-i$ii-v$vi-c$c"
      timeout -k 5 40 "$GRAM" bench --url http://127.0.0.1:8089 --queries tools/queries/wands.txt \
        --concurrency $c --duration 15 --warmup 10 --out "$d" > "$d.log" 2>&1
      log "step 9 [$sbin $(basename "${indexes[$ii]}") $extra] c=$c exit $?: $(python3 -c "import json,sys; r=json.load(open('$d/report.json')); print('qps %.0f p50 %.1f p99 %.1f ms' % (r['qps'], r['latency_ms']['p50'], r['latency_ms']['p99']))" 2>&1)"
    done
    kill $spid 2>/dev/null; wait $spid 2>/dev/null
  done
  done
  done
fi

# 10. Each op's cost inside the graph: the same configs with one op launching nothing
# (GRAM_CUDA_SKIP_OPS, timing only: the results are wrong), the full pass before and after.
if has 10; then
  for m in smollm2 qwen05b; do
    [ -f "$INPUTS/$m-shaped/model.safetensors" ] || continue
    for skip in none attention qkv_rope_store gate_up_silu linear add_rmsnorm none; do
      e=GRAM_X=1; [ "$skip" != none ] && e=GRAM_CUDA_SKIP_OPS=$skip
      env "$e" LD_LIBRARY_PATH="$GLD" timeout -k 5 90 "$GRAM" bench-codes --device cuda --model "$INPUTS/$m-shaped" \
        --codes models/gram-icecat-2m/codes.txt --prompts "$INPUTS/prompts.json" --beam 10 --beam 64 \
        --batch 1 --batch 16 --reps 10 --config-s 4 --budget-s 30 --profile \
        --out "$W/knockout-$m-$skip.jsonl" > "$W/knockout-$m-$skip.log" 2>&1
      log "step 10 $m skip $skip exit $?"
    done
  done
fi

# 11. The device beam step (kernels/beam_step.cu): its test against the CPU twin, then the
# test and the attention test under compute-sanitizer's memcheck and racecheck.
if has 11; then
  log "step 11: device beam step test"
  LD_LIBRARY_PATH="$GLD" timeout -k 5 120 "$TESTS" --test-threads=1 --nocapture device_beam_step \
    > "$W/beam-step-test.log" 2>&1
  log "step 11 exit $?: $(grep -E '^test result' "$W/beam-step-test.log")"
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  for tool in memcheck racecheck; do
    for t in device_beam_step attention_matches_cpu; do
      [ -n "$CS" ] || { log "step 11: no compute-sanitizer"; break 2; }
      LD_LIBRARY_PATH="$GLD" timeout -k 5 100 "$CS" --tool $tool --error-exitcode 9 --print-limit 20 \
        "$TESTS" --test-threads=1 $t > "$W/cs-$tool-$t.log" 2>&1
      log "step 11 $tool $t exit $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$W/cs-$tool-$t.log")"
    done
  done
fi

# 12. The device beam step's GPU time per step (benches/beam_step_gpu.rs, binary in .devbin).
if has 12; then
  log "step 12: beam step bench"
  chmod +x .devbin/beam-step-bench 2>/dev/null
  LD_LIBRARY_PATH="$GLD" timeout -k 5 150 .devbin/beam-step-bench --reps 5 > "$W/beam-step-bench.jsonl" 2> "$W/beam-step-bench.log"
  log "step 12 exit $?"
fi

log "done"
ls -la "$OUT"
grep -E "^test |panicked|FAILED|error" "$W/gpu-tests.log" 2>/dev/null | head -40
tail -5 "$W/run.log"
