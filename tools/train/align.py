"""Stage 4: co-alignment, GRAM's DPO variant.

    python -m tools.train.align [--work WORK] [--init WORK/sft] [--out WORK/align]
                                [--pairs N] [--beam B] [--beta-w BW] [--beta-l BL]
                                [--length-alpha A] [--sft-weight S] [--lr LR] [--batch N]
                                [--epochs E] [--minutes M] [--seed S] [--threads T]

For N (query, relevant product) pairs — synthetic training queries and a product each was made
from — the SFT model generates codes by trie-constrained beam search (transformers,
`prefix_allowed_tokens_fn` over the catalog's codes; gen.py) from the query prompt and from the
product prompt. **Positives** are codes both sides generate; **negatives** codes only one side
generates (a code the query was trained to produce for that product is never a negative). Where
the two sides share no code, the query's training codes that the product carries stand in as
positives. Each (positive, negative) pair is one preference, at most `--per-pair` of them per
(query, product).

The policy is the mean of the two conditionals, `pi(c) = (p(c | query) + p(c | product)) / 2`,
and the reward of a code is its log-ratio to the frozen SFT model (the reference):

    r(c)  = log pi_theta(c) - log pi_ref(c)
    r~(c) = r(c) * min(1, Lm / |c|) ** A     for a fine code (4+ attributes), else r(c)
    loss  = -log sigmoid(beta_w r~(winner) - beta_l r~(loser))  +  S * NLL(winner | both sides)

`|c|` counts the code's tokens with its EOS and `Lm` is the median token length of the medium
codes: a fine code longer than a typical medium code has its reward scaled down, so its many
token log-ratios do not outweigh the shorter codes' (gram-spec.md names "a length correction
for fine codes" without its form; this is ours). `beta_w` and `beta_l` are the separate
temperatures of winner and loser. `S` (default 0.1) keeps the winners' likelihood from
drifting down (the known DPO failure where both sides fall). Written by hand in torch (about
forty lines) rather than with TRL: TRL's DPOTrainer has one beta, one conditional per sample and
its own length handling, and the paper's variant needs two conditionals mixed, two betas and the
fine-code correction.
"""
import argparse
import collections
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tools.train import codes as C
from tools.train import common as K
from tools.train import gen as G
from tools.train.pairs import read_jsonl


def preference_data(model, tok, items, queries, gold, trie, n, beam, per_pair, rng, log):
    """[(query, title, winner, loser)] from beams of both sides (see the module doc)."""
    by_id = {it["id"]: it for it in items}
    sample = rng.sample(queries, min(n, len(queries)))
    qs = [r["query"] for r in sample]
    ts = [by_id[rng.choice(r["pids"])] for r in sample]
    t0 = time.time()
    qb = G.generate(model, tok, [K.query_prompt(q) for q in qs], trie, beam=beam)
    tb = G.generate(model, tok, [K.product_prompt(t["title"]) for t in ts], trie, beam=beam)
    gen_s = time.time() - t0
    prefs, stats = [], collections.Counter()
    for q, t, cq, ct in zip(qs, ts, qb, tb):
        cq, ct = {c for c, _ in cq}, {c for c, _ in ct}
        g = set(gold.get(q, ())) & set(t["codes"])
        pos = cq & ct
        if not pos:
            stats["no_shared_code"] += 1
            pos = g & trie_codes(trie)
        neg = (cq | ct) - pos - g
        if not pos or not neg:
            stats["skipped"] += 1
            continue
        cand = [(w, l) for w in sorted(pos) for l in sorted(neg)]
        rng.shuffle(cand)
        for w, l in cand[:per_pair]:
            prefs.append((q, t["title"], w, l))
        stats["shared"] += len(cq & ct)
        stats["pairs"] += 1
    log(stage="align", event="preference data", queries=len(qs), generate_seconds=round(gen_s, 1),
        preferences=len(prefs), shared_codes_per_query=round(stats["shared"] / max(1, len(qs)), 3),
        **stats)
    return prefs


def trie_codes(trie):
    return set(trie.by_tokens.values())


def rows_for(prefs, tok):
    """Two packed rows per preference: query prompt + [winner, loser], product prompt + the
    same."""
    rows = []
    for q, title, w, l in prefs:
        cs = [tok.code(w), tok.code(l)]
        rows.append((tok.prompt(K.query_prompt(q)), cs))
        rows.append((tok.prompt(K.product_prompt(title)), cs))
    return rows


def policy_logps(model, rows, pad):
    """log pi(c) = log((p(c|q) + p(c|t)) / 2) for winner and loser of each preference, and the
    winners' mean token NLL."""
    b = K.collate(rows, pad)
    s, n, _ = K.code_logprobs(model, b)
    s = s.view(-1, 2, 2)  # (pref, side q/t, winner/loser)
    n = n.view(-1, 2, 2)
    mix = torch.logsumexp(s, dim=1) - torch.log(torch.tensor(2.0))  # (pref, w/l)
    nll_w = -(s[:, :, 0].sum(1) / n[:, :, 0].sum(1)).mean()
    return mix, n[:, 0, :], nll_w


def length_factor(codes, ntok, lm, alpha):
    """min(1, Lm/|c|) ** alpha for fine codes, 1 otherwise."""
    f = []
    for c, k in zip(codes, ntok):
        f.append(min(1.0, lm / k) ** alpha if C.gran(c) == "fine" else 1.0)
    return torch.tensor(f)


