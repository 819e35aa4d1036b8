#!/usr/bin/env python3
"""Golden rotary tables from transformers, at positions far past the logits goldens' prompts.

HF computes each angle as an f32 product (position × inv_freq, both f32) and its cos/sin in
f32; an angle computed in f64 instead differs by up to half an f32 ulp of the angle (~2e-3 rad
at position 32,767), which prompts of ~60 tokens never show. The scaled cases (`linear`, and
`llama3` with Llama 3.1's and Llama 3.2's parameters and one whose bands fall between several
frequencies of a small head) check the frequencies' scaling to the bit the same way; two use
factors that are not powers of two (3 and 2.5), where `f / factor`, `f * (1 / factor)` and an
f64 division give different bits.
`src/model/rope.rs`'s test reads the output (tests/golden/rope.json).

    .venv/bin/python tools/rope_golden.py > tests/golden/rope.json
"""
import json

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

POSITIONS = [0, 1, 61, 1000, 4095, 16383, 32767]
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA32 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# A small head whose frequencies straddle two bands (wavelengths 6.3 ... ~6e4 around 16 / 4:
# the first interpolated, the rest divided; tiny-llama-rope's), and one across all three with
# a factor that is not a power of two (bands 64 and 16: 6.3 kept, 19.9 interpolated, the rest
# divided by 3).
SMALL = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
THREE_BANDS = {"rope_type": "llama3", "factor": 3.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
cases = []
for head_dim, theta, scaling in [
    (64, 100000.0, None),
    (64, 1000000.0, None),
    (128, 10000.0, None),
    (64, 10000.0, {"rope_type": "linear", "factor": 4.0}),
    (128, 500000.0, LLAMA31),
    (64, 500000.0, LLAMA32),
    (16, 10000.0, SMALL),
    (16, 10000.0, THREE_BANDS),
    (64, 10000.0, {"rope_type": "linear", "factor": 2.5}),
]:
    params = {"rope_type": "default", "rope_theta": theta}
    if scaling:
        params = {**scaling, "rope_theta": theta}
    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                      rope_parameters=params, max_position_embeddings=32768)
    rope = LlamaRotaryEmbedding(cfg)
    assert rope.attention_scaling == 1.0
    pos = torch.tensor([POSITIONS])
    x = torch.zeros(1, 1, len(POSITIONS), head_dim, dtype=torch.float32)
    cos, sin = rope(x, pos)
    half = head_dim // 2
    case = {
        "head_dim": head_dim,
        "theta": theta,
        "positions": POSITIONS,
        # rotate-half layout: the two halves are equal; keep the first.
        "cos": cos[0, :, :half].tolist(),
        "sin": sin[0, :, :half].tolist(),
        "inv_freq": rope.inv_freq.tolist(),
    }
    if scaling:
        case["rope_scaling"] = scaling
    cases.append(case)
print(json.dumps({"made_by": ".venv/bin/python tools/rope_golden.py > tests/golden/rope.json",
                  "transformers": __import__("transformers").__version__,
                  "torch": torch.__version__, "cases": cases}))
