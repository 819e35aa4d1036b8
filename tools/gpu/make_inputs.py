#!/usr/bin/env python3
"""Inputs for the one GPU session: two randomly initialised, real-shaped bf16 checkpoints and
64 fixed 32-token prompts.

    python3 tools/gpu/make_inputs.py --out DIR [--only smollm2,qwen05b] [--device cuda|cpu]
                                     [--seed 1234] [--init-device cpu] [--no-verify] [--smol DIR]

--device: where the check forward runs (default cuda when there is one).

Writes
  DIR/smollm2-shaped/   LlamaForCausalLM, exactly models/smollm2-135m-instruct/config.json
                        (576 hidden, 30 layers, 9/3 heads, vocab 49152, tied), random weights
  DIR/qwen05b-shaped/   Qwen2ForCausalLM with the Qwen2.5-0.5B config (896 hidden, 4864 MLP,
                        24 layers, 14/2 heads, head_dim 64, vocab 151936, tied, q/k/v bias),
                        random weights, bos/eos/pad = the SmolLM2 tokenizer's (1/2/2)
  DIR/prompts.json      {"tokenizer", "prompts": [[32 ids] x 64], "texts": [...]}
  DIR/inputs-meta.json  what was made, seed, timings, sha256 of each safetensors file

Each model dir holds model.safetensors (bf16, HF tensor names as save_pretrained writes them;
the tied lm_head is not stored), config.json ("torch_dtype"/"dtype": "bfloat16"), and
tokenizer.json + tokenizer_config.json copied from models/smollm2-135m-instruct/.

Weights: deterministic: drawn on the CPU by default (--init-device), so the same bytes on every
machine (inputs-meta.json records each file's sha256); every tensor has its own generator
seeded with seed + its index in name order; matrices N(0, 0.02), norm weights 1 + 0.02 N(0, 1), biases
0.02 N(0, 1). The state dict is built directly with torch (no module init). Verification (unless
--no-verify): the key set equals both what gram's src/model/weights.rs reads and what
transformers' model expects (no missing / unexpected keys), AutoModelForCausalLM.from_pretrained
loads it, the embedding matches the file bit for bit, and one forward pass on 8 tokens is finite.
Needs only torch, transformers, safetensors, tokenizers, numpy.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
SMOL = REPO / "models" / "smollm2-135m-instruct"  # --smol overrides
WANDS = REPO / "tools" / "queries" / "wands.txt"
T0 = time.perf_counter()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def smollm2_config():
    cfg = json.loads((SMOL / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    cfg["dtype"] = "bfloat16"  # transformers 5 spelling; both are read
    return cfg


def qwen05b_config():
    # Qwen/Qwen2.5-0.5B config.json, with the SmolLM2 tokenizer's special ids.
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 151936,
    }


MODELS = {"smollm2": ("smollm2-shaped", smollm2_config),
          "qwen05b": ("qwen05b-shaped", qwen05b_config)}


def gram_tensor_shapes(cfg):
    """Name -> shape of every tensor gram's src/model/weights.rs reads (Llama / Qwen2 rules of
    src/config.rs: Qwen2 always has q/k/v bias, Llama only with attention_bias)."""
    arch = cfg["architectures"][0]
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // nh
    q, kv = nh * hd, nkv * hd
    qkv_bias = arch == "Qwen2ForCausalLM" or cfg.get("attention_bias", False)
    o_bias = arch != "Qwen2ForCausalLM" and cfg.get("attention_bias", False)
    mlp_bias = cfg.get("mlp_bias", False)
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        for name, (n, k, bias) in {"self_attn.q_proj": (q, h, qkv_bias),
                                   "self_attn.k_proj": (kv, h, qkv_bias),
                                   "self_attn.v_proj": (kv, h, qkv_bias),
                                   "self_attn.o_proj": (h, q, o_bias),
                                   "mlp.gate_proj": (i, h, mlp_bias),
                                   "mlp.up_proj": (i, h, mlp_bias),
                                   "mlp.down_proj": (h, i, mlp_bias)}.items():
            out[f"{p}.{name}.weight"] = (n, k)
            if bias:
                out[f"{p}.{name}.bias"] = (n,)
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (v, h)
    return out


def random_state(shapes, seed, device):
    sd = {}
    for idx, name in enumerate(sorted(shapes)):
        shape = shapes[name]
        g = torch.Generator(device=device)
        g.manual_seed(seed + idx)
        x = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        if name.endswith("norm.weight"):
            x = 1.0 + 0.02 * x
        else:  # matrices N(0, 0.02); biases 0.02 N(0, 1)
            x = 0.02 * x
        sd[name] = x.to(torch.bfloat16).cpu().contiguous()
        del x
    return sd


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 24)
            if not b:
                return h.hexdigest()
            h.update(b)


def verify(d, shapes, device):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    stored = load_file(str(d / "model.safetensors"))
    assert set(stored) == set(shapes), "key set differs from gram's expected set"
    for k, t in stored.items():
        assert tuple(t.shape) == tuple(shapes[k]) and t.dtype == torch.bfloat16, k
    model, info = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.bfloat16, attn_implementation="sdpa", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                         "mismatched_keys", "error_msgs")}
    assert not bad, f"transformers loading info: {bad}"
    hf_keys = set(model.state_dict())
    tied = model.config.tie_word_embeddings
    want = set(shapes) | ({"lm_head.weight"} if tied else set())
    extra = {k for k in hf_keys - want if not k.endswith("rotary_emb.inv_freq")}
    assert not extra and not (want - hf_keys), (sorted(extra)[:5], sorted(want - hf_keys)[:5])
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb, stored["model.embed_tokens.weight"]), "embedding not loaded as stored"
    if tied:
        assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr(), "lm_head not tied"
    model.to(device).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 216, 2]], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.shape[-1] == shapes["model.embed_tokens.weight"][0]
    assert torch.isfinite(logits).all(), "non-finite logits"
    lf = logits.float()
    log(f"  verified: {len(stored)} tensors = gram's set, HF loads with no missing/unexpected "
        f"keys, forward finite (logits std {lf.std().item():.3f}, |max| {lf.abs().max().item():.3f})")
    del model


def make_model(out, key, seed, device, init_device, do_verify):
    name, cfg_fn = MODELS[key]
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    cfg = cfg_fn()
    shapes = gram_tensor_shapes(cfg)
    n_params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    log(f"{name}: {len(shapes)} tensors, {n_params / 1e6:.1f} M params, random init on "
        f"{init_device}")
    t = time.perf_counter()
    sd = random_state(shapes, seed, init_device)
    t_init = time.perf_counter() - t
    t = time.perf_counter()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    del sd
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(SMOL / f, d / f)
    t_save = time.perf_counter() - t
    size = (d / "model.safetensors").stat().st_size
    log(f"  init {t_init:.1f}s, saved {size / 1e6:.0f} MB in {t_save:.1f}s -> {d}")
    if do_verify:
        verify(d, shapes, device)
    return {"dir": name, "architecture": cfg["architectures"][0], "params": n_params,
            "tensors": len(shapes), "bytes": size, "init_s": round(t_init, 2),
            "sha256": sha256(d / "model.safetensors")}


def make_prompts(out, n=64, length=32):
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(SMOL)
    queries = [l.strip() for l in WANDS.read_text(encoding="utf-8").splitlines()
               if l.strip() and not l.startswith("#")]
    prompts, texts, used, qi, skipped = [], [], [], 0, 0
    while len(prompts) < n:
        start, parts = qi, []
        while True:
            parts.append(queries[qi % len(queries)])
            qi += 1
            ids = tok(" ; ".join(parts), add_special_tokens=False)["input_ids"]
            if len(ids) >= length:
                break
        ids = ids[:length]
        text = tok.decode(ids)
        # keep only prompts whose text re-tokenizes to the same ids, so that a text-only
        # interface sees exactly the same tokens
        if tok(text, add_special_tokens=False)["input_ids"] != ids:
            skipped += 1
            qi = start + 1
            continue
        prompts.append(ids)
        texts.append(text)
        used.append([start % len(queries), qi - start])
    doc = {"tokenizer": "models/smollm2-135m-instruct/tokenizer.json (SmolLM2, no special tokens)",
           "made_by": "tools/gpu/make_inputs.py from tools/queries/wands.txt: consecutive queries "
                      "joined with ' ; ' until >= 32 tokens, cut to 32; the decoded text of each "
                      "re-tokenizes to exactly its ids",
           "n": n, "length": length, "prompts": prompts, "texts": texts,
           "wands_queries": used}
    (out / "prompts.json").write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"prompts.json: {n} prompts x {length} tokens from WANDS queries "
        f"{used[0][0]}..{(used[-1][0] + used[-1][1]) % len(queries)} ({skipped} starts skipped "
        f"for not round-tripping)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--only", default="smollm2,qwen05b", help="comma list of smollm2,qwen05b "
                                                                "(empty: prompts only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--init-device", default="cpu",
                    help="where the random weights are drawn (default cpu: the same bytes on "
                         "every machine; cuda is faster but its RNG stream depends on the GPU)")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--smol", type=Path, help="dir with SmolLM2's config.json, tokenizer.json, "
                                              "tokenizer_config.json (default "
                                              "models/smollm2-135m-instruct)")
    args = ap.parse_args()
    global SMOL
    if args.smol:
        SMOL = args.smol
    keys = [k for k in args.only.split(",") if k]
    for k in keys:
        if k not in MODELS:
            ap.error(f"--only: unknown model {k!r} (known: {', '.join(MODELS)})")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if not (SMOL / f).exists():
            sys.exit(f"missing {SMOL / f}")
    torch.set_num_threads(max(1, min(16, os.cpu_count() or 1)))
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"torch {torch.__version__}, init on {args.init_device}, verify on {args.device}, "
        f"seed {args.seed}, out {args.out}")
    make_prompts(args.out)
    meta_path = args.out / "inputs-meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.update({"seed": args.seed, "init_device": args.init_device, "torch": torch.__version__})
    meta.setdefault("models", {})
    for k in keys:
        meta["models"][k] = make_model(args.out, k, args.seed, args.device, args.init_device,
                                       not args.no_verify)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    meta["total_s"] = round(time.perf_counter() - T0, 1)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    log(f"done in {meta['total_s']}s")


if __name__ == "__main__":
    main()
