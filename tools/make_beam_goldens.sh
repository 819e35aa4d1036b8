#!/usr/bin/env bash
# Code sets + HF constrained-beam-search goldens (tools/FIXTURES.md, "Beam search golden outputs").
# Run from anywhere; needs .venv (tools/requirements.txt), models/tiny-* and
# models/smollm2-135m-instruct/model.gguf (tools/get_smollm2.sh). ~1.5 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=.venv/bin/python

$PY tools/make_codes.py --out tests/golden/codes-tiny.txt --n 300 --seed 1 --max-chars 40 \
    --tokenizer models/tiny-llama --max-tokens 12
$PY tools/make_codes.py --out tests/golden/codes-smollm2.txt --n 3000 --seed 2 \
    --tokenizer models/smollm2-135m-instruct --max-tokens 15

for m in tiny-llama tiny-qwen2 tiny-qwen3; do
  $PY tools/beam_oracle.py --model models/$m --codes tests/golden/codes-tiny.txt \
      --out tests/golden/beam-$m.json \
      --case "1,16,1.0,salon chair" \
      --case "3,16,1.0,smart coffee table" \
      --case "10,16,1.0,turquoise pillows" \
      --case "32,16,1.0,white bathroom vanity black hardware" \
      --case "10,16,0.5,navy and peach bedding" \
      --case "10,16,2.0,animal print handmade tufted wool beige/black area rug by allmodern" \
      --case "10,6,1.0,ligth bulb"
done

$PY tools/beam_oracle.py --model models/smollm2-135m-instruct \
    --codes tests/golden/codes-smollm2.txt --out tests/golden/beam-smollm2.json \
    --prompt "smart coffee table" --prompt "turquoise pillows" \
    --prompt "nespresso vertuo next premium by breville with aeroccino" \
    --case "4,16,1.0,bathroom wastebasket"

# Codes that are prefixes of codes (tests/golden/codes-prefix.txt, written by hand: the ten codes
# of four families, FIXTURES.md): 28 cases per tiny model, two prompts each.
prefix_cases=()
for c in 1,16,1.0 2,16,1.0 4,16,1.0 16,16,1.0 32,16,0.5 10,16,2.0 10,16,0.0 10,16,-1.0 \
         5,3,1.0 3,4,2.0 8,2,1.0 1,2,1.0 12,5,0.5 7,16,3.0; do
  prefix_cases+=("--case=$c,red caps" "--case=$c,network gear")
done
for m in tiny-llama tiny-qwen2 tiny-qwen3; do
  $PY tools/beam_oracle.py --model models/$m --codes tests/golden/codes-prefix.txt \
      --out tests/golden/beam-prefix-$m.json "${prefix_cases[@]}"
done
