#!/usr/bin/env python3
"""Golden outputs (and timings) of HF transformers' trie-constrained beam search.

    .venv/bin/python tools/beam_oracle.py --model DIR --codes FILE --out FILE.json \\
        [--beam B] [--max-new-tokens M] [--length-penalty LP] --prompt P [--prompt P ...] \\
        [--case B,M,LP,PROMPT ...]
    .venv/bin/python tools/beam_oracle.py --model DIR --codes FILE --time R [--threads T] ...

Per prompt (batch 1, float32, CPU) it runs

    model.generate(input_ids, num_beams=B, num_return_sequences=B, do_sample=False,
                   length_penalty=LP, max_new_tokens=M, early_stopping=False,
                   prefix_allowed_tokens_fn=fn, eos_token_id=EOS, pad_token_id=PAD,
                   output_scores=True, return_dict_in_generate=True)

with EOS = config.json's eos_token_id (the first one if a list) and `fn` walking a trie of
`tokenizer(code, add_special_tokens=False)["input_ids"] + [EOS]` for every line of FILE:
allowed = the node's children, plus EOS where a code ends there. A beam whose generated part
already holds EOS, or has left the trie, gets [EOS] (transformers 5 raises ValueError on an
empty list). Prompts are `tokenizer(prompt)["input_ids"]` (the post-processor adds BOS where
the model's tokenizer does).

From HF's B returned sequences it keeps those that end with EOS, whose tokens before EOS are
exactly one code, and whose `sequences_scores` is a real hypothesis score, not HF's -1e9-based
junk padding (see tools/FIXTURES.md, "Beam search golden outputs"). For each kept sequence:
`code` (the line of FILE), `score` (= sequences_scores) and `token_logprobs` (one per generated
token, EOS included: `compute_transition_scores(sequences, scores, beam_indices,
normalize_logits=False)`, i.e. the full-vocabulary log_softmax of each step, since transformers'
beam search applies logits processors to log-probs). Asserted per code:
|sum(token_logprobs) / len**LP - score| <= 1e-4 (relative, floor 1) and token_logprobs == the
log_softmax of a no-cache full forward pass over prompt + code + EOS, to 1e-4.

Output: {"model", "codes_file", "n_codes", "eos", "made_by", "versions", "cases": [{"prompt",
"prompt_tokens", "beam", "max_new_tokens", "length_penalty", "hf_mode" (beam | greedy: HF runs
num_beams=1 as greedy search, which has no sequences_scores; score = sum / len**LP there),
"hf_returned", "hf_junk" (dropped padding), "hf_not_eos" (dropped sequences HF returned without
EOS because they hit max_new_tokens), "min_score_gap" (smallest gap between consecutive kept
scores), "codes": [{"code", "score", "token_logprobs"}, ...]}]}, codes best first (HF order).
Floats are float32 values written as the shortest decimal that round-trips.

--time R: no golden file; per prompt one warm-up generate (output_scores off), then R timed
generates; prints {"median_s", "p99_s", ...} per query as JSON on stdout.
"""
import argparse
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

REPO = Path(__file__).resolve().parent.parent
NUM_ARRAY = re.compile(r"\[\s+(-?[0-9][0-9.eE+-]*(?:,\s+-?[0-9][0-9.eE+-]*)*)\s+\]")


def rel(p: Path) -> str:
    p = p.resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


class Trie:
    END = -1

    def __init__(self, seqs, eos):
        self.root = {}
        self.eos = eos
        self.by_tokens = {}
        for i, s in enumerate(seqs):
            t = tuple(s)
            if not t:
                raise SystemExit(f"code #{i} tokenizes to nothing")
            if eos in t:
                raise SystemExit(f"code #{i} contains the EOS token {eos}")
            if t in self.by_tokens:
                raise SystemExit(f"codes #{self.by_tokens[t]} and #{i} have the same tokens")
            self.by_tokens[t] = i
            node = self.root
            for tok in t:
                node = node.setdefault(tok, {})
            node[self.END] = True

    def allowed(self, gen):
        node = self.root
        for tok in gen:
            if tok == self.eos:
                return [self.eos]  # finished hypothesis that HF keeps running (junk)
            node = node.get(tok)
            if node is None:
                return [self.eos]  # left the trie (cannot happen for real beams)
        out = [t for t in node if t != self.END]
        if self.END in node:
            out.append(self.eos)
        return out


def load(model_dir: Path, tokenizer_dir, gguf, attn):
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir or model_dir)
    kw = {}
    if gguf is None:
        ggufs = sorted(model_dir.glob("*.gguf"))
        has_st = any(model_dir.glob("*.safetensors"))
        if ggufs and not has_st:
            gguf = ggufs[0].name
    if gguf:
        kw["gguf_file"] = gguf
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=attn, **kw)
    model.eval()
    assert next(model.parameters()).dtype == torch.float32
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    eos = cfg.get("eos_token_id", model.config.eos_token_id)
    if isinstance(eos, list):
        eos = eos[0]
    pad = cfg.get("pad_token_id", model.config.pad_token_id)
    if pad is None:
        pad = eos
    return tok, model, int(eos), int(pad), gguf