def dpo_loss(pol, ref, fw, fl, beta_w, beta_l):
    """-log sigmoid(beta_w r~(w) - beta_l r~(l)) per preference, and the rewards."""
    rw = (pol[:, 0] - ref[:, 0]) * fw
    rl = (pol[:, 1] - ref[:, 1]) * fl
    return -F.logsigmoid(beta_w * rw - beta_l * rl), rw, rl


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--init", default=None, help="SFT checkpoint (default WORK/sft)")
    ap.add_argument("--out", default=None, help="default WORK/align")
    ap.add_argument("--pairs", type=int, default=3000, help="(query, product) pairs")
    ap.add_argument("--per-pair", type=int, default=4)
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--beta-w", type=float, default=0.5)
    ap.add_argument("--beta-l", type=float, default=0.25)
    ap.add_argument("--length-alpha", type=float, default=1.0)
    ap.add_argument("--sft-weight", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=32, help="preferences per step")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--minutes", type=float, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    K.seed_all(args.seed)
    work = Path(args.work)
    init = Path(args.init) if args.init else work / "sft"
    out = Path(args.out) if args.out else work / "align"
    log = K.Log(work / "train-log.jsonl")
    t0 = time.time()
    tok = K.Tok(init / "tokenizer.json")
    items = C.read_catalog(work / "catalog.jsonl")
    trie = G.CodeTrie(sorted({c for it in items for c in it["codes"]}), tok)
    lm = statistics.median(len(tok.code(c)) for c in trie.codes if C.gran(c) == "medium")
    gold = collections.defaultdict(list)
    for p in read_jsonl(work / "pairs-train.jsonl"):
        if p["kind"] == "query":
            gold[p["text"]].append(p["code"])
    queries = read_jsonl(work / "queries-train.jsonl")
    rng = random.Random(args.seed)
    policy, ref = K.load_model(init), K.load_model(init)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    log(stage="align", event="start", init=str(init), args=vars(args), medium_median_tokens=lm,
        codes=len(trie.codes))
    prefs = preference_data(ref, tok, items, queries, gold, trie, args.pairs, args.beam,
                            args.per_pair, rng, log)
    if not prefs:
        raise SystemExit("align: no preference pairs (no query shares a code with its product's "
                         "beam): nothing to align")
    # A batch never larger than the data (else no batch forms and the loop never ends).
    args.batch = min(args.batch, len(prefs))
    total = max(1, int(len(prefs) * args.epochs / args.batch))
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    policy.train()
    step, hist = 0, collections.deque(maxlen=20)
    order = list(range(len(prefs)))
    # `--minutes` counts the training loop only, as sft.py's budget: not the model loading nor
    # the preference generation before it (2 × pairs beam searches, minutes on their own).
    t_train = time.time()
    while step < total:
        rng.shuffle(order)
        for i in range(0, len(order) - args.batch + 1, args.batch):
            if step >= total:
                break
            batch = [prefs[j] for j in order[i:i + args.batch]]
            rows = rows_for(batch, tok)
            # The reference under the policy's autocast: at the start the two are the same
            # model computed the same way, so every reward is exactly 0 (an f32 reference
            # against a bf16 policy left rewards of up to 0.06 before any step).
            with torch.no_grad(), K.autocast():
                ref_mix, _, _ = policy_logps(ref, rows, tok.pad)
            with K.autocast():
                pol_mix, ntok, nll_w = policy_logps(policy, rows, tok.pad)
            fw = length_factor([b[2] for b in batch], ntok[:, 0].tolist(), lm, args.length_alpha)
            fl = length_factor([b[3] for b in batch], ntok[:, 1].tolist(), lm, args.length_alpha)
            losses, rw, rl = dpo_loss(pol_mix, ref_mix, fw, fl, args.beta_w, args.beta_l)
            loss = losses.mean() + args.sft_weight * nll_w
            for g in opt.param_groups:
                g["lr"] = K.lr_at(step, total, args.lr, max(1, total // 20))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            step += 1
            hist.append((losses.mean().item(), (rw > rl).float().mean().item(),
                         rw.mean().item(), rl.mean().item(), nll_w.item()))
            if step % 10 == 0 or step == 1 or step == total:
                m = [sum(x[k] for x in hist) / len(hist) for k in range(5)]
                log(stage="align", step=step, total_steps=total, dpo_loss=round(m[0], 4),
                    reward_acc=round(m[1], 3), reward_w=round(m[2], 4), reward_l=round(m[3], 4),
                    nll_w=round(m[4], 4), seconds=round(time.time() - t0, 1))
            if args.minutes and time.time() - t_train > args.minutes * 60:
                log(stage="align", event="time limit", step=step)
                total = step
                break
    # after: how many codes the two sides now share, before (reference) and after (policy), on a
    # second sample of (query, product) pairs (another seed, drawn from the same training
    # queries: a few, ~7 %, are queries the preferences were made from)
    preference_data(ref, tok, items, queries, gold, trie, min(200, args.pairs), args.beam,
                    args.per_pair, random.Random(args.seed + 1), log)
    check = preference_data(policy, tok, items, queries, gold, trie, min(200, args.pairs), args.beam,
                            args.per_pair, random.Random(args.seed + 1), log)
    out.mkdir(parents=True, exist_ok=True)
    # A gram.json fitted to an earlier policy does not stay beside this one (see sft.py).
    (out / "gram.json").unlink(missing_ok=True)
    policy.save_pretrained(str(out), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (init / f).exists():
            (out / f).write_bytes((init / f).read_bytes())
    log(stage="align", event="done", steps=step, out=str(out), seconds=round(time.time() - t0, 1))


if __name__ == "__main__":
    main()
