#!/usr/bin/env python3
"""Golden outputs from HF transformers for gram's tests.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/hf_oracle.py --models models --out tests/golden

Needs models/tiny-{llama,llama-bias,llama-rope,qwen2,qwen3} (tools/make_tiny_models.py) and
models/smollm2-135m-instruct/model.gguf (tools/get_smollm2.sh). Writes:
  tests/golden/tiny-llama.json, tiny-llama-bias.json, tiny-llama-rope.json, tiny-qwen2.json,
  tiny-qwen3.json
      per prompt: ids, last-position logits (float32, exact), greedy 12 new tokens + text;
      `--only-tiny NAME` (repeatable) writes just that model's file (no SmolLM2, no
      tokenize.json), the same values as a full run (only `made_by` differs)
  tests/golden/smollm2.json + smollm2_logprobs_<i>.f32
      SmolLM2-135M-Instruct loaded from the Q4_1 GGUF by transformers (dequantized to f32):
      ids, top-20 log-probs, greedy 16 new tokens; the .f32 files hold the full last-position
      log_softmax vector (49152 little-endian float32) of prompt i
  tests/golden/tokenize.json
      tokenizer(text)["input_ids"] for SmolLM2's, each tiny tokenizer and the default model's
      (models/gram-icecat-2m: NFKC + lowercase) on varied texts; `--only-tokenize` writes it
      alone in seconds
Tokenizers load as PreTrainedTokenizerFast: tokenizer.json exactly as written (what the model
was trained with, what transformers 4 and the tokenizers library give, what gram reads).
transformers 5's AutoTokenizer rebuilds some tokenizer classes from their own defaults and
drops parts of tokenizer.json: GPT2Tokenizer (SmolLM2) loses the digit split, so "size  42"
or "a\n\n3" get other ids, and model type qwen2 gets an NFC normalizer and its own split
(huggingface/transformers#45920). Every tool here that tokenizes for a comparison with gram
loads the same way.
Everything is computed in float32 with eager attention on 1 CPU thread; reruns are
byte-identical.
"""
import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

REPO = Path(__file__).resolve().parent.parent
TINY = ["tiny-llama", "tiny-llama-bias", "tiny-llama-rope", "tiny-qwen2", "tiny-qwen3"]
# The tokenizers tokenize.json covers: tiny-llama-bias's and tiny-llama-rope's tokenizer files
# are tiny-llama's.
TINY_TOKENIZERS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]

TINY_PROMPTS = [
    "TV",
    "  wooden coffee table  ",
    "RTX 4090 24GB 2x 1080p @ 144Hz",
    "café 4K – 27\"",
    "HP Pavilion dv7 Notebook Silver 43.2 cm (17\") 1440 x 900 pixels Intel Core 2 Duo "
    "4 GB DDR2 250 GB HDD",
]
TINY_NEW_TOKENS = 12

SMOL_PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is a sofa?<|im_end|>\n<|im_start|>assistant\n",
    "Samsung 55\" Class 4K UHD Smart LED TV, 2023 model, black -",
    "Here is a short description of a product for an online shop. The product is a wooden "
    "coffee table with two drawers, made of solid oak, and it",
]
SMOL_NEW_TOKENS = 16
SMOL_TOPK = 20

TOKENIZE_TEXTS = [
    "hello world",
    "RTX 4090 24GB",
    "café 4K – 27\"",
    "emoji 😀👍🏽 ok 🛋️",
    "日本語のテキスト 和 中文 한국어",
    "  leading and trailing  ",
    "tabs\tand   many    spaces",
    "line1\nline2\n\n  line3\r\n",
    "<|im_start|>user\nhi<|im_end|>",
    "a<|im_end|>b <|im_start|> c<|endoftext|>",
    "",
    "don't stop—it's 3.5\" wide & 2,000mm long; 1/2-price!",
    "Ünïcödé ÀÉÎ ß ﬁ \u00a0nbsp\u200bzwsp",
    "Samsung Galaxy S21 Ultra 5G (128 GB, Phantom Black) $1,199.99",
    # Where transformers 5's AutoTokenizer leaves tokenizer.json (see the module's docs).
    "size  42",
    "line\r\n2",
    "a\n\n3",
    "e\u0301 cafe\u0301 n\u0303",
    "ﬁ ﬀ ① ½ ™ Ⅻ … ٣٤٥",
]


