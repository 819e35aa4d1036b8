#!/usr/bin/env python3
"""Golden rotary tables from transformers, at positions far past the logits goldens' prompts.

HF computes each angle as an f32 product (position × inv_freq, both f32) and its cos/sin in
f32; an angle computed in f64 instead differs by up to half an f32 ulp of the angle (~2e-3 rad
at position 32,767), which prompts of ~60 tokens never show. `src/model/rope.rs`'s test reads
the output (tests/golden/rope.json).

    .venv/bin/python tools/rope_golden.py > tests/golden/rope.json
"""
import json

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

POSITIONS = [0, 1, 61, 1000, 4095, 16383, 32767]
cases = []
for head_dim, theta in [(64, 100000.0), (64, 1000000.0), (128, 10000.0)]:
    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                      rope_theta=theta, max_position_embeddings=32768)
    rope = LlamaRotaryEmbedding(cfg)
    pos = torch.tensor([POSITIONS])
    x = torch.zeros(1, 1, len(POSITIONS), head_dim, dtype=torch.float32)
    cos, sin = rope(x, pos)
    half = head_dim // 2
    cases.append({
        "head_dim": head_dim,
        "theta": theta,
        "positions": POSITIONS,
        # rotate-half layout: the two halves are equal; keep the first.
        "cos": cos[0, :, :half].tolist(),
        "sin": sin[0, :, :half].tolist(),
    })
print(json.dumps({"made_by": ".venv/bin/python tools/rope_golden.py > tests/golden/rope.json",
                  "transformers": __import__("transformers").__version__,
                  "torch": torch.__version__, "cases": cases}))
