"""Stage 5: the S_rele weights per code granularity and the code-likelihood weight, learned
with the pairwise hinge loss, and the aggregation; written into gram.json.

    python -m tools.train.weights [--work WORK] [--model DIR] [--queries N] [--per-code K]
                                  [--margin MU] [--seed S] [--forms none,sum,mean] [--reuse-features]

For synthetic training queries (never the judged ones) the model generates the query's codes as
the engine does (beam 10 over the catalog's codes from the query template; Pq = the probability
of each code token), every product carrying one of those codes in the catalog is a candidate
(at most K per code: a random sample of K/2 relevant ones and one of K/2 others, the other side
filling in where one has fewer; a candidate is scored through
every query code it carries, as the engine's posting lists reach it), and its Pt comes from
teacher forcing the code after the product template — exactly what `gram index build` stores. A
product is relevant to a synthetic query when it has the values of one of the products the query
was made from, on the attributes that product's query named (`pairs.relevant_to`). For each candidate and code the divergence
bracket of S_rele (paper Eq. 7, src/score/) over the code's tokens (not its EOS: the engine's
Pq and Pt have none)

    D(q, t, c) = sum_i [ Pq_i ln(2 Pq_i / (Pq_i + Pt_i)) + Pt_i ln(2 Pt_i / (Pq_i + Pt_i)) ]

is computed once, and for each query code its query-side log-likelihood L(q, c) = sum over the
code's tokens and its EOS of ln Pq (form `sum`), or that sum over their count (form `mean`). Then

    S(q, t) = agg_c [ w_g(c) D(q, t, c) + alpha L(q, c) ]

with agg = max or sum over the codes that reach t (the engine's `code_logprob` prior,
src/score/ `code_prior`: alpha = 0 is S_rele alone), and (coarse, medium, fine, alpha)
minimize jointly the pairwise hinge loss

    mean over (q, t+, t-) of max(0, S(q, t-) - S(q, t+) + mu)  +  lambda (|w + 1|^2 + alpha^2)

(the paper writes it per shared code c; we compare the aggregated scores, which is what ranks,
and equals the paper's form when one code reaches both products). The small L2 term pulls
the weights towards the engine's default -1 (so a granularity the sample never shows keeps it)
and alpha towards 0. The engine ranks higher scores first and D is a divergence, so the weights
come out negative; L <= 0, so a positive alpha favours products reached through likely codes.
Every (aggregation, form) pair is fitted (form `none`: alpha fixed at 0, the fit before the
term); the one with the best pair accuracy on the validation queries (queries-valid.jsonl) wins.
Writes MODEL/gram.json and WORK/weights.json (every fit, accuracies, validation nDCG@10 over the
candidates).
"""
import argparse
import collections
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from tools.train.pairs import relevant_to

from tools.train import codes as C
from tools.train import common as K
from tools.train import gen as G
from tools.train.pairs import read_jsonl

GRAN = {"coarse": 0, "medium": 1, "fine": 2}
# How `features` samples a code's candidates (a cache made by another rule is not reused).
SAMPLING = "half-relevant-random"


def bracket(pq, pt):
    """Sum over tokens of the S_rele bracket (f64; a zero probability contributes 0)."""
    s = 0.0
    for a, b in zip(pq, pt):
        m = a + b
        if a > 0:
            s += a * math.log(2 * a / m)
        if b > 0:
            s += b * math.log(2 * b / m)
    return s


FORMS = ("none", "sum", "mean")


def code_loglik(pq, form):
    """L(q, c) from the query-side probabilities of a code's tokens and its EOS."""
    lp = sum(math.log(max(p, 1e-30)) for p in pq)
    return {"none": 0.0, "sum": lp, "mean": lp / max(len(pq), 1)}[form]


