"""Stage 3: joint SFT — one decoder learns query→code and product→code, each with its own prompt
template, the loss on the code tokens and their EOS only. Weights are f32; the forward runs under bf16
autocast (about 1.6x faster matmuls on this CPU), evaluations in f32.

    python -m tools.train.sft [--work WORK] [--config default|ci] [--minutes M] [--seed S]
                              [--no-query | --no-product]

Reads WORK/pairs-train.jsonl, pairs-valid.jsonl, cold.jsonl (stage 2). Writes

    WORK/tokenizer/tokenizer.json  byte-level BPE trained on the catalog titles, codes and
                                   training queries (NFKC + lower-case normalizer); one
                                   already there is reused unless those files are newer
    WORK/sft/                      the HF checkpoint (LlamaForCausalLM, f32)
    WORK/train-log.jsonl           one JSON line per logged step / evaluation

The model is a small Llama from scratch (config below). Each product is one packed row: its
title prompt, then all its codes (common.py), so the title is encoded once for ~6 codes; each
training query is a row with all its target codes. An epoch is every product row and every query
row, shuffled; the learning rate warms up then follows a cosine to a tenth over the training's
progress, the larger of (steps done / planned steps) and (time in the training loop / `--minutes`):
on this shared machine the speed varies several-fold, so the schedule ends when the time budget
does. A run is deterministic (seeds fixed) only while the steps lead all the way: the log's
closing events say which ended it (`planned steps done` or `time budget used`) and for how
many steps the time was ahead and set the learning rate (`time_led_steps`: 0 for a run that
depends on the seeds alone; a run can end on its planned steps after time led for a while). `--no-query` / `--no-product` drop one side
(the "without co-training" ablation).
"""
import argparse
import collections
import json
import random
import time
from pathlib import Path

import torch

from tools.train import codes as C
from tools.train import common as K
from tools.train.pairs import read_jsonl

CONFIGS = {
    # ~2.4M parameters (9.5 MB in f32): 16 epochs in 33 minutes on the 2-vCPU Zen 5 box (where
    # they take longer than `--minutes`, the time budget ends the cosine schedule first). 3
    # epochs until the thirteenth session, 8 until the twenty-second: the validation loss per
    # code token went 0.697 (3) -> 0.582 (8) -> 0.614 (16; lowest 0.598 at ~11.6 epochs), but the
    # 16-epoch model retrieves better on the synthetic validation queries it was chosen on
    # (docs/TRAINING.md, "The default model").
    "default": dict(vocab=4096, hidden=192, layers=4, heads=3, kv_heads=1, inter=512,
                    epochs=16, lr=3e-3, batch_tokens=6144, warmup=100, eval_every=200),
    # the CI check: a few hundred products, about a minute
    "ci": dict(vocab=768, hidden=64, layers=2, heads=4, kv_heads=2, inter=160,
               epochs=6, lr=4e-3, batch_tokens=3072, warmup=20, eval_every=50),
}


