"""Keep the judged queries that no model of a comparison trained on, not even as a typo twin.

    python -m tools.train.clean_queries --judgements J --train T1 [T2 ...] --out FILE

J: judgements JSONL (`{"query", "grades"}`, as `synth_judgements` writes them). Each T: a
`queries-train.jsonl` of one model's run. A query of J is kept when its split key
(`pairs.split_key`: letter and digit runs sorted, so word order, `tn-2110` / `tn2110` and
`gray` / `grey` fold) is not within one edit of the split key of any training query: not equal,
and sharing no one-character deletion (of the key, or of one of its words with the words sorted
again: a typo that changes its word's place in the sorted key is still one edit). One shared
deletion covers what `pairs.typo` does to a word (drop, double, swap two letters) and a
substituted letter; a query two edits away from every training query is kept.

Why: two models trained on different splits are compared on queries neither saw. Filtering by
exact string (as a first comparison did) left typo twins and reordered variants of one model's
training queries in the set, which favours that model.
"""
import argparse
import json
from pathlib import Path

from tools.train.pairs import read_jsonl, split_key


def deletions(key):
    """The key and each string one character shorter: two keys within one edit share one. Also
    with the character taken from one word and the words sorted again, as the split key sorts
    them: a typo can move its word (`canon cartridge`, `caetridge canon`)."""
    out = {key} | {key[:i] + key[i + 1:] for i in range(len(key))}
    words = key.split(" ")
    for j, w in enumerate(words):
        for i in range(len(w)):
            shorter = words[:j] + [w[:i] + w[i + 1:]] + words[j + 1:]
            out.add(" ".join(sorted(x for x in shorter if x)))
    return out


def clean(judged, trained_queries):
    """The entries of `judged` whose split key is not within one edit of a trained query's."""
    seen = set()
    for q in trained_queries:
        seen |= deletions(split_key(q))
    return [j for j in judged if not (deletions(split_key(j["query"])) & seen)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judgements", required=True)
    ap.add_argument("--train", required=True, nargs="+", help="queries-train.jsonl of each model")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    judged = read_jsonl(args.judgements)
    trained = [r["query"] for t in args.train for r in read_jsonl(t)]
    kept = clean(judged, trained)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for j in kept:
            f.write(json.dumps(j, ensure_ascii=False) + "\n")
    tmp.replace(out)
    print(f"{len(kept)} of {len(judged)} queries kept ({len(trained)} training queries) -> {out}")


if __name__ == "__main__":
    main()
