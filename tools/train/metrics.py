"""Retrieval metrics over graded judgements (standard library only).

`grades` is {docid: grade 0..3} for one query; `ranked` the retrieved ids, best first.
Relevant = grade >= REL (2). Unjudged products are *unknown*: they count as not relevant for
nDCG and recall (gain 0, never in the relevant set: the standard, pessimistic reading of a
shallow pool), and are left out of the relevance rate, which is measured among the judged
products of the top k only. `judged_at` says how much of a ranking the pool covers.

The *condensed* metrics (Sakai, "Alternatives to Bpref", SIGIR 2007) read unjudged as unknown
the other standard way: the unjudged products are taken out of the ranking first, and nDCG and
recall are computed on what is left, so a system is neither punished nor rewarded for products
the pool never saw. A ranking cut at k loses nothing relevant by condensing, so the condensed
recall@k of a k-deep ranking is its recall@k: only the cut-offs above the ranking's shallower
ones (nDCG@10, recall@10 and @100 of a 300-deep ranking) can move.
"""
import csv
import io
import json
import math
import random
from pathlib import Path

REL = 2
MAX_GRADE = 10  # as `gram eval` (src/eval.rs)


def dcg(gains):
    return sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(gains))


def ndcg(ranked, grades, k=10):
    """nDCG@k with gain 2^grade - 1; the ideal ranking orders every judged product by grade.
    None when the query has no product with grade > 0."""
    ideal = dcg(sorted(grades.values(), reverse=True)[:k])
    if ideal <= 0:
        return None
    return dcg([grades.get(d, 0) for d in ranked[:k]]) / ideal


def recall(ranked, grades, k):
    """|top k ∩ relevant| / |relevant|; None when nothing is relevant."""
    rel = {d for d, g in grades.items() if g >= REL}
    if not rel:
        return None
    return len(rel & set(ranked[:k])) / len(rel)


def relevance_rate(ranked, grades, k=300):
    """Among the judged products of the top k, the fraction relevant; None when none is
    judged."""
    judged = [d for d in ranked[:k] if d in grades]
    if not judged:
        return None
    return sum(grades[d] >= REL for d in judged) / len(judged)


def judged_at(ranked, grades, k=10):
    top = ranked[:k]
    return sum(d in grades for d in top) / len(top) if top else None


def interleave(a, b, k):
    """A ∪ B as one ranking: alternate picks (A first), duplicates skipped, at most k."""
    out, seen = [], set()
    for x, y in zip(a + [None] * max(0, len(b) - len(a)), b + [None] * max(0, len(a) - len(b))):
        for d in (x, y):
            if d is not None and d not in seen:
                seen.add(d)
                out.append(d)
    return out[:k]


def fuse(lexical, gram, weight, k):
    """A ∪ B by score fusion: each product scores its lexical score over the query's best
    lexical score (0 when `lexical` does not hold it) plus `weight` when GRAM's top k holds
    it; the top k by that score. `lexical` is [(id, score)] best first (deeper than k, so the
    products GRAM brings keep their lexical score; an entry of score 0 or less was not
    retrieved and counts as absent), `gram` the GRAM ranking (ids). Ties go by lexical rank,
    then by GRAM rank: products only GRAM holds keep GRAM's order. weight = 0 is the lexical
    ranking alone (no GRAM product fills it up); a weight above 1 puts every GRAM product
    first, in lexical order."""
    lexical = [(d, s) for d, s in lexical if s > 0]
    best = lexical[0][1] if lexical else 1.0
    score, lex_rank, gram_rank = {}, {}, {}
    for r, (d, s) in enumerate(lexical):
        if d not in score:
            score[d] = s / best
            lex_rank[d] = r
    for r, d in enumerate(gram[:k] if weight > 0 else []):
        if d not in gram_rank:
            gram_rank[d] = r
            score[d] = score.get(d, 0.0) + weight
    far = len(lexical) + len(gram)
    order = sorted(score, key=lambda d: (-score[d], lex_rank.get(d, far), gram_rank.get(d, far)))
    return order[:k]


# Reciprocal rank fusion's constant (Cormack, Clarke and Büttcher, SIGIR 2009): the value of the
# paper, which the hybrid-search engines (Elasticsearch, OpenSearch, Vespa) take as their default.
RRF_K = 60


def rrf(runs, k, c=RRF_K):
    """A ∪ B by reciprocal rank fusion: each product scores the sum over `runs` (rankings of
    ids, best first) of 1 / (c + its 1-based rank there); the top k by that score. Ties keep
    the order of first appearance, runs in the order given. Nothing to fit."""
    score = {}
    for run in runs:
        for rank, d in enumerate(run, 1):
            score[d] = score.get(d, 0.0) + 1.0 / (c + rank)
    order = sorted(score.items(), key=lambda x: -x[1])  # stable: ties keep first appearance
    return [d for d, _ in order[:k]]


def condense(ranked, grades):
    """The ranking with its unjudged products taken out (order kept)."""
    return [d for d in ranked if d in grades]


# How deep a ranking the condensed metrics read: the top 300 whatever `--k`, as `gram eval`
# (`eval::CONDENSE_DEPTH`): a deeper list would bring judged products from below rank 300 in.
CONDENSE_DEPTH = 300


