#!/usr/bin/env python3
"""The GPU peer: HF transformers' trie-constrained beam search, timed per (beam, batch).

    python3 tools/gpu/hf_peer.py --model DIR/smollm2-shaped --codes models/gram-icecat-2m/codes.txt \\
        --prompts DIR/prompts.json --beam 10 --beam 64 --batch 1 --batch 16 --batch 64 \\
        --max-new-tokens 16 --dtype bf16 --out FILE.jsonl [--budget-s 120] [--dump-codes FILE.json]

Per (beam B, batch N), in the order given (beams outer, batches inner):

    model.generate(input_ids=[N, 32], attention_mask=ones, num_beams=B, num_return_sequences=B,
                   do_sample=False, early_stopping=False, length_penalty=1.0, max_new_tokens=16,
                   prefix_allowed_tokens_fn=trie_fn, eos_token_id=EOS, pad_token_id=PAD)

on --device (cuda by default), --dtype weights and compute, sdpa attention. Prompts come from
prompts.json (all exactly 32 tokens: no padding). The trie is tools/beam_oracle.py's: every code
is `tokenizer(code, add_special_tokens=False)["input_ids"] + [EOS]`; allowed = the node's
children, plus EOS where a code ends; a beam that already holds EOS or left the trie gets [EOS].
1 warm-up batch, then timed batches (prompts taken in turn, wrapping over the 64) until --reps
timed batches or --config-cap-s (at least one timed batch); torch.cuda.synchronize() before and
after each generate. One JSON line per config: latencies_s (per batch), p50/p99/mean, per-query
latency (= the batch's: all queries of a batch return together), QPS = N / latency, peak GPU
memory, codes returned, machine info. Once --budget-s (counted from the start of the script) is
spent no new config starts; each one not run gets a line with "skipped": "budget".

The trie function (the peer's legitimate best effort, still only the public
prefix_allowed_tokens_fn API; --trie-fn fast, the default):
  * precomputed: a dict from every code-token prefix (tuple) to its allowed tokens, and all
    allowed lists as views into ONE index tensor already on the device (one host->device copy
    at start), so HF's `mask[row, allowed] = 0` needs no host->device copy per row;
  * one device->host copy per decoding step instead of one per row: the first call of a step
    copies the whole storage behind the row it is given (HF passes views of one [B*N, len]
    sequence buffer) to the host; the other rows of that step are read from that copy (the step
    is keyed by (storage pointer, sequence length), which changes every step). Checked against
    the row's own .tolist() by a self-test at start (beam 4, 2 prompts; any row read wrong
    falls back to --trie-fn simple; the output is compared with simple's too and the result
    recorded) and in the --dump-codes runs. Rows that are not views are read one by one.
--trie-fn simple: tools/beam_oracle.py's function (row.tolist() and a trie walk per row, Python
lists returned), for comparison.

--dump-codes FILE: for beam --dump-beam (10), batch 1, the first --dump-prompts (4) prompts, with
output_scores: every returned sequence (tokens, HF sequences_scores) and the kept codes like
tools/beam_oracle.py (ending in EOS, exactly a code, not HF's -1e9 junk padding) with their
per-token log-probs from compute_transition_scores(normalize_logits=False) (the full-vocabulary
log_softmax of each step). Needs only torch, transformers, safetensors, tokenizers, numpy.
"""
import argparse
import json
import math
import os
import platform
import statistics
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

T0 = time.perf_counter()
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


class Trie:
    """Allowed next tokens for every generated prefix, as lists and as device index views."""

    def __init__(self, seqs, eos, device):
        self.eos = eos
        self.by_tokens = {}
        allowed = {}
        for i, s in enumerate(seqs):
            t = tuple(s)
            if not t:
                raise SystemExit(f"code #{i} tokenizes to nothing")
            if eos in t:
                raise SystemExit(f"code #{i} contains the EOS token {eos}")
            if t in self.by_tokens:
                raise SystemExit(f"codes #{self.by_tokens[t]} and #{i} have the same tokens")
            self.by_tokens[t] = i
            for j in range(len(t)):
                allowed.setdefault(t[:j], {})[t[j]] = None
            allowed.setdefault(t, {})[eos] = None
        # children first, EOS last (as tools/beam_oracle.py); order does not change the mask
        self.lists = {}
        for p, d in allowed.items():
            kids = [x for x in d if x != eos]
            if eos in d:
                kids.append(eos)
            self.lists[p] = kids
        self.eos_list = [eos]
        flat, spans = [], {}
        for p, l in self.lists.items():
            spans[p] = (len(flat), len(flat) + len(l))
            flat.extend(l)
        flat.extend(self.eos_list)
        big = torch.tensor(flat, dtype=torch.long, device=device)
        self.views = {p: big[a:b] for p, (a, b) in spans.items()}
        self.eos_view = big[len(flat) - 1:]
        self.n_prefixes = len(self.lists)
        self.n_flat = len(flat)

    def allowed(self, gen):
        return self.lists.get(tuple(gen), self.eos_list)

    def allowed_view(self, gen):
        return self.views.get(tuple(gen), self.eos_view)

    def walk(self, gen):
        """tools/beam_oracle.py's rule, spelled out (used by --trie-fn simple)."""
        if self.eos in gen:
            return [self.eos]
        return self.lists.get(tuple(gen), [self.eos])


