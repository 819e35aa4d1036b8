"""Evaluation on the visible judged chorus-icecat queries: GRAM through the engine
(`gram index build` + `gram search`), BM25 (bm25s) over the same catalog, and their union.

    python -m tools.train.evaluate --model DIR [--work WORK] [--gram PATH] [--k 300]
                                   [--name NAME] [--rebuild] [--settings GRAM_JSON]
                                   [--judgements FILE] [--fusion-weight W] [--no-cold]

The catalog is DIR/catalog.jsonl (what the model was trained on, every product indexed under its
catalog codes). Queries: the 90 visible judged queries (WORK/judged.jsonl, stage 2), or those of
`--judgements FILE` (a judged.jsonl, or a CSV such as Chorus's `Broad_Query_Set_rated.csv`: the
held-out 45 when they are given; judged products missing from the catalog are left out, said on
stderr; a query the engine refuses, blank or too long, gets no products, said on stderr, as
`gram eval` counts it). Metrics (metrics.py): nDCG@10, Recall@10/100/300 (relevant =
grade >= 2, unjudged = not relevant), relevance rate of the top 300 among its judged products,
judged@10; for GRAM also the codes per query, the invalid-code rate (codes not in the index:
0 by construction of the trie), the candidates scored per query where the engine reports them,
and latency (the engine's per-stage timings). BM25: bm25s 0.3.16, Lucene variant, k1 1.5, b 0.75,
English stopwords, over title + short description + brand (the fields Chorus's own Solr engine
searched, less ids and EANs). Union, two ways: the two rankings interleaved (GRAM first), and
by score fusion (metrics.fuse: BM25's score over the query's best, plus a weight when GRAM's top
k holds the product). The fusion weight is fitted here, never on the judged queries: the weight
of a fixed grid with the best nDCG@10 on the synthetic validation queries (stage 2's
queries-valid.jsonl; relevant by `pairs.relevant_to`, the rule of weights.py), GRAM through the same index, BM25 as below (`--fusion-weight W` skips the fit).

A cold-start check rides along: for the held-out products of stage 2 and as many training
products, the share of each product's catalog codes that the model's product-side beam (10)
generates from its title.

`--settings FILE` scores the model's index with another gram.json (a hard-linked copy of the
model dir with that file, passed to `gram search --model`): other S_rele / code-likelihood
weights without rebuilding anything.

Writes WORK/eval-NAME.json (summary + per query, the gram.json scored with) and prints the
summary table.
"""
import argparse
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tools.train import codes as C
from tools.train import metrics as M
from tools.train.pairs import read_jsonl


def settings_model(model, settings, out):
    """A copy of model dir `model` (hard links) whose gram.json is the file `settings`: the
    same fingerprint, so `gram search --model` scores the model's index with other weights."""
    import os
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in model.iterdir():
        if f.is_file() and f.name != "gram.json":
            try:
                os.link(f, out / f.name)
            except OSError:
                shutil.copy2(f, out / f.name)
    shutil.copy(settings, out / "gram.json")
    return out


