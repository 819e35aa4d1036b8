#!/usr/bin/env python3
"""Make the tiny random-weight HF checkpoints gram's tests compare against.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/make_tiny_models.py --out models
    HF_HUB_OFFLINE=1 .venv/bin/python tools/make_tiny_models.py --out models --only tiny-llama-bias
    HF_HUB_OFFLINE=1 .venv/bin/python tools/make_tiny_models.py --out models --only tiny-llama-rope

Writes (each directory is recreated from scratch; `--only NAME`, repeatable, makes just those
and leaves the other directories alone):
  models/tiny-llama/       LlamaForCausalLM, float32, one model.safetensors, BOS <|im_start|> added
  models/tiny-llama-bias/  tiny-llama's shape with attention_bias (q/k/v/o) and mlp_bias
                           (gate/up/down) on, own seed; tokenizer files identical to tiny-llama's
  models/tiny-llama-rope/  tiny-llama's shape with Llama 3.1's `llama3` rope scaling, its bands
                           set so that of the head's 8 frequencies the first is interpolated and
                           the other 7 divided (none kept: tests/golden/rope.json has that
                           band), all felt at the goldens' prompt lengths; own seed; tokenizer
                           files identical to tiny-llama's
  models/tiny-qwen2/       Qwen2ForCausalLM, float32, 2 safetensors shards + index, qkv bias, tied
  models/tiny-qwen3/       Qwen3ForCausalLM, bfloat16, head_dim 32 != hidden/heads, q_norm/k_norm

All of them share one byte-level BPE tokenizer (512 tokens) trained here with the `tokenizers`
library on a fixed subset of real product titles (chorus-icecat) and queries (wands). The run
is deterministic: same inputs + same package versions -> byte-identical files (see
tools/FIXTURES.md); a model's files depend only on its own entry and seed, so `--only` writes
the same bytes as a full run.
"""
import argparse
import csv
import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO = Path(__file__).resolve().parent.parent

VOCAB_SIZE = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
N_ICECAT_TITLES = 4000  # first N titles of icecat-products-1.json (file order)

# Fixed seeds, one per model (numpy PCG64 via np.random.default_rng).
SEEDS = {"tiny-llama": 1001, "tiny-qwen2": 1002, "tiny-qwen3": 1003, "tiny-llama-bias": 1004,
         "tiny-llama-rope": 1005}