@torch.no_grad()
def run_generate(model, ids, trie, beam, max_new, lp, eos, pad, scores=True):
    x = torch.tensor([ids], dtype=torch.long)
    plen = len(ids)

    def fn(batch_id, input_ids):
        return trie.allowed(input_ids[plen:].tolist())

    return model.generate(
        input_ids=x, attention_mask=torch.ones_like(x), num_beams=beam,
        num_return_sequences=beam, do_sample=False, length_penalty=lp, max_new_tokens=max_new,
        prefix_allowed_tokens_fn=fn, eos_token_id=eos, pad_token_id=pad, early_stopping=False,
        output_scores=scores, output_logits=scores and beam == 1,
        return_dict_in_generate=scores)


@torch.no_grad()
def full_forward_logprobs(model, ids, gen):
    x = torch.tensor([ids + gen], dtype=torch.long)
    lp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0].float(), dim=-1)
    plen = len(ids)
    return [float(lp[plen - 1 + j, t]) for j, t in enumerate(gen)]


def golden_case(model, tok, trie, codes, prompt, beam, max_new, lp, eos, pad):
    ids = tok(prompt)["input_ids"]
    plen = len(ids)
    t0 = time.perf_counter()
    out = run_generate(model, ids, trie, beam, max_new, lp, eos, pad)
    dt = time.perf_counter() - t0
    if beam > 1:
        trans = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices,
                                                normalize_logits=False)
        seq_scores = out.sequences_scores
    else:
        # num_beams=1 is greedy search: no sequences_scores, and `scores` are the masked raw
        # logits (not log-probs), so take the full-vocabulary log_softmax of the raw logits.
        trans = torch.stack([torch.log_softmax(l.float(), dim=-1) for l in out.logits], 1)
        trans = trans.gather(2, out.sequences[:, plen:, None]).squeeze(2)
        seq_scores = None
    # HF's padding hypotheses descend from the beams it starts at -1e9 (or from finished ones it
    # pushed back with -1e9): their scores are about -1e9 / len**LP, len <= max_new.
    junk_below = -0.5e9 / max(1.0, float(max_new) ** lp)
    assert junk_below < -1e4, "length_penalty too large to tell HF's junk from real scores"
    kept, junk, not_eos = [], 0, 0
    for i in range(out.sequences.shape[0]):
        gen = out.sequences[i, plen:].tolist()
        if eos not in gen:
            not_eos += 1  # stopped by max length without EOS
            continue
        k = gen.index(eos)
        if seq_scores is not None:
            score = float(seq_scores[i])
        else:
            # greedy: no HF score; sum / len**LP, rounded to float32 like HF's
            score = float(torch.tensor(sum(float(v) for v in trans[i, :k + 1]) / (k + 1) ** lp,
                                       dtype=torch.float32))
        code_i = trie.by_tokens.get(tuple(gen[:k]))
        if not math.isfinite(score) or score <= junk_below or code_i is None:
            junk += 1
            continue
        lps = [float(v) for v in trans[i, :k + 1]]
        assert all(math.isfinite(v) for v in lps), (prompt, gen, lps)
        expect = sum(lps) / (k + 1) ** lp
        assert abs(expect - score) <= 1e-4 * max(1.0, abs(score)), (prompt, gen, expect, score)
        kept.append({"code": codes[code_i], "score": score, "token_logprobs": lps,
                     "_tokens": gen[:k + 1]})
    assert len({c["code"] for c in kept}) == len(kept), "duplicate code in HF output"
    assert all(a["score"] >= b["score"] for a, b in zip(kept, kept[1:])), "not best first"
    for c in kept:  # full-vocabulary log-probs: check against a plain forward pass
        ref = full_forward_logprobs(model, ids, c.pop("_tokens"))
        for a, b in zip(ref, c["token_logprobs"]):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (prompt, ref, c)
    case = {"prompt": prompt, "prompt_tokens": ids, "beam": beam, "max_new_tokens": max_new,
            "length_penalty": lp, "hf_mode": "beam" if beam > 1 else "greedy",
            "hf_returned": int(out.sequences.shape[0]), "hf_junk": junk,
            "hf_not_eos": not_eos,
            "min_score_gap": min((a["score"] - b["score"] for a, b in zip(kept, kept[1:])),
                                 default=None),
            "codes": kept}
    return case, dt