def gram_run(gram, model, catalog, idx, queries, k, rebuild, beam=10, search_model=None):
    if rebuild or not (idx / "index.gram").exists():
        if idx.exists():
            shutil.rmtree(idx)
        t = time.time()
        r = subprocess.run([gram, "index", "build", "--model", model, "--catalog", catalog,
                            "--out", idx, "--threads", "2"], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        build_s = time.time() - t
    else:
        build_s = None
    t = time.time()
    extra = ["--model", search_model] if search_model else []
    # A blank query is refused by the engine (as `gram eval` counts it: no products); the rest
    # go after `--`, so that one starting with `-` is a query, not an option.
    blank = [q for q in queries if not q.strip()]
    if blank:
        print(f"evaluate: {len(blank)} blank queries get no products", file=sys.stderr)
    asked = [q for q in queries if q.strip()]
    out = {q: {"query": q, "products": [], "codes": []} for q in blank}
    while asked:
        r = subprocess.run([gram, "search", "--index", idx, "--k", str(k), "--beam", str(beam),
                            "--threads", "2", *extra, "--", *asked],
                           capture_output=True, text=True)
        if r.returncode and not rebuild and "rebuild it" in r.stderr:
            # An index of another model (or of an older fingerprint): built again, once.
            return gram_run(gram, model, catalog, idx, queries, k, True, beam, search_model)
        done = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
        for x in done:
            out[x["query"]] = x
        if not r.returncode:
            break
        # A query the engine refuses (too long) or that fails alone (non-finite log-probs of its
        # own rows) gets no products, as `gram eval` counts it, and the rest are asked again.
        # `gram search` checks every query before searching any and names a refused one by its
        # place (`error: query N ("..."): invalid input: query: ...`, nothing printed); a failure
        # comes as the query is searched, after the answers of those before it (`numeric: ...`).
        named = re.search(r"error: query (\d+) \(.*\): invalid input: query:", r.stderr)
        if named and not done and 1 <= int(named.group(1)) <= len(asked):
            at = int(named.group(1)) - 1
        elif "error: numeric:" in r.stderr and len(done) < len(asked):
            at = len(done)
        else:
            raise SystemExit(r.stderr[-3000:])
        refused = asked[at]
        print(f"evaluate: query {refused[:80]!r} refused by the engine, no products: "
              f"{r.stderr.strip().splitlines()[-1][-300:]}", file=sys.stderr)
        out[refused] = {"query": refused, "products": [], "codes": []}
        asked = [q for q in asked if q not in out]
    wall = time.time() - t
    return out, build_s, wall


class Bm25:
    """bm25s over title + short description + brand of `products` (raw catalog records)."""

    def __init__(self, products):
        import bm25s
        self.bm25s = bm25s
        self.ids = [str(p["id"]) for p in products]
        docs = [" ".join(str(p.get(f, "")) for f in ("title", "short_description", "supplier"))
                for p in products]
        self.retriever = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
        self.retriever.index(bm25s.tokenize(docs, stopwords="en", show_progress=False),
                             show_progress=False)

    def run(self, queries, k):
        """{query: [(id, score)] best first}, at most k: the products that match a query term.
        bm25s fills its top k with products of score 0, in an arbitrary order, when fewer
        match; those are not hits and are left out (before the thirty-eighth session they
        padded BM25's top 300 and broke the fusion's ties)."""
        k = min(k, len(self.ids))
        res, scores = self.retriever.retrieve(
            self.bm25s.tokenize(queries, stopwords="en", show_progress=False), k=k,
            show_progress=False)
        return {q: [(self.ids[i], float(s)) for i, s in zip(row.tolist(), srow.tolist()) if s > 0]
                for q, row, srow in zip(queries, res, scores)}


# The fusion weights tried (metrics.fuse); 0 is BM25 alone, above 1 every GRAM product first.
FUSION_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
# How deep the BM25 run is read for the fusion, so GRAM's products keep their BM25 score.
FUSION_DEPTH = 1000


def fit_fusion(gram, model, idx, work, items, bm25, k, beam, search_model):
    """The fusion weight of FUSION_GRID with the best mean nDCG@10 over the synthetic
    validation queries (ties: the smaller weight); their relevance: weights.py's rule."""
    from tools.train.pairs import relevant_to
    by_id = {it["id"]: it for it in items}
    rows = [r for r in read_jsonl(Path(work) / "queries-valid.jsonl") if r["pids"][0] in by_id]
    grades = {}
    for r in rows:
        grades[r["query"]] = {i: M.REL for i, it in by_id.items() if relevant_to(it, r, by_id)}
    queries = sorted(grades)
    g, _, _ = gram_run(gram, model, model / "catalog.jsonl", idx, queries, k, False, beam,
                       search_model)
    gram_runs = {q: [p["id"] for p in g[q]["products"]] for q in queries}
    lex = bm25.run(queries, FUSION_DEPTH)
    grid = {}
    for w in FUSION_GRID:
        s = M.summarize({q: M.fuse(lex[q], gram_runs[q], w, k) for q in queries}, grades)
        grid[str(w)] = {m: round(s[m], 4) for m in ("ndcg@10", "recall@10", "recall@300")}
    best = max(FUSION_GRID, key=lambda w: (grid[str(w)]["ndcg@10"], -w))
    # Reciprocal rank fusion on the same queries: nothing to fit, reported beside the grid.
    s = M.summarize({q: M.rrf([[d for d, _ in lex[q]], gram_runs[q]], k) for q in queries},
                    grades)
    rrf = {m: round(s[m], 4) for m in ("ndcg@10", "recall@10", "recall@300")}
    return {"weight": best, "criterion": "ndcg@10 on the synthetic validation queries",
            "queries": len(queries), "grid": grid, "rrf": rrf}


def cold_start(model_dir, work, n=150, seed=0):
    import torch
    from tools.train import common as K
    from tools.train import gen as G
    torch.set_num_threads(2)
    tok = K.Tok(Path(model_dir) / "tokenizer.json")
    model = K.load_model(model_dir)
    items = C.read_catalog(Path(model_dir) / "catalog.jsonl")
    trie = G.CodeTrie(sorted({c for it in items for c in it["codes"]}), tok)
    cold = [r for r in read_jsonl(Path(work) / "cold.jsonl") if r["kind"] == "product"]
    cold_titles = {r["title"] for r in cold}
    rng = random.Random(seed)
    warm = [it for it in items if it["title"] not in cold_titles]
    warm = rng.sample(warm, min(n, len(warm)))
    cold = rng.sample(cold, min(n, len(cold)))
    # Both sides against the codes the model's trie holds (the model's catalog keeps codes of at
    # most 16 tokens; cold.jsonl's are unfiltered, and a code no beam can emit would count as a
    # miss on the cold side only).
    emittable = set(trie.codes)
    out = {}
    for name, rows in (("cold", cold), ("train", warm)):
        rows = [r for r in rows if any(c in emittable for c in r["codes"])]
        if not rows:
            out[name] = {"products": 0, "catalog_code_recall@10": None}
            continue
        beams = G.generate(model, tok, [K.product_prompt(r["title"]) for r in rows], trie, beam=10)
        cov = []
        for r, b in zip(rows, beams):
            want = {c for c in r["codes"] if c in emittable}
            cov.append(len({c for c, _ in b} & want) / len(want))
        out[name] = {"products": len(cov), "catalog_code_recall@10": round(statistics.mean(cov), 4)}
    return out


def gram_stats(g, queries, index_codes):
    """Codes per query, the invalid-code rate (None without the index's codes), the median
    engine timings and the mean candidates scored, of `gram_run`'s answers `g`. Timings and
    candidates are those of the queries the engine answered (a blank or refused one has none;
    it made the summary fail with a KeyError before the fortieth session); the codes count all."""
    codes_per_q = [len(g[q]["codes"]) for q in queries]
    invalid = (sum(c["code"] not in index_codes for q in queries for c in g[q]["codes"])
               / max(1, sum(codes_per_q))) if index_codes else None
    timed = [g[q]["timings_ms"] for q in queries if "timings_ms" in g[q]]
    timings = ({k: statistics.median(t[k] for t in timed if k in t) for k in timed[0]}
               if timed else None)
    out = {"codes_per_query": statistics.mean(codes_per_q),
           "invalid_code_rate": invalid, "median_timings_ms": timings}
    candidates = [g[q]["candidates"] for q in queries if "candidates" in g[q]]
    if candidates:
        out["mean_candidates"] = statistics.mean(candidates)
    return out


TABLE = ["ndcg@10", "recall@10", "recall@100", "recall@300", "relevance_rate@300", "judged@10"]
# Unjudged as unknown by condensed lists (metrics.py); recall@300 of a 300-deep ranking is the
# same condensed or not.
CONDENSED = ["condensed_ndcg@10", "condensed_recall@10", "condensed_recall@100"]


def table(rows, keys=TABLE):
    lines = ["| system | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, s in rows:
        lines.append(f"| {name} | " + " | ".join("—" if s[k] is None else f"{100 * s[k]:.2f}"
                                                 for k in keys) + " |")
    return "\n".join(lines)


# The issue's targets compare with BM25 on these (judged@10 is a diagnostic, not a target).
VERSUS = ["ndcg@10", "recall@10", "recall@100", "recall@300", "relevance_rate@300",
          "condensed_ndcg@10"]


def versus_table(vs):
    """Each system against BM25, query by query: mean difference in points, the bootstrap 95 %
    interval, and how many queries went up / down."""
    lines = ["| system − BM25 | " + " | ".join(VERSUS) + " |", "|---" * (len(VERSUS) + 1) + "|"]
    for name, per in vs.items():
        cells = []
        for k in VERSUS:
            p = per[k]
            cells.append("—" if p["mean_diff"] is None else
                         f"{100 * p['mean_diff']:+.2f} [{100 * p['ci95'][0]:+.1f}, "
                         f"{100 * p['ci95'][1]:+.1f}] {p['up']}↑{p['down']}↓")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--gram", default=str(C.REPO / "target" / "release" / "gram"))
    ap.add_argument("--k", type=int, default=300)
    ap.add_argument("--name", default=None, help="default: the model dir's name")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--beam", type=int, default=10, help="query-side beam (codes per query)")
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--judgements", default=None,
                    help="judged queries: a judged.jsonl or a CSV with query, docid/product_id/id "
                         "and rating/grade/final_rating columns (default: WORK/judged.jsonl, the "
                         "90 visible queries); e.g. the held-out 45 when they are given")
    ap.add_argument("--fusion-weight", type=float, default=None,
                    help="BM25 + GRAM score-fusion weight (default: fitted on the synthetic "
                         "validation queries)")
    ap.add_argument("--settings", default=None,
                    help="score with this gram.json instead of the model's (same index; "
                         "e.g. other weights); name it with --name")
    args = ap.parse_args(argv)
    if args.k < 300:
        # Recall@100/300 and the relevance rate@300 of a shorter list would be the list's own.
        ap.error(f"--k {args.k}: the report's deepest cut-off is 300; use --k 300 or more")
    work, model = Path(args.work), Path(args.model)
    name = args.name or model.name + ("" if args.beam == 10 else f"-beam{args.beam}")
    search_model = (settings_model(model, Path(args.settings), work / f"settings-{name}")
                    if args.settings else None)
    judged = M.read_judgements(args.judgements or work / "judged.jsonl")
    queries = sorted(judged)
    items = C.read_catalog(model / "catalog.jsonl")
    catalog_ids = {it["id"] for it in items}
    missing = sum(d not in catalog_ids for gr in judged.values() for d in gr)
    if missing:
        print(f"evaluate: {missing} judged products are not in the catalog: left out",
              file=sys.stderr)
    kept = {q: {d: g for d, g in gr.items() if d in catalog_ids} for q, gr in judged.items()}
    # A query that had grades and has none left cannot be judged: left out (as `gram eval`).
    emptied = sorted(q for q in judged if judged[q] and not kept[q])
    if emptied:
        print(f"evaluate: {len(emptied)} queries have none of their judged products in the "
              f"catalog: left out", file=sys.stderr)
    judged = {q: gr for q, gr in kept.items() if q not in emptied}
    queries = sorted(judged)
    idx = work / f"eval-index-{model.name}"
    g, build_s, wall = gram_run(args.gram, model, model / "catalog.jsonl", idx,
                                queries, args.k, args.rebuild, args.beam, search_model)
    gram_runs = {q: [p["id"] for p in g[q]["products"]] for q in queries}
    bm25 = Bm25([p for p in C.load_products() if str(p["id"]) in catalog_ids])
    lex = bm25.run(queries, max(args.k, FUSION_DEPTH))
    bm = {q: [d for d, _ in lex[q][:args.k]] for q in queries}
    if args.fusion_weight is None:
        fusion = fit_fusion(args.gram, model, idx, work, items, bm25, args.k, args.beam,
                            search_model)
    else:
        fusion = {"weight": args.fusion_weight, "criterion": "--fusion-weight"}
    union = {q: M.interleave(gram_runs[q], bm[q], args.k) for q in queries}
    fused = {q: M.fuse(lex[q], gram_runs[q], fusion["weight"], args.k) for q in queries}
    # Reciprocal rank fusion of BM25's ranking (as deep as the score fusion reads it) and
    # GRAM's top k.
    rrf = {q: M.rrf([[d for d, _ in lex[q][:FUSION_DEPTH]], gram_runs[q]], args.k)
           for q in queries}
    summary = {"gram": M.summarize(gram_runs, judged), "bm25": M.summarize(bm, judged),
               "gram+bm25": M.summarize(union, judged), "gram+bm25 fused": M.summarize(fused, judged),
               "gram+bm25 rrf": M.summarize(rrf, judged), "fusion": fusion}
    summary["vs_bm25"] = {name: {m: M.paired(runs, bm, judged, m) for m in VERSUS}
                          for name, runs in (("gram", gram_runs), ("gram+bm25", union),
                                             ("gram+bm25 fused", fused), ("gram+bm25 rrf", rrf))}
    index_codes = set((model / "codes.txt").read_text().splitlines()) if (model / "codes.txt").exists() else None
    summary["gram"].update(gram_stats(g, queries, index_codes))
    summary["gram"].update({"search_wall_seconds": round(wall, 2),
                            "index_build_seconds": None if build_s is None else round(build_s, 1)})
    if not args.no_cold:
        summary["cold_start"] = cold_start(model, work)
    per_query = {q: {"relevant": sum(v >= M.REL for v in judged[q].values()),
                     "gram_codes": [c["code"] for c in g[q]["codes"]],
                     "gram_recall@300": M.recall(gram_runs[q], judged[q], 300),
                     "bm25_recall@300": M.recall(bm[q], judged[q], 300),
                     "gram_ndcg@10": M.ndcg(gram_runs[q], judged[q], 10),
                     "bm25_ndcg@10": M.ndcg(bm[q], judged[q], 10),
                     "fused_recall@300": M.recall(fused[q], judged[q], 300),
                     "fused_ndcg@10": M.ndcg(fused[q], judged[q], 10),
                     "rrf_recall@300": M.recall(rrf[q], judged[q], 300),
                     "rrf_ndcg@10": M.ndcg(rrf[q], judged[q], 10),
                     "gram_condensed_ndcg@10": M.ndcg(M.condense(gram_runs[q], judged[q]),
                                                      judged[q], 10),
                     "bm25_condensed_ndcg@10": M.ndcg(M.condense(bm[q], judged[q]), judged[q], 10),
                     "fused_condensed_ndcg@10": M.ndcg(M.condense(fused[q], judged[q]),
                                                       judged[q], 10)} for q in queries}
    res = {"model": str(model), "judgements": str(args.judgements or work / "judged.jsonl"),
           "queries": len(queries), "k": args.k, "beam": args.beam,
           "gram_json": json.loads(((search_model or model) / "gram.json").read_text()),
           "summary": summary,
           "per_query": per_query}
    with C.replacing(work / f"eval-{name}.json") as f:
        f.write(json.dumps(res, indent=1) + "\n")
    rows = [("GRAM (" + name + ")", summary["gram"]), ("BM25", summary["bm25"]),
            ("GRAM ∪ BM25 interleaved", summary["gram+bm25"]),
            (f"GRAM ∪ BM25 fused (weight {fusion['weight']})", summary["gram+bm25 fused"]),
            (f"GRAM ∪ BM25 RRF (k {M.RRF_K})", summary["gram+bm25 rrf"])]
    print(table(rows))
    print("unjudged left out of each ranking (condensed lists):")
    print(table(rows, CONDENSED))
    print("against BM25, query by query (mean difference in points, bootstrap 95 % interval, "
          "queries up / down):")
    print(versus_table(summary["vs_bm25"]))
    print(json.dumps({k: v for k, v in summary["gram"].items() if not k.startswith("n_")}, indent=1))
    if "cold_start" in summary:
        print(json.dumps(summary["cold_start"]))


if __name__ == "__main__":
    main()