def train_tokenizer(work, vocab):
    """Byte-level BPE (no unknown token: any query tokenizes) on titles, codes and training
    queries, with the prompt templates' text; special tokens <pad> 0, <s> 1, </s> 2. The
    cold-start products' titles are left out (their codes stay: codes are shared vocabulary), so
    nothing of them shapes the model before the cold-start check."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    work = Path(work)
    items = C.read_catalog(work / "catalog.jsonl")
    cold = {r["id"] for r in read_jsonl(work / "cold.jsonl") if r["kind"] == "product"}
    texts = [K.product_prompt(it["title"]) for it in items if it["id"] not in cold]
    texts += [c for it in items for c in it["codes"]]
    texts += [K.query_prompt(r["query"]) for r in read_jsonl(work / "queries-train.jsonl")]
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tk.train_from_iterator(texts, trainer)
    out = work / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out))
    return out / "tokenizer.json"


# What train_tokenizer reads.
TOKENIZER_INPUTS = ("catalog.jsonl", "cold.jsonl", "queries-train.jsonl")


def tokenizer_stale(work):
    """The files of TOKENIZER_INPUTS written after WORK/tokenizer was (stages 1-2 ran again since
    it was trained: it is of another split, and is trained again); [] when there is none."""
    tok = Path(work) / "tokenizer" / "tokenizer.json"
    if not tok.exists():
        return []
    t = tok.stat().st_mtime
    return [f for f in TOKENIZER_INPUTS
            if (Path(work) / f).exists() and (Path(work) / f).stat().st_mtime > t]


def model_config(cfg, tok):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=cfg["hidden"], intermediate_size=cfg["inter"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"], max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=tok.eos,
        pad_token_id=tok.pad, hidden_act="silu", attention_bias=False, mlp_bias=False)


def group_pairs(pairs, kind, tok):
    """{text: [code ids]} rows for one kind of pair, prompt by template."""
    g = collections.OrderedDict()
    for p in pairs:
        if p["kind"] == kind:
            g.setdefault(p["text"], []).append(p["code"])
    prompt = K.query_prompt if kind == "query" else K.product_prompt
    rows, long = [], 0
    for text, codes in g.items():
        cs = [tok.code(c) for c in codes]
        long += sum(len(c) > K.MAX_CODE_TOKENS for c in cs)
        cs = [c for c in cs if len(c) <= K.MAX_CODE_TOKENS]
        if cs:
            rows.append((tok.prompt(prompt(text)), cs))
    return rows, long


@torch.no_grad()
def evaluate(model, rows, batch_tokens):
    """Mean loss per code token (EOS included) over packed rows."""
    model.eval()
    tot, n = 0.0, 0
    for idx in K.batches(rows, batch_tokens, random.Random(0), shuffle=False):
        b = K.collate([rows[i] for i in idx], 0)
        lp = K.token_logprobs(model, b)
        tot -= lp.sum().item()
        n += lp.numel()
    model.train()
    return tot / max(n, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--config", default="default", choices=sorted(CONFIGS))
    ap.add_argument("--out", default=None, help="checkpoint dir (default WORK/sft)")
    ap.add_argument("--minutes", type=float, default=0, help="stop after this long (0: no limit)")
    ap.add_argument("--epochs", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--f32", action="store_true",
                    help="train in f32 (default: bf16 autocast for the matmuls, f32 weights)")
    side = ap.add_mutually_exclusive_group()
    side.add_argument("--no-query", action="store_true", help="ablation: product pairs only")
    side.add_argument("--no-product", action="store_true", help="ablation: query pairs only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    K.seed_all(args.seed)
    cfg = dict(CONFIGS[args.config])
    if args.epochs:
        cfg["epochs"] = args.epochs
    work = Path(args.work)
    out = Path(args.out) if args.out else work / "sft"
    log = K.Log(work / "train-log.jsonl")

    tok_path = work / "tokenizer" / "tokenizer.json"
    stale = tokenizer_stale(work)
    if stale:
        log(stage="sft", event="tokenizer retrained", newer_than_it=stale)
    if stale or not tok_path.exists():
        train_tokenizer(work, cfg["vocab"])
    tok = K.Tok(tok_path)
    train = read_jsonl(work / "pairs-train.jsonl")
    valid = read_jsonl(work / "pairs-valid.jsonl")
    cold = read_jsonl(work / "cold.jsonl")
    prows, plong = group_pairs(train, "product", tok)
    qrows, qlong = group_pairs(train, "query", tok)
    vrows, _ = group_pairs(valid, "query", tok)
    crows = [(tok.prompt(K.product_prompt(r["title"])),
              [c for c in map(tok.code, r["codes"]) if len(c) <= K.MAX_CODE_TOKENS])
             for r in cold if r["kind"] == "product"]
    crows = [r for r in crows if r[1]]
    rows = K.pack_rows(([] if args.no_product else prows) + ([] if args.no_query else qrows))
    rng = random.Random(args.seed)
    # fixed evaluation subsets (a few hundred rows each)
    evals = {"valid_query": rng.sample(vrows, min(600, len(vrows))),
             "cold_product": rng.sample(crows, min(300, len(crows))),
             "train_product": rng.sample(prows, min(300, len(prows)))}
    if not rows:
        # Nothing to train on (`--no-query --no-product`, or empty pairs): the loop below would
        # never advance.
        raise SystemExit("sft: no training rows (both sides left out, or the pairs are empty)")
    tokens_epoch = sum(len(p) + sum(map(len, cs)) for p, cs in rows)
    steps_epoch = len(K.batches(rows, cfg["batch_tokens"], random.Random(0)))
    # At least one step: a small set or a fraction of an epoch rounded to 0 divided by zero.
    total = max(1, int(steps_epoch * cfg["epochs"]))

    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM(model_config(cfg, tok))
    model.config._attn_implementation = "sdpa"
    nparam = sum(p.numel() for p in model.parameters())
    log(stage="sft", event="start", config=args.config, cfg=cfg, params=nparam,
        product_rows=len(prows), query_rows=len(qrows), rows=len(rows), tokens_per_epoch=tokens_epoch,
        steps_per_epoch=steps_epoch, total_steps=total, codes_over_max_tokens=plong + qlong,
        no_query=args.no_query, no_product=args.no_product, seed=args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-8)
    model.train()
    step, ema = 0, None
    frac = 0.0
    # Steps whose learning rate the time budget set (time ahead of the steps): while any did,
    # the run depends on the machine's speed.
    time_led = 0
    # The time budget counts training only (not the tokenizer, the data, the model's set-up).
    t0 = time.time()
    while frac < 1.0:
        for idx in K.batches(rows, cfg["batch_tokens"], rng):
            # progress: the larger of steps done and time used (with --minutes), so the cosine
            # ends when either the planned epochs or the time budget do
            frac = step / total
            if args.minutes:
                by_time = (time.time() - t0) / (args.minutes * 60 * 0.97)
                time_led += by_time > frac
                frac = max(frac, by_time)
            if frac >= 1.0:
                log(stage="sft", event="time budget used" if step < total else "planned steps done",
                    step=step, time_led_steps=time_led)
                break
            lr = K.lr_at(int(frac * total), total, cfg["lr"], cfg["warmup"])
            for g in opt.param_groups:
                g["lr"] = lr
            b = K.collate([rows[i] for i in idx], tok.pad)
            with K.autocast(not args.f32):
                lp = K.token_logprobs(model, b)
            loss = -lp.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            if step % 50 == 0 or step == 1:
                log(stage="sft", step=step, epoch=round(step / steps_epoch, 3), loss=round(loss.item(), 4),
                    loss_ema=round(ema, 4), lr=lr, seconds=round(time.time() - t0, 1))
            if step % cfg["eval_every"] == 0:
                log(stage="sft", step=step, eval={k: round(evaluate(model, v, cfg["batch_tokens"]), 4)
                                                  for k, v in evals.items()},
                    seconds=round(time.time() - t0, 1))
    final = {k: round(evaluate(model, v, cfg["batch_tokens"]), 4) for k, v in evals.items()}
    out.mkdir(parents=True, exist_ok=True)
    # A gram.json of an earlier run's weights stage (fitted to other weights) does not stay
    # beside these: export refuses a model without one, so the weights stage runs again.
    (out / "gram.json").unlink(missing_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        src = work / "tokenizer" / f
        if src.exists():
            (out / f).write_bytes(src.read_bytes())
    log(stage="sft", event="done", step=step, eval=final, seconds=round(time.time() - t0, 1),
        time_led_steps=time_led, out=str(out))


if __name__ == "__main__":
    main()
