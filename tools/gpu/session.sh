#!/usr/bin/env bash
# The HF side of the GPU session in one go (see tools/gpu/README.md):
#   bandwidth + matmul roofline, random real-shaped checkpoints + prompts, the HF peer on both.
#
#   OUT=/some/dir tools/gpu/session.sh          # on the device machine $OUT is already set
#
# Env (all optional): OUT (results; default /tmp/gram-gpu-out), INPUTS (models + prompts;
# default /tmp/gram-gpu, kept out of $OUT: 1.3 GB), PYTHON (python3), ONLY (smollm2,qwen05b),
# BUDGET_S (per model, 90), CAP_S (per config, 20), CONFIGS (the --beam/--batch flags),
# PEER_ARGS (extra hf_peer flags), DEVICE (cuda|cpu: make_inputs/bandwidth/hf_peer --device).
# Results: $OUT/{nvidia-smi.txt,bandwidth.json,prompts.json,inputs-meta.json,hf_peer.jsonl,
# hf_codes-<model>.json,*.log}. Each step goes on if an earlier one failed, when it can.
# Worst case (every timeout hit) 60 + 120 + 2 x (BUDGET_S + 60) = 480 s with the defaults.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gram-gpu-out}
INPUTS=${INPUTS:-/tmp/gram-gpu}
PY=${PYTHON:-python3}
ONLY=${ONLY:-smollm2,qwen05b}
BUDGET_S=${BUDGET_S:-90}
CAP_S=${CAP_S:-20}
CONFIGS=${CONFIGS:---beam 10 --beam 64 --batch 1 --batch 16 --batch 64}
PEER_ARGS=${PEER_ARGS:-}
DEV=()
[ -n "${DEVICE:-}" ] && DEV=(--device "$DEVICE")
CODES=models/gram-icecat-2m/codes.txt
mkdir -p "$OUT" "$INPUTS"
ts() { date +%H:%M:%S; }
echo "[$(ts)] session: OUT=$OUT INPUTS=$INPUTS ONLY=$ONLY BUDGET_S=$BUDGET_S CAP_S=$CAP_S"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

timeout 60 "$PY" tools/gpu/bandwidth.py --out "$OUT/bandwidth.json" "${DEV[@]}" 2>&1 \
  | tee "$OUT/bandwidth.log"
timeout 120 "$PY" tools/gpu/make_inputs.py --out "$INPUTS" --only "$ONLY" "${DEV[@]}" 2>&1 \
  | tee "$OUT/make_inputs.log"
cp "$INPUTS/prompts.json" "$INPUTS/inputs-meta.json" "$OUT/" 2>/dev/null || true

for m in ${ONLY//,/ }; do
  [ -f "$INPUTS/$m-shaped/model.safetensors" ] || { echo "[$(ts)] no $m model, skipped"; continue; }
  # shellcheck disable=SC2086
  timeout $((BUDGET_S + 60)) "$PY" tools/gpu/hf_peer.py --model "$INPUTS/$m-shaped" \
    --codes "$CODES" --prompts "$INPUTS/prompts.json" $CONFIGS --max-new-tokens 16 \
    --dtype bf16 --budget-s "$BUDGET_S" --config-cap-s "$CAP_S" --out "$OUT/hf_peer.jsonl" \
    --dump-codes "$OUT/hf_codes-$m.json" "${DEV[@]}" $PEER_ARGS 2>&1 | tee "$OUT/hf_peer-$m.log"
done
echo "[$(ts)] session done; results in $OUT:"
ls -la "$OUT"