def f32_list(t: torch.Tensor) -> list:
    # float(np.float32) is exact; json writes the shortest repr that round-trips that double.
    return [float(x) for x in t.detach().to(torch.float32).cpu().numpy()]


def load_model(path, **kw):
    m = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **kw)
    m.eval()
    assert next(m.parameters()).dtype == torch.float32
    return m


@torch.no_grad()
def last_logits(model, ids):
    x = torch.tensor([ids], dtype=torch.long)
    return model(input_ids=x, use_cache=False).logits[0, -1].to(torch.float32)


@torch.no_grad()
def greedy(model, tok, ids, n):
    x = torch.tensor([ids], dtype=torch.long)
    out = model.generate(
        input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
    )
    new = out[0, len(ids):].tolist()
    # Margin of the argmax over the runner-up at every greedy step (full recompute, no cache), so
    # that tests know how close to a tie each choice was.
    margins = []
    seq = list(ids)
    for t in new:
        lg = last_logits(model, seq)
        top2 = torch.topk(lg, 2)
        assert int(top2.indices[0]) == t, "generate() disagrees with the full recompute argmax"
        margins.append(float(top2.values[0] - top2.values[1]))
        seq.append(t)
    return new, margins


def dump(path: Path, obj):
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=str(REPO / "models"))
    ap.add_argument("--out", default=str(REPO / "tests" / "golden"))
    ap.add_argument("--smollm2-tokenizer",
                    default=str(REPO.parent / "shared" / "data" / "smollm2-135m-instruct"))
    ap.add_argument("--only-tokenize", action="store_true",
                    help="write tokenize.json alone (no model is run; seconds)")
    ap.add_argument("--only-tiny", action="append", choices=TINY, metavar="NAME",
                    help="write only this tiny model's golden (repeatable); no SmolLM2 and no "
                         "tokenize.json")
    args = ap.parse_args()
    made_by = ".venv/bin/python tools/hf_oracle.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    models_dir, out = Path(args.models), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    t_all = time.perf_counter()

    if args.only_tokenize:
        toks = {name: PreTrainedTokenizerFast.from_pretrained(models_dir / name)
                for name in TINY_TOKENIZERS}
        stok = PreTrainedTokenizerFast.from_pretrained(args.smollm2_tokenizer)
        write_tokenize(out, made_by, versions, stok, toks, models_dir)
        return

    # ------------------------------------------------------------------ tiny models
    toks = {}
    for name in TINY:
        if args.only_tiny and name not in args.only_tiny:
            continue
        t0 = time.perf_counter()
        d = models_dir / name
        tok = PreTrainedTokenizerFast.from_pretrained(d)
        if name in TINY_TOKENIZERS:
            toks[name] = tok
        model = load_model(d)
        cases = []
        for p in TINY_PROMPTS:
            ids = tok(p)["input_ids"]
            logits = last_logits(model, ids)
            g, margins = greedy(model, tok, ids, TINY_NEW_TOKENS)
            cases.append({
                "prompt": p,
                "ids": ids,
                "logits": f32_list(logits),
                "greedy_ids": g,
                "greedy_text": tok.decode(g, skip_special_tokens=True),
                "greedy_min_margin": min(margins) if margins else None,
            })
        cfg = model.config
        dump(out / f"{name}.json", {
            "model": name,
            "made_by": made_by,
            "versions": versions,
            "compute_dtype": "float32",
            "stored_dtype": str(json.load(open(d / "config.json"))["dtype"]),
            "vocab_size": cfg.vocab_size,
            "greedy_max_new_tokens": TINY_NEW_TOKENS,
            "cases": cases,
        })
        print(f"{name}: {time.perf_counter() - t0:.1f}s")
        for c in cases:
            print(f"  {c['prompt']!r:40.40} n_ids={len(c['ids'])} greedy={c['greedy_ids']} "
                  f"{c['greedy_text']!r} min_margin={c['greedy_min_margin']:.4f}")
    if args.only_tiny:
        print(f"oracle total: {time.perf_counter() - t_all:.1f}s")
        return

    # ------------------------------------------------------------------ SmolLM2 (GGUF)
    t0 = time.perf_counter()
    smol_dir = models_dir / "smollm2-135m-instruct"
    stok = PreTrainedTokenizerFast.from_pretrained(args.smollm2_tokenizer)
    model = load_model(smol_dir, gguf_file="model.gguf")
    t_load = time.perf_counter() - t0
    V = model.config.vocab_size
    cases = []
    for i, p in enumerate(SMOL_PROMPTS):
        ids = stok(p)["input_ids"]
        lp = torch.log_softmax(last_logits(model, ids), dim=-1)
        assert lp.shape == (V,)
        (out / f"smollm2_logprobs_{i}.f32").write_bytes(lp.numpy().astype("<f4").tobytes())
        top = torch.topk(lp, SMOL_TOPK)
        g, margins = greedy(model, stok, ids, SMOL_NEW_TOKENS)
        cases.append({
            "prompt": p,
            "ids": ids,
            "top": [{"id": int(j), "logprob": float(v)} for v, j in zip(top.values, top.indices)],
            "logprobs_file": f"smollm2_logprobs_{i}.f32",
            "greedy_ids": g,
            "greedy_text": stok.decode(g, skip_special_tokens=True),
            "greedy_min_margin": min(margins) if margins else None,
        })
    assert cases[0]["greedy_text"].startswith(" Paris"), cases[0]["greedy_text"]
    dump(out / "smollm2.json", {
        "model": "smollm2-135m-instruct",
        "made_by": made_by,
        "versions": versions,
        "weights": "models/smollm2-135m-instruct/model.gguf (Q4_1/Q8_0, sha256 b179c952...), "
                   "dequantized by transformers' GGUF loader",
        "compute_dtype": "float32",
        "vocab_size": V,
        "greedy_max_new_tokens": SMOL_NEW_TOKENS,
        "logprobs_format": f"little-endian float32 x {V}: log_softmax of the last position",
        "cases": cases,
    })
    print(f"smollm2: load {t_load:.1f}s, total {time.perf_counter() - t0:.1f}s")
    for c in cases:
        print(f"  {c['prompt']!r:40.40} n_ids={len(c['ids'])} top1={c['top'][0]} "
              f"greedy={c['greedy_text']!r} min_margin={c['greedy_min_margin']:.4f}")

    write_tokenize(out, made_by, versions, stok, toks, models_dir)
    print(f"oracle total: {time.perf_counter() - t_all:.1f}s")


# Shipped models whose tokenizers are checked beside the fixtures': the default model's
# (trained on the catalog: NFKC and lowercase normalizers, which no fixture has).
TOKENIZE_SHIPPED = ["gram-icecat-2m"]


def write_tokenize(out, made_by, versions, stok, toks, models_dir):
    """tokenize.json: tokenizer(text)["input_ids"] of every tokenizer on TOKENIZE_TEXTS."""
    tcases = []
    shipped = [(n, PreTrainedTokenizerFast.from_pretrained(models_dir / n)) for n in TOKENIZE_SHIPPED]
    for tname, tok in [("smollm2-135m-instruct", stok)] + list(toks.items()) + shipped:
        for text in TOKENIZE_TEXTS:
            tcases.append({"tokenizer": tname, "text": text, "ids": tok(text)["input_ids"]})
    dump(out / "tokenize.json", {"made_by": made_by, "versions": versions, "cases": tcases})
    print(f"tokenize.json: {len(tcases)} cases")


if __name__ == "__main__":
    sys.exit(main())