def parse_case(s, ap):
    try:
        b, m, lp, prompt = s.split(",", 3)
        return int(b), int(m), float(lp), prompt
    except ValueError:
        ap.error(f"--case wants B,M,LP,PROMPT, got {s!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model dir (safetensors or one *.gguf)")
    ap.add_argument("--tokenizer", help="tokenizer dir (default: --model)")
    ap.add_argument("--gguf", help="GGUF file name inside --model (default: the only *.gguf, "
                                   "when there are no safetensors)")
    ap.add_argument("--codes", required=True, help="one code per line")
    ap.add_argument("--prompt", action="append", default=[], help="uses --beam/--max-new-tokens/"
                                                                  "--length-penalty")
    ap.add_argument("--case", action="append", default=[], metavar="B,M,LP,PROMPT",
                    help="a prompt with its own beam, max_new_tokens, length_penalty")
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--length-penalty", type=float, default=1.0)
    ap.add_argument("--out", help="golden JSON to write")
    ap.add_argument("--time", type=int, metavar="R", help="timing mode: R timed runs per prompt")
    ap.add_argument("--threads", type=int, help="torch threads (default 1; 2 with --time)")
    ap.add_argument("--attn", default="eager", help="attn_implementation (eager|sdpa)")
    args = ap.parse_args()

    cases = [(args.beam, args.max_new_tokens, args.length_penalty, p) for p in args.prompt]
    cases += [parse_case(s, ap) for s in args.case]
    if not cases:
        ap.error("no --prompt / --case")
    if args.time is None and not args.out:
        ap.error("--out (golden mode) or --time R")
    threads = args.threads or (2 if args.time else 1)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    model_dir = Path(args.model)
    t0 = time.perf_counter()
    tok, model, eos, pad, gguf = load(model_dir, args.tokenizer, args.gguf, args.attn)
    t_load = time.perf_counter() - t0
    codes_path = Path(args.codes)
    codes = codes_path.read_text(encoding="utf-8").split("\n")
    if codes and codes[-1] == "":
        codes.pop()
    assert all(codes), "empty line in the code file"
    assert len(set(codes)) == len(codes), "duplicate line in the code file"
    t0 = time.perf_counter()
    seqs = tok(codes, add_special_tokens=False)["input_ids"]
    trie = Trie(seqs, eos)
    t_trie = time.perf_counter() - t0
    longest = max(len(s) for s in seqs) + 1
    for b, m, lp, p in cases:
        if longest > m:
            print(f"warning: the longest code + EOS is {longest} tokens > max_new_tokens {m}",
                  file=sys.stderr)
    print(f"{model_dir.name}: load {t_load:.1f}s; {len(codes)} codes, trie {t_trie:.2f}s, "
          f"longest code + EOS {longest} tokens; eos {eos}; {threads} threads", file=sys.stderr)

    if args.time is not None:
        times = []
        for b, m, lp, p in cases:
            ids = tok(p)["input_ids"]
            run_generate(model, ids, trie, b, m, lp, eos, pad, scores=False)  # warm-up
            for _ in range(args.time):
                t = time.perf_counter()
                run_generate(model, ids, trie, b, m, lp, eos, pad, scores=False)
                times.append(time.perf_counter() - t)
        times.sort()
        p99 = times[min(len(times) - 1, math.ceil(0.99 * len(times)) - 1)]
        print(json.dumps({
            "tool": "hf-transformers", "model": model_dir.name, "codes_file": rel(codes_path),
            "n_codes": len(codes), "threads": threads, "attn": args.attn,
            "cases": [{"beam": b, "max_new_tokens": m, "length_penalty": lp, "prompt": p}
                      for b, m, lp, p in cases],
            "runs": len(times), "median_s": statistics.median(times), "p99_s": p99,
            "mean_s": statistics.fmean(times), "min_s": times[0], "max_s": times[-1],
            "torch": torch.__version__, "transformers": transformers.__version__}))
        return

    out_cases = []
    for b, m, lp, p in cases:
        case, dt = golden_case(model, tok, trie, codes, p, b, m, lp, eos, pad)
        out_cases.append(case)
        print(f"  B={b:<3} M={m} LP={lp:<4} {len(case['prompt_tokens']):3d} prompt tokens "
              f"{p[:40]!r:44} -> {len(case['codes'])} codes (junk {case['hf_junk']}, "
              f"not-EOS {case['hf_not_eos']}) {dt:.2f}s; best "
              f"{case['codes'][0]['code'] if case['codes'] else None!r}", file=sys.stderr)
    made_by = ".venv/bin/python tools/beam_oracle.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    doc = {
        "model": model_dir.name,
        "weights": gguf or "safetensors",
        "codes_file": rel(codes_path),
        "n_codes": len(codes),
        "eos": eos,
        "made_by": made_by,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "compute_dtype": "float32",
        "cases": out_cases,
    }
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    text = NUM_ARRAY.sub(
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)  # number lists on one line
    assert json.loads(text) == doc
    Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