W_STD = 0.15  # linear / embedding weights ~ N(0, W_STD)
NORM_STD = 0.2  # norm weights ~ 1 + NORM_STD * N(0, 1)
B_STD = 0.1  # biases ~ N(0, B_STD)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- tokenizer
def training_texts(data_dir: Path) -> list[str]:
    texts = []
    with zipfile.ZipFile(data_dir / "chorus-icecat" / "icecat-products-1.json.zip") as z:
        products = json.loads(z.read("1.json"))
    titles = [p["title"] for p in products if p.get("title")][:N_ICECAT_TITLES]
    texts += titles
    with open(data_dir / "wands-queries" / "query.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            texts.append(row["query"])
    return texts


def train_tokenizer(data_dir: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # Same pre-tokenizer as SmolLM2 (GPT-2 regex byte-level, single digits).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(data_dir), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def tokenizer_json(base: Tokenizer, add_bos: bool) -> str:
    tok = Tokenizer.from_str(base.to_str())
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A",
            pair="<|im_start|> $A <|im_start|>:1 $B:1",
            special_tokens=[("<|im_start|>", 1)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str(pretty=True) + "\n"


def tokenizer_config(add_bos: bool) -> dict:
    cfg = {
        # PreTrainedTokenizerFast (= TokenizersBackend in transformers 5) uses tokenizer.json as-is;
        # transformers 5's AutoTokenizer overrides the class for model type qwen2 (Qwen2Tokenizer,
        # with NFC), so the tools load tokenizers as PreTrainedTokenizerFast (tools/hf_oracle.py).
        # A named class such as GPT2Tokenizer/Qwen2Tokenizer makes transformers 5 rebuild the
        # pipeline from vocab+merges with that class's own pre-tokenizer (Digits would be dropped).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>" if add_bos else None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
        "chat_template": CHAT_TEMPLATE,
    }
    if add_bos:
        cfg["add_bos_token"] = True
        cfg["add_eos_token"] = False
    return cfg


NOTICE = """# {name}: random-weight test fixture for gram

Made by `HF_HUB_OFFLINE=1 .venv/bin/python tools/make_tiny_models.py --out models` (see
tools/FIXTURES.md): random weights (numpy seed {seed}), not a trained model.

Tokenizer (tokenizer.json): byte-level BPE, 512 tokens, trained on 4,000 product titles from
Open Icecat and 480 queries from WANDS. Product data (c) Icecat N.V. (Open Icecat), provided
"AS IS" under the Icecat Open Content License, via the Chorus project (querqy/chorus,
Apache-2.0); WANDS queries (Wayfair ANnotation DataSet, "Copyright (c) 2021 ecir2022"), MIT license.
"""


# ----------------------------------------------------------------------------- models
def randomize_(model: torch.nn.Module, seed: int, bf16: bool) -> None:
    rng = np.random.default_rng(seed)
    params = dict(model.named_parameters())  # tied lm_head appears once (as embed_tokens)
    for name in sorted(params):
        p = params[name]
        shape = tuple(p.shape)
        if name.endswith("norm.weight"):
            v = 1.0 + NORM_STD * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            v = B_STD * rng.standard_normal(shape)
        elif name.endswith(".weight"):
            v = W_STD * rng.standard_normal(shape)
        else:
            raise ValueError(f"unexpected parameter {name}")
        t = torch.from_numpy(v.astype(np.float32))
        if bf16:
            t = t.to(torch.bfloat16)
        with torch.no_grad():
            p.data = t.to(p.dtype) if not bf16 else t


def build_models():
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        eos_token_id=2,
        pad_token_id=0,
    )
    out = {}
    cfg = LlamaConfig(**common, intermediate_size=160, rope_theta=10000.0,
                      tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                      bos_token_id=1)
    out["tiny-llama"] = (LlamaForCausalLM, cfg, False, True)
    # tiny-llama with every Llama bias: q/k/v/o (attention_bias) and gate/up/down (mlp_bias).
    cfg = LlamaConfig(**common, intermediate_size=160, rope_theta=10000.0,
                      tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                      bos_token_id=1)
    out["tiny-llama-bias"] = (LlamaForCausalLM, cfg, False, True)
    # tiny-llama with `llama3` rope scaling (Llama 3.1+). Head dim 16 at base 1e4: wavelengths
    # 6.3, 19.9, 62.8, ... against bands at 16 / 1 and 16 / 4 positions: the first frequency is
    # interpolated, the others divided by 4; prompts of 2-40 tokens see both.
    cfg = LlamaConfig(**common, intermediate_size=160,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                       "factor": 4.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16},
                      tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                      bos_token_id=1)
    out["tiny-llama-rope"] = (LlamaForCausalLM, cfg, False, True)
    # Like real Qwen2/Qwen3 configs: bos_token_id names <|endoftext|>, but the tokenizer adds none.
    cfg = Qwen2Config(**common, intermediate_size=128, rope_theta=1000000.0,
                      tie_word_embeddings=True, use_sliding_window=False, bos_token_id=0)
    out["tiny-qwen2"] = (Qwen2ForCausalLM, cfg, False, False)
    cfg = Qwen3Config(**common, intermediate_size=128, head_dim=32, rope_theta=1000000.0,
                      tie_word_embeddings=False, use_sliding_window=False,
                      attention_bias=False, bos_token_id=0)
    out["tiny-qwen3"] = (Qwen3ForCausalLM, cfg, True, False)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "models"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--only", action="append", choices=sorted(SEEDS), metavar="NAME",
                    help="make only this model (repeatable); other directories are not touched")
    args = ap.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)  # not used for the weights (numpy draws them); keeps init quiet/stable

    base = train_tokenizer(Path(args.data))

    models = build_models()
    if args.only:
        models = {k: v for k, v in models.items() if k in args.only}
    for name, (cls, cfg, bf16, add_bos) in models.items():
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        model = cls(cfg).eval()
        randomize_(model, SEEDS[name], bf16)
        if bf16:
            model = model.to(torch.bfloat16)
            model.config.dtype = torch.bfloat16
        else:
            model.config.dtype = torch.float32
        kw = {"max_shard_size": "250KB"} if name == "tiny-qwen2" else {"max_shard_size": "1GB"}
        model.save_pretrained(d, **kw)
        (d / "tokenizer.json").write_text(tokenizer_json(base, add_bos), encoding="utf-8")
        (d / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config(add_bos), indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8")
        (d / "README.md").write_text(NOTICE.format(name=name, seed=SEEDS[name]), encoding="utf-8")
        print(f"{name}: {sorted(p.name for p in d.iterdir())}")

    verify(out, {name: spec[3] for name, spec in models.items()})


def verify(out: Path, made: dict):
    """Load every checkpoint made (name -> add_bos) back through the Auto* classes (offline) and
    check key facts."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from safetensors import safe_open

    for name, add_bos in made.items():
        d = out / name
        tok = PreTrainedTokenizerFast.from_pretrained(d)
        ids = tok("hello world")["input_ids"]
        assert (ids[0] == 1) == add_bos, (name, ids)
        assert tok.eos_token_id == 2, name
        raw = Tokenizer.from_file(str(d / "tokenizer.json"))
        for s in ["hello world", "RTX 4090 24GB", "café 4K – 27\"", "<|im_start|>user\nhi<|im_end|>", ""]:
            assert tok(s)["input_ids"] == raw.encode(s).ids, (name, s)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        n = sum(p.numel() for p in model.parameters())
        files = sorted(p.name for p in d.glob("*.safetensors"))
        dtypes = set()
        names = set()
        for f in files:
            with safe_open(d / f, "pt") as sf:
                for k in sf.keys():
                    names.add(k)
                    dtypes.add(str(sf.get_slice(k).get_dtype()))
        for k, v in model.state_dict().items():
            if "norm" in k or "bias" in k or "weight" in k:
                assert not torch.all(v == 0) and not torch.all(v == 1), k
        if name == "tiny-llama-bias":
            # Every Llama bias is stored (and read back by transformers, non-zero: above), and
            # the tokenizer files are tiny-llama's, byte for byte.
            for layer in range(model.config.num_hidden_layers):
                for proj in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
                    assert f"model.layers.{layer}.{proj}.bias" in names, (name, layer, proj)
            if (out / "tiny-llama").is_dir():
                for f in ["tokenizer.json", "tokenizer_config.json"]:
                    assert (d / f).read_bytes() == (out / "tiny-llama" / f).read_bytes(), f
        if name == "tiny-llama-rope":
            saved = json.loads((d / "config.json").read_text())
            rope = saved.get("rope_parameters") or saved.get("rope_scaling")
            assert rope["rope_type"] == "llama3" and rope["factor"] == 4.0, saved
            if (out / "tiny-llama").is_dir():
                for f in ["tokenizer.json", "tokenizer_config.json"]:
                    assert (d / f).read_bytes() == (out / "tiny-llama" / f).read_bytes(), f
        print(f"verify {name}: params={n} files={files} dtypes={sorted(dtypes)} "
              f"lm_head_stored={'lm_head.weight' in names} bos_added={add_bos} ids={ids}")


if __name__ == "__main__":
    sys.exit(main())
