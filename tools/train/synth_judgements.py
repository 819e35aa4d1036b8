"""Judgements for the synthetic validation queries, for `gram eval`.

    python -m tools.train.synth_judgements [--work WORK] [--out FILE]

A synthetic query (WORK/queries-valid.jsonl: query, the attributes it names, the products it
was made from, and what each source's query named) judges relevant, grade 3, every catalog
product that has the same value as one of its source products on every attribute that source's
query named, a missing value matching a missing one (`pairs.relevant_to`: the rule the weights
stage trains and validates on; a work directory from before `sources` judges by the first
source on the union of the attributes); every other product is unjudged. These are the queries the
model and its settings are chosen on; the judged queries of ../shared/data only report.
"""
import argparse
import collections
import json
from pathlib import Path

from tools.train import codes as C
from tools.train.pairs import read_jsonl


def judgements(items, queries):
    """[{"query", "grades": {id: 3}}] in query order."""
    by_id = {it["id"]: it for it in items}
    index = collections.defaultdict(set)  # (attribute, value or None) -> product ids
    for it in items:
        for a in C.ORDER:
            index[(a, it["attributes"].get(a))].add(it["id"])
    out = []
    for q in queries:
        sources = q.get("sources") or [{"pid": q["pids"][0], "attrs": q["attrs"]}]
        rel = set()
        for s in sources:
            if s["pid"] not in by_id:
                continue
            src = by_id[s["pid"]]
            sets = [index[(a, src["attributes"].get(a))] for a in s["attrs"]]
            rel |= set.intersection(*sets) if sets else set()
        out.append({"query": q["query"], "grades": {pid: 3 for pid in sorted(rel)}})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--out", default=None, help="default WORK/synth-valid.jsonl")
    args = ap.parse_args(argv)
    work = Path(args.work)
    items = read_jsonl(work / "catalog.jsonl")
    out = Path(args.out or work / "synth-valid.jsonl")
    js = judgements(items, read_jsonl(work / "queries-valid.jsonl"))
    with C.replacing(out) as f:
        for j in js:
            f.write(json.dumps(j, ensure_ascii=False) + "\n")
    print(f"{len(js)} queries, {sum(len(j['grades']) for j in js)} relevant pairs -> {out}")


if __name__ == "__main__":
    main()
