#!/usr/bin/env bash
# Where a replayed decode pass spends its GPU time, kernel by kernel, in one device call:
#   1. the launch floor of a graph of tiny kernels (tools/gpu/graph_floor.py, torch)
#   2. the SmolLM2-shaped model (make_inputs.py --only smollm2, unless /tmp/gram-gpu has it)
#   3. `gram bench-codes` beam 10 × batch 1 under Nsight Systems with graph nodes traced
#      (--cuda-graph-trace=node), exported as a per-kernel CSV (start, duration, name); or, where
#      there is no nsys, Nsight Compute on the first kernels (durations only, no gaps)
# The CSV has a row per kernel (start, duration, name): sum the durations by name for each
# kernel's share, and the gaps between one end and the next start for the launch idle.
# Needs .devbin/gram (as device_run.sh).
# Env: GRAM_ENV (settings for the traced run, e.g. "GRAM_CUDA_ROWS_GEMM=0"), MODEL (smollm2).
# Everything lands in $OUT/trace.tgz (one file: the device tool brings back at most 8).
set -u
cd "$(dirname "$0")/../.."
FINAL=${OUT:-/tmp/gram-trace-out}
W=/tmp/gt
OUT=$W/out
INPUTS=/tmp/gram-gpu
MODEL=${MODEL:-smollm2}
mkdir -p "$W" "$OUT" "$INPUTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GRAM_KERNEL_CACHE="$W/kernel-cache"
. tools/gpu/cuda_env.sh
chmod +x .devbin/gram
{
  echo "== tools"; ls /usr/local/cuda/bin 2>&1 | tr '\n' ' '; echo
  NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys \
    /usr/local/cuda*/nsight-systems*/bin/nsys 2>/dev/null | head -1)
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  echo "nsys: ${NSYS:-none}  ncu: ${NCU:-none}"
  echo "== graph floor"
  timeout -k 5 60 python3 tools/gpu/graph_floor.py --out "$OUT/graph_floor.json"
  echo "== inputs"
  [ -f "$INPUTS/$MODEL-shaped/model.safetensors" ] ||
    timeout -k 5 120 python3 tools/gpu/make_inputs.py --out "$INPUTS" --only "$MODEL" > "$W/make_inputs.log" 2>&1
  echo "make_inputs exit $?"
  args=(bench-codes --device cuda --model "$INPUTS/$MODEL-shaped" --codes models/gram-icecat-2m/codes.txt
    --prompts "$INPUTS/prompts.json" --beam 10 --batch 1 --reps 5 --config-s 3 --budget-s 10)
  if [ -n "$NSYS" ]; then
    echo "== nsys"
    env ${GRAM_ENV:-} LD_LIBRARY_PATH="$GLD" timeout -k 5 150 "$NSYS" profile --trace=cuda --cuda-graph-trace=node \
      --sample=none --cpuctxsw=none --force-overwrite=true -o "$W/trace" .devbin/gram "${args[@]}" --out "$W/bench.jsonl"
    echo "nsys exit $?"
    timeout -k 5 120 "$NSYS" stats --report cuda_gpu_trace --format csv --force-export=true \
      --output "$W/trace" "$W/trace.nsys-rep" > "$W/stats.log" 2>&1
    echo "nsys stats exit $?"; tail -3 "$W/stats.log"
    ls -la "$W"
    gzip -c "$W"/trace_cuda_gpu_trace.csv > "$OUT/gpu_trace.csv.gz" 2>/dev/null
  elif [ -n "$NCU" ]; then
    echo "== ncu (no nsys)"
    env ${GRAM_ENV:-} LD_LIBRARY_PATH="$GLD" timeout -k 5 200 "$NCU" --graph-profiling node --cache-control none \
      --clock-control none --launch-skip 2000 --launch-count 400 --metrics gpu__time_duration.sum --csv \
      .devbin/gram "${args[@]}" --out "$W/bench.jsonl" > "$W/ncu.csv" 2> "$W/ncu.err"
    echo "ncu exit $?"; tail -3 "$W/ncu.err"
    gzip -c "$W/ncu.csv" > "$OUT/ncu.csv.gz"
  fi
  cp "$W/bench.jsonl" "$OUT/" 2>/dev/null
} 2>&1 | tee "$OUT/trace.log"
mkdir -p "$FINAL" && tar czf "$FINAL/trace.tgz" -C "$OUT" .