METRICS = {"ndcg@10": lambda r, g: ndcg(r, g, 10),
           "recall@10": lambda r, g: recall(r, g, 10),
           "recall@100": lambda r, g: recall(r, g, 100),
           "recall@300": lambda r, g: recall(r, g, 300),
           "relevance_rate@300": lambda r, g: relevance_rate(r, g, 300),
           "judged@10": lambda r, g: judged_at(r, g, 10),
           "condensed_ndcg@10": lambda r, g: ndcg(condense(r[:CONDENSE_DEPTH], g), g, 10),
           "condensed_recall@10": lambda r, g: recall(condense(r[:CONDENSE_DEPTH], g), g, 10),
           "condensed_recall@100": lambda r, g: recall(condense(r[:CONDENSE_DEPTH], g), g, 100)}


def summarize(runs, judged):
    """{metric: mean over the queries where it is defined, n_<metric>: how many} for one
    system; `runs` {query: ranked ids}."""
    out = {}
    for name, f in METRICS.items():
        vals = [f(runs.get(q, []), g) for q, g in judged.items()]
        vals = [v for v in vals if v is not None]
        out[name] = sum(vals) / len(vals) if vals else None
        out["n_" + name] = len(vals)
    out["mean_returned"] = sum(len(runs.get(q, [])) for q in judged) / max(len(judged), 1)
    return out


def paired(runs, base, judged, metric, samples=10000, seed=0):
    """System `runs` against system `base` on one metric, query by query (only the queries
    where the metric is defined): the mean difference, how many queries went up and down, and
    a percentile bootstrap 95 % interval of the mean difference (`samples` resamples of the
    queries with replacement, a fixed seed, so a rerun gives the same interval). The interval
    says whether a difference between two systems on this many queries is more than noise."""
    f = METRICS[metric]
    diffs = []
    for q, g in judged.items():
        a, b = f(runs.get(q, []), g), f(base.get(q, []), g)
        if a is not None and b is not None:
            diffs.append(a - b)
    if not diffs:
        return {"n": 0, "mean_diff": None, "up": 0, "down": 0, "ci95": None}
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(rng.choice(diffs) for _ in range(n)) / n for _ in range(samples))
    # As many resamples below the interval as above it (2.5 % each side).
    tail = int(0.025 * samples)
    lo, hi = means[tail], means[samples - 1 - tail]
    return {"n": n, "mean_diff": sum(diffs) / n, "up": sum(d > 1e-12 for d in diffs),
            "down": sum(d < -1e-12 for d in diffs), "ci95": [lo, hi]}


PRODUCT_COLUMNS = ("docid", "product_id", "id")
GRADE_COLUMNS = ("rating", "grade", "final_rating")


def read_judgements(path):
    """{query: {product id: grade}} from `judged.jsonl` (`{"query", "grades"}` a line, what
    pairs.py writes) or from a CSV whose header names `query`, a product column (docid /
    product_id / id) and a grade column (rating / grade / final_rating), read as `gram eval`
    (src/eval.rs) reads them: a UTF-8 byte-order mark ignored; `.csv` is CSV, `.jsonl` / `.json`
    JSONL, any other name JSONL when its text starts with `{`; header names trimmed and in any
    case; grades `int(float(x))` in 0..=MAX_GRADE (JSONL grades must be numbers); CSV rows with
    an empty grade skipped; a row with another number of fields than the header, or an empty
    product id, refused; a later row of the same (query, product) wins. A malformed line or a
    missing column is a ValueError naming the file and line."""
    out = {}

    def grade(g):
        # As `gram eval`: whole grades in 0..=MAX_GRADE (a negative gain made nDCG exceed 1; from
        # 1,024 up 2**g overflows).
        g = int(float(g))
        if not 0 <= g <= MAX_GRADE:
            raise ValueError(f"grade {g} is outside 0..={MAX_GRADE}")
        return g

    with open(path, encoding="utf-8-sig", newline="") as f:
        text = f.read()
    suffix = Path(path).suffix.lower()  # a dot in a folder's name is no extension
    if suffix == ".csv":
        is_csv = True
    elif suffix in (".jsonl", ".json"):
        is_csv = False
    else:
        is_csv = not text.lstrip().startswith("{")
    if not is_csv:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                grades = {}
                for d, g in r["grades"].items():
                    if isinstance(g, bool) or not isinstance(g, (int, float)):
                        raise ValueError(f"the grade of product {d!r} is not a number: {g!r}")
                    grades[str(d)] = grade(g)
                if not isinstance(r["query"], str):
                    raise ValueError("no string \"query\"")
                out.setdefault(r["query"], {}).update(grades)
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
                raise ValueError(f"{path}:{n}: not a judgement line ({e})") from None
        return out
    rows = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(rows, [])]
    pcol = next((header.index(c) for c in PRODUCT_COLUMNS if c in header), None)
    gcol = next((header.index(c) for c in GRADE_COLUMNS if c in header), None)
    if "query" not in header or pcol is None or gcol is None:
        raise ValueError(f"{path}:1: the header needs query, one of {PRODUCT_COLUMNS} and "
                         f"one of {GRADE_COLUMNS}; it has {header}")
    qcol = header.index("query")
    for r in rows:
        n = rows.line_num
        if not r or r == [""]:
            continue
        if len(r) != len(header):
            raise ValueError(f"{path}:{n}: {len(r)} fields, the header has {len(header)}")
        g = r[gcol].strip()
        if not g:
            continue
        d = r[pcol].strip()
        if not d:
            raise ValueError(f"{path}:{n}: empty product id")
        try:
            out.setdefault(r[qcol], {})[d] = grade(g)
        except (ValueError, TypeError, OverflowError) as e:
            raise ValueError(f"{path}:{n}: grade {g!r} ({e})") from None
    return out
