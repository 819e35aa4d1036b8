#!/usr/bin/env python3
"""How many relevant products GRAM's codes reach at all, against how many its top K keeps.

For each beam width, runs `gram search --k 10000` over the judged queries (every candidate the
codes' posting lists give, ranked) and prints, over the queries with a relevant product
(grade >= 2): the share of their relevant products among the candidates (the recall ceiling
of that beam; a lower bound where a query has more than the 10,000 candidates `--k` can
return, counted), the share in the top K, and the queries with no relevant candidate.

  tools/candidate_recall.py --index target/default-index \
      --judgements ../shared/data/chorus-icecat/Broad_Query_Set_rated.csv --beam 10 20 50

Judgements: Chorus's CSV (`query,docid,rating`) or a judged.jsonl, as `gram eval` reads them.
Standard library only (docs/QUALITY.md, "A wider query beam").
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for tools.train
from tools.train import metrics as M  # noqa: E402


def relevant(path):
    """{query: the product ids graded 2 or more}, read as `gram eval` reads judgements
    (`tools.train.metrics.read_judgements`: Chorus's CSV or a judged.jsonl)."""
    return {q: {p for p, g in grades.items() if g >= 2}
            for q, grades in M.read_judgements(path).items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--judgements", required=True, help="Chorus CSV (query,docid,rating) or judged.jsonl")
    ap.add_argument("--beam", type=int, nargs="+", default=[10])
    ap.add_argument("--k", type=int, default=300, help="the top K compared with the ceiling")
    ap.add_argument("--gram", default="target/release/gram")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rel = {q: r for q, r in relevant(a.judgements).items() if r}
    queries = sorted(rel)
    if not queries:
        sys.exit("error: no query with a product graded 2 or more in " + a.judgements)
    for beam in a.beam:
        cmd = [a.gram, "search", "--index", a.index, "--k", "10000", "--beam", str(beam),
               "--threads", str(a.threads), "--"] + queries
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"error: {' '.join(cmd[:9])} ... failed:\n{out.stderr.strip()}")
        ceiling, top, none, seen, cut = [], [], 0, 0, 0
        for line in out.stdout.splitlines():
            d = json.loads(line)
            ids = [p["id"] for p in d["products"]]
            r = rel.get(d["query"])
            if not r:
                sys.exit(f"error: gram answered a query that was not asked: {d['query']!r}")
            got = len(r & set(ids)) / len(r)
            ceiling.append(got)
            top.append(len(r & set(ids[: a.k])) / len(r))
            none += got == 0
            seen += 1
            cut += len(ids) >= 10000
        if seen != len(queries):
            sys.exit(f"error: {seen} answers for {len(queries)} queries")
        n = len(queries)
        print(json.dumps({
            "beam": beam,
            "queries": n,
            "relevant_among_candidates": round(100 * sum(ceiling) / n, 2),
            f"relevant_in_top_{a.k}": round(100 * sum(top) / n, 2),
            "queries_with_no_relevant_candidate": none,
            # More candidates than `--k 10000` returns: the ceiling is then a lower bound.
            "queries_cut_at_10000": cut,
        }))


if __name__ == "__main__":
    main()