def features(model, tok, items, queries, per_code, rng, log, beam=10):
    """Per query: (D matrix products x codes, granularity per code, relevance per product,
    L per code and form: a codes x len(FORMS) matrix)."""
    by_id = {it["id"]: it for it in items}
    posting = collections.defaultdict(list)
    for it in items:
        for c in it["codes"]:
            posting[c].append(it["id"])
    trie = G.CodeTrie(sorted(posting), tok)
    t0 = time.time()
    beams = G.generate(model, tok, [K.query_prompt(r["query"]) for r in queries], trie, beam=beam)
    qcodes = [[c for c, _ in b] for b in beams]
    pq = G.code_token_probs(model, tok, [(K.query_prompt(r["query"]), cs)
                                         for r, cs in zip(queries, qcodes)])
    cand = []
    jobs = collections.defaultdict(set)
    # Code columns by granularity, and those whose sample holds both a relevant and an
    # irrelevant product (a column without a negative teaches its weight nothing).
    columns, mixed = collections.Counter(), collections.Counter()
    for r, cs in zip(queries, qcodes):
        per = {}
        for c in cs:
            ids = posting[c]
            rel = [i for i in ids if relevant_to(by_id[i], r, by_id)]
            rel_set = set(rel)
            rest = [i for i in ids if i not in rel_set]
            # Half relevant, half not, each a random sample, the other side filling in where
            # one is short (since the forty-second session: the relevant ones first, in catalog
            # order, left 36 of 42 fine-code columns without a negative, and the fine weight at
            # its start).
            n_rel = min(len(rel), max(per_code // 2, per_code - len(rest)))
            n_rest = min(len(rest), per_code - n_rel)
            pick = rng.sample(rel, n_rel) + rng.sample(rest, n_rest)
            per[c] = pick
            columns[C.gran(c)] += 1
            mixed[C.gran(c)] += bool(n_rel and n_rest)
        # A candidate is scored through every query code it carries, as the engine reaches it.
        for i in {i for c in cs for i in per[c]}:
            jobs[i].update(c for c in cs if c in by_id[i]["codes"])
        cand.append(per)
    order = sorted(jobs)
    pt_list = G.code_token_probs(model, tok, [(K.product_prompt(by_id[i]["title"]), sorted(jobs[i]))
                                              for i in order])
    pt = {(i, c): p for i, cs, ps in zip(order, [sorted(jobs[i]) for i in order], pt_list)
          for c, p in zip(cs, ps)}
    out = []
    for r, cs, pqs, per in zip(queries, qcodes, pq, cand):
        prods = sorted({i for c in cs for i in per[c]})
        if not prods:
            continue
        D = torch.full((len(prods), len(cs)), float("nan"))
        for k, (c, p) in enumerate(zip(cs, pqs)):
            for j, i in enumerate(prods):
                if (i, c) in pt:
                    # Code tokens only: the last probability is the EOS's (gen.code_token_probs).
                    D[j, k] = bracket(p[:-1], pt[(i, c)][:-1])
        g = torch.tensor([GRAN[C.gran(c)] for c in cs])
        L = torch.tensor([[code_loglik(p, f) for f in FORMS] for p in pqs], dtype=torch.float32)
        rel = torch.tensor([relevant_to(by_id[i], r, by_id) for i in prods])
        if rel.any() and (~rel).any():
            out.append((D, g, rel, L))
    log(stage="weights", event="features", queries=len(queries), usable=len(out),
        candidates=sum(len(x[2]) for x in out), product_code_pairs=len(pt),
        code_columns=dict(sorted(columns.items())), columns_with_both=dict(sorted(mixed.items())),
        seconds=round(time.time() - t0, 1))
    return out


def scores(w, D, g, agg, L=None, alpha=0.0):
    """S for every candidate of one query: w_g D + alpha L per code, aggregated over the codes
    that reach it (L: one value per code, or None for S_rele alone)."""
    S = w[g][None, :] * torch.nan_to_num(D, nan=0.0)
    if L is not None:
        S = S + alpha * L[None, :]
    reach = ~torch.isnan(D)
    if agg == "sum":
        return (S * reach).sum(1)
    return torch.where(reach, S, torch.tensor(-1e9)).max(1).values


def form_scores(theta, item, agg, form):
    """`scores` with theta = (coarse, medium, fine, alpha) and the form's L column."""
    D, g, rel, L = item
    if form == "none":
        return scores(theta[:3], D, g, agg)
    return scores(theta[:3], D, g, agg, L[:, FORMS.index(form)], theta[3])


def pairs_of(data, rng, cap=200):
    out = []
    for qi, (D, g, rel, _) in enumerate(data):
        pos = rel.nonzero()[:, 0].tolist()
        neg = (~rel).nonzero()[:, 0].tolist()
        pr = [(p, n) for p in pos for n in neg]
        rng.shuffle(pr)
        out += [(qi, p, n) for p, n in pr[:cap]]
    return out


def accuracy(theta, data, agg, form="none"):
    """Fraction of (relevant, non-relevant) candidate pairs ordered right (ties count half)."""
    ok = tot = 0.0
    for item in data:
        rel = item[2]
        s = form_scores(theta, item, agg, form)
        sp, sn = s[rel], s[~rel]
        diff = sp[:, None] - sn[None, :]
        ok += (diff > 0).sum().item() + 0.5 * (diff == 0).sum().item()
        tot += diff.numel()
    return ok / max(tot, 1)


def ndcg10(theta, data, agg, form="none"):
    """Mean binary nDCG@10 of the candidates ranked by S (ties: the lower index first)."""
    tot = 0.0
    for item in data:
        rel = item[2]
        s = form_scores(theta, item, agg, form)
        order = sorted(range(len(s)), key=lambda j: (-s[j].item(), j))[:10]
        dcg = sum(1 / math.log2(r + 2) for r, j in enumerate(order) if rel[j])
        ideal = sum(1 / math.log2(r + 2) for r in range(min(10, int(rel.sum()))))
        tot += dcg / ideal
    return tot / max(len(data), 1)


def fit(data, agg, margin, l2, rng, form="none", steps=400, lr=0.05, nonpositive=False):
    """Adam on theta = (coarse, medium, fine, alpha) from (-1, -1, -1, 0); alpha stays 0 for
    form `none`. With `nonpositive`, every step projects the three weights onto <= 0: a larger
    divergence never scores higher."""
    pairs = pairs_of(data, rng)
    theta = torch.tensor([-1.0, -1.0, -1.0, 0.0], requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    byq = collections.defaultdict(list)
    for qi, p, n in pairs:
        byq[qi].append((p, n))
    target = torch.tensor([-1.0, -1.0, -1.0, 0.0])
    for step in range(steps):
        loss = 0.0
        for qi, pn in byq.items():
            s = form_scores(theta, data[qi], agg, form)
            p = torch.tensor([x for x, _ in pn])
            n = torch.tensor([y for _, y in pn])
            loss = loss + torch.clamp(s[n] - s[p] + margin, min=0).sum()
        loss = loss / max(len(pairs), 1) + l2 * ((theta - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        if form == "none":
            theta.grad[3] = 0.0
        opt.step()
        if nonpositive:
            with torch.no_grad():
                theta[:3].clamp_(max=0.0)
    return theta.detach(), loss.item()


def settings_of(theta, agg, form):
    """gram.json for a fit (`code_logprob` only with a likelihood form)."""
    w = [round(x, 4) for x in theta.tolist()]
    out = {"query_template": K.QUERY_TEMPLATE, "product_template": K.PRODUCT_TEMPLATE,
           "delimiter": C.DELIM, "weights": {"coarse": w[0], "medium": w[1], "fine": w[2]},
           "aggregation": agg, "max_code_tokens": K.MAX_CODE_TOKENS}
    if form != "none":
        out["code_logprob"] = {"weight": w[3], "per_token": form == "mean"}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--model", default=None,
                    help="model dir (default WORK/align, else WORK/sft; an align older than sft "
                         "refused)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--valid-queries", type=int, default=100)
    ap.add_argument("--per-code", type=int, default=16)
    ap.add_argument("--margin", type=float, default=0.1)
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forms", default=",".join(FORMS),
                    help="code-likelihood forms to fit: none (S_rele alone), sum, mean")
    ap.add_argument("--nonpositive", action="store_true",
                    help="constrain the S_rele weights to <= 0 (divergence never rewarded)")
    ap.add_argument("--reuse-features", action="store_true",
                    help="reuse WORK/weights-features.pt (the last run's features; same model and args)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    K.seed_all(args.seed)
    work = Path(args.work)
    mdir = Path(args.model) if args.model else K.trained_model(work)
    log = K.Log(work / "train-log.jsonl")
    tok = K.Tok(mdir / "tokenizer.json")
    model = K.load_model(mdir)
    items = C.read_catalog(work / "catalog.jsonl")
    rng = random.Random(args.seed)
    tq = read_jsonl(work / "queries-train.jsonl")
    vq = read_jsonl(work / "queries-valid.jsonl")
    cache = work / "weights-features.pt"
    # What the features were computed from: reused only for the same model weights (every
    # safetensors file of the directory, sharded too), the same queries and catalog, and the
    # same sample.
    def stamp(paths):
        return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(paths)]
    made_from = {"model": str(mdir.resolve()), "weights": stamp(mdir.glob("*.safetensors")),
                 "inputs": stamp(work / f for f in ("catalog.jsonl", "queries-train.jsonl",
                                                    "queries-valid.jsonl")),
                 "queries": args.queries, "valid_queries": args.valid_queries,
                 "per_code": args.per_code, "seed": args.seed, "sampling": SAMPLING}
    cached = torch.load(cache) if args.reuse_features and cache.exists() else None
    if cached is not None and (len(cached) != 3 or cached[2] != made_from):
        print("weights: the cached features were made from another model or sample: computing "
              "them again", file=sys.stderr)
        cached = None
    if cached is not None:
        train, valid, _ = cached
    else:
        train = features(model, tok, items, rng.sample(tq, min(args.queries, len(tq))), args.per_code, rng, log)
        valid = features(model, tok, items, rng.sample(vq, min(args.valid_queries, len(vq))), args.per_code, rng,
                         log)
        torch.save((train, valid, made_from), cache)
    forms = args.forms.split(",")
    assert all(f in FORMS for f in forms), forms
    res = {}
    default = torch.tensor([-1.0, -1.0, -1.0, 0.0])
    for agg in ("max", "sum"):
        for form in forms:
            theta, loss = fit(train, agg, args.margin, args.l2, random.Random(args.seed), form,
                              nonpositive=args.nonpositive)
            key = f"{agg}/{form}"
            res[key] = {"aggregation": agg, "form": form,
                        "weights": [round(x, 4) for x in theta[:3].tolist()],
                        "alpha": round(theta[3].item(), 4), "train_hinge": round(loss, 5),
                        "train_pair_acc": round(accuracy(theta, train, agg, form), 4),
                        "valid_pair_acc": round(accuracy(theta, valid, agg, form), 4),
                        "valid_ndcg@10": round(ndcg10(theta, valid, agg, form), 4),
                        "valid_pair_acc_default_-1": round(accuracy(default, valid, agg), 4)}
            log(stage="weights", **res[key])
    best = max(res, key=lambda a: res[a]["valid_pair_acc"])
    r = res[best]
    settings = settings_of(torch.tensor(r["weights"] + [r["alpha"]]), r["aggregation"], r["form"])
    with C.replacing(mdir / "gram.json") as f:
        f.write(json.dumps(settings, indent=1) + "\n")
    with C.replacing(work / "weights.json") as f:
        f.write(json.dumps({"model": str(mdir), "chosen": best, "fits": res, "args": vars(args)},
                           indent=1) + "\n")
    log(stage="weights", event="done", chosen=best, gram_json=settings)


if __name__ == "__main__":
    main()