def make_fn(trie, plen, mode, check=False, stats=None):
    if mode == "simple":
        def simple(batch_id, sent):
            return trie.walk(sent[plen:].tolist())
        return simple

    state = {"key": None, "snap": None}

    def fast(batch_id, sent):
        if sent._base is None:  # not a view of a shared buffer: no step snapshot to reuse
            if stats is not None:
                stats["not_views"] += 1
            return trie.allowed_view(sent[plen:].tolist())
        st = sent.untyped_storage()
        n = sent.shape[0]
        key = (st.data_ptr(), n)
        if key != state["key"]:
            full = torch.empty(0, dtype=sent.dtype, device=sent.device)
            full.set_(st, 0, (st.nbytes() // sent.element_size(),), (1,))
            state["snap"] = full.cpu().numpy()
            state["key"] = key
            if stats is not None:
                stats["steps"] += 1
        s, off = sent.stride(0), sent.storage_offset()
        gen = state["snap"][off + plen * s: off + n * s: s].tolist()
        if check:
            row = sent[plen:].tolist()
            if stats is not None:
                stats["checked"] += 1
                stats["mismatches"] += gen != row
            gen = row
        return trie.allowed_view(gen)

    return fast


def machine_info(device, dtype_name, attn):
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "device": str(device), "dtype": dtype_name, "attn": attn,
            "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update({"gpu": torch.cuda.get_device_name(device), "gpu_mem_gib":
                     round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
                     "sm_count": p.multi_processor_count, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version()})
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


@torch.no_grad()
def generate(model, ids, trie, beam, max_new, eos, pad, mode, device, check=False, stats=None,
             scores=False):
    x = torch.tensor(ids, dtype=torch.long, device=device)
    fn = make_fn(trie, x.shape[1], mode, check, stats)
    return model.generate(
        input_ids=x, attention_mask=torch.ones_like(x), num_beams=beam,
        num_return_sequences=beam, do_sample=False, early_stopping=False, length_penalty=1.0,
        max_new_tokens=max_new, prefix_allowed_tokens_fn=fn, eos_token_id=eos, pad_token_id=pad,
        use_cache=True, output_scores=scores, return_dict_in_generate=scores)


def count_codes(seqs, plen, trie, eos, n_queries, beam):
    """Codes (EOS-terminated, exactly a code) per query among the returned sequences."""
    rows = seqs[:, plen:].tolist()
    per_q = []
    for q in range(n_queries):
        c = set()
        for gen in rows[q * beam:(q + 1) * beam]:
            if eos in gen:
                k = gen.index(eos)
                if tuple(gen[:k]) in trie.by_tokens:
                    c.add(tuple(gen[:k]))
        per_q.append(len(c))
    return per_q


def dump_codes(path, model, trie, codes, prompts, texts, args, eos, pad, device, info):
    beam, max_new = args.dump_beam, args.max_new_tokens
    cases = []
    for pi in range(min(args.dump_prompts, len(prompts))):
        ids = prompts[pi]
        plen = len(ids)
        stats = {"steps": 0, "checked": 0, "not_views": 0, "mismatches": 0}
        sync(device)
        t = time.perf_counter()
        out = generate(model, [ids], trie, beam, max_new, eos, pad, args.trie_fn, device,
                       check=True, stats=stats, scores=True)
        sync(device)
        dt = time.perf_counter() - t
        trans = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices,
                                                normalize_logits=False).float().cpu()
        seq_scores = out.sequences_scores.float().cpu()
        seqs = out.sequences.cpu()
        junk_below = -0.5e9 / max(1.0, float(max_new))
        kept, returned, junk, not_eos = [], [], 0, 0
        for i in range(seqs.shape[0]):
            gen = seqs[i, plen:].tolist()
            score = float(seq_scores[i])
            returned.append({"tokens": gen, "score": score})
            if eos not in gen:
                not_eos += 1
                continue
            k = gen.index(eos)
            ci = trie.by_tokens.get(tuple(gen[:k]))
            if not math.isfinite(score) or score <= junk_below or ci is None:
                junk += 1
                continue
            lps = [float(v) for v in trans[i, :k + 1]]
            kept.append({"code": codes[ci], "tokens": gen[:k + 1], "score": score,
                         "token_logprobs": lps,
                         "score_check": sum(lps) / (k + 1) - score})
        cases.append({"prompt_index": pi, "prompt_tokens": ids, "prompt_text": texts[pi],
                      "hf_returned": int(seqs.shape[0]), "hf_junk": junk, "hf_not_eos": not_eos,
                      "min_score_gap": min((x["score"] - y["score"] for x, y in
                                            zip(kept, kept[1:])), default=None),
                      "codes": kept, "returned": returned, "seconds": round(dt, 4),
                      "fn_steps": stats["steps"], "fn_rows_checked": stats["checked"],
                      "fn_rows_not_views": stats["not_views"],
                      "fn_mismatches": stats["mismatches"]})
        log(f"dump prompt {pi}: {len(kept)} codes (junk {junk}, not-EOS {not_eos}) in {dt:.2f}s; "
            f"best {kept[0]['code'] if kept else None!r} {kept[0]['score'] if kept else ''}; "
            f"fn rows checked {stats['checked']}")
    doc = {"tool": "hf-transformers", "model": args.model, "codes_file": args.codes,
           "n_codes": len(codes), "eos": eos, "pad": pad, "beam": beam, "batch": 1,
           "max_new_tokens": max_new, "length_penalty": 1.0, "trie_fn": args.trie_fn,
           "machine": info, "cases": cases}
    Path(path).write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"wrote {path}")


def run_config(model, trie, prompts, beam, batch, args, eos, pad, device):
    n = len(prompts)

    def batch_ids(b):
        return [prompts[(b * batch + j) % n] for j in range(batch)]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_cfg = time.perf_counter()
    sync(device)
    t = time.perf_counter()
    generate(model, batch_ids(0), trie, beam, args.max_new_tokens, eos, pad, args.trie_fn, device)
    sync(device)
    warm = time.perf_counter() - t
    log(f"  beam {beam} batch {batch}: warm-up {warm:.3f}s")
    lat, codes_per_q = [], []
    b = 1
    while len(lat) < args.reps and (not lat or time.perf_counter() - t_cfg < args.config_cap_s):
        ids = batch_ids(b)
        sync(device)
        t = time.perf_counter()
        out = generate(model, ids, trie, beam, args.max_new_tokens, eos, pad, args.trie_fn,
                       device)
        sync(device)
        dt = time.perf_counter() - t
        lat.append(dt)
        codes_per_q += count_codes(out, len(ids[0]), trie, eos, batch, beam)
        log(f"  beam {beam} batch {batch}: timed batch {len(lat)} {dt:.3f}s "
            f"({batch / dt:.1f} q/s)")
        b += 1
    rec = {"beam": beam, "batch": batch, "warmup_s": warm, "latencies_s": lat,
           "n_timed": len(lat), "capped": len(lat) < args.reps,
           "p50_s": statistics.median(lat), "p99_s": pct(lat, 0.99),
           "mean_s": statistics.fmean(lat), "min_s": min(lat),
           "per_query_latency_p50_s": statistics.median(lat),
           "per_query_latency_p99_s": pct(lat, 0.99),
           "qps_p50": batch / statistics.median(lat), "qps_mean": batch * len(lat) / sum(lat),
           "codes_per_query_mean": statistics.fmean(codes_per_q),
           "codes_per_query_min": min(codes_per_q)}
    if device.type == "cuda":
        rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--codes", required=True)
    ap.add_argument("--prompts", required=True, help="prompts.json of tools/gpu/make_inputs.py")
    ap.add_argument("--beam", type=int, action="append")
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True, help="JSONL, one line per config (appended)")
    ap.add_argument("--budget-s", type=float, default=120.0,
                    help="no new config starts after this many seconds since the start")
    ap.add_argument("--config-cap-s", type=float, default=30.0,
                    help="no new timed batch of a config after this many seconds in it")
    ap.add_argument("--reps", type=int, default=3, help="timed batches per config")
    ap.add_argument("--limit-prompts", type=int, help="use only the first N prompts (tests)")
    ap.add_argument("--trie-fn", choices=["fast", "simple"], default="fast")
    ap.add_argument("--dump-codes", help="JSON of the returned codes (beam --dump-beam, batch 1)")
    ap.add_argument("--dump-beam", type=int, default=10)
    ap.add_argument("--dump-prompts", type=int, default=4)
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    args = ap.parse_args()
    beams = args.beam or [10]
    batches = args.batch or [1]
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    device = torch.device(args.device)

    model_dir = Path(args.model)
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[args.dtype],
                                                 attn_implementation=args.attn)
    model.to(device).eval()
    assert next(model.parameters()).dtype == DTYPES[args.dtype]
    cfg = json.loads((model_dir / "config.json").read_text())
    eos = cfg.get("eos_token_id", model.config.eos_token_id)
    eos = int(eos[0] if isinstance(eos, list) else eos)
    pad = cfg.get("pad_token_id")
    pad = eos if pad is None else int(pad)
    info = machine_info(device, args.dtype, args.attn)
    log(f"{model_dir.name}: loaded on {device} ({info.get('gpu', info.get('cpu'))}), "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, eos {eos} pad {pad}")

    codes = Path(args.codes).read_text(encoding="utf-8").split("\n")
    if codes and codes[-1] == "":
        codes.pop()
    assert all(codes) and len(set(codes)) == len(codes), "empty or duplicate line in codes"
    t = time.perf_counter()
    seqs = tok(codes, add_special_tokens=False)["input_ids"]
    trie = Trie(seqs, eos, device)
    longest = max(len(s) for s in seqs) + 1
    log(f"{len(codes)} codes, {trie.n_prefixes} prefixes, {trie.n_flat} allowed entries, "
        f"longest code + EOS {longest} tokens, trie {time.perf_counter() - t:.2f}s")
    if longest > args.max_new_tokens:
        log(f"warning: longest code + EOS ({longest}) > max_new_tokens {args.max_new_tokens}")

    pj = json.loads(Path(args.prompts).read_text(encoding="utf-8"))
    prompts, texts = pj["prompts"], pj.get("texts") or [""] * len(pj["prompts"])
    if args.limit_prompts:
        prompts, texts = prompts[:args.limit_prompts], texts[:args.limit_prompts]
    assert prompts and len({len(p) for p in prompts}) == 1, "prompts must share one length"
    vocab = model.config.vocab_size
    assert all(0 <= i < vocab for p in prompts for i in p), "prompt id out of the vocabulary"

    base = {"tool": "hf-transformers", "model": model_dir.name, "codes_file": args.codes,
            "n_codes": len(codes), "n_prompts": len(prompts), "prompt_tokens": len(prompts[0]),
            "max_new_tokens": args.max_new_tokens, "length_penalty": 1.0,
            "trie_fn": args.trie_fn, "machine": info}
    if args.trie_fn == "fast":  # self-test: the step snapshot must read every row right
        ids = [prompts[i % len(prompts)] for i in range(2)]
        stats = {"steps": 0, "checked": 0, "not_views": 0, "mismatches": 0}
        try:
            a = generate(model, ids, trie, 4, args.max_new_tokens, eos, pad, "fast", device,
                         check=True, stats=stats)
            b = generate(model, ids, trie, 4, args.max_new_tokens, eos, pad, "simple", device)
            same = torch.equal(a, b)
        except Exception as e:
            log(f"trie fn self-test failed: {type(e).__name__}: {e}")
            stats["error"], same = f"{type(e).__name__}: {e}"[:300], False
        base["trie_fn_selftest"] = dict(stats, same_output_as_simple=same)
        log(f"trie fn self-test: {stats}, same output as --trie-fn simple: {same}")
        # the row check is the proof; an output difference alone would be GPU nondeterminism
        if stats["mismatches"] or "error" in stats:
            log("WARNING: the fast trie fn is wrong here; falling back to --trie-fn simple")
            args.trie_fn = base["trie_fn"] = "simple"
    if args.dump_codes:
        dump_codes(args.dump_codes, model, trie, codes, prompts, texts, args, eos, pad, device,
                   info)

    with open(args.out, "a", encoding="utf-8") as f:
        for beam in beams:
            for batch in batches:
                rec = dict(base)
                elapsed = time.perf_counter() - T0
                if elapsed > args.budget_s:
                    rec.update({"beam": beam, "batch": batch, "skipped": "budget",
                                "elapsed_s": round(elapsed, 1)})
                    log(f"beam {beam} batch {batch}: skipped (budget {args.budget_s}s spent)")
                else:
                    log(f"beam {beam} batch {batch}: start")
                    try:
                        rec.update(run_config(model, trie, prompts, beam, batch, args, eos, pad,
                                              device))
                        log(f"beam {beam} batch {batch}: p50 {rec['p50_s']:.3f}s per batch, "
                            f"{rec['qps_p50']:.1f} q/s, codes/query {rec['codes_per_query_mean']:.1f}")
                    except torch.cuda.OutOfMemoryError as e:
                        rec.update({"beam": beam, "batch": batch, "error": f"OOM: {e}"[:500]})
                        log(f"beam {beam} batch {batch}: OOM")
                        torch.cuda.empty_cache()
                    except Exception as e:  # keep going: the session is short
                        rec.update({"beam": beam, "batch": batch,
                                    "error": f"{type(e).__name__}: {e}"[:500]})
                        log(f"beam {beam} batch {batch}: ERROR {type(e).__name__}: {e}")
                rec["elapsed_s"] = round(time.perf_counter() - T0, 1)
                f.write(json.dumps(rec) + "\n")
                f.flush()
    log("done")


if __name__ == "__main__":
    sys.exit(main())
