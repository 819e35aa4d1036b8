"""Metrics on hand-computed cases (standard library only)."""
import importlib.util
import math
import os
import random
import unittest

from tools.train import metrics as M

G = {"a": 3, "b": 2, "c": 1, "d": 0}  # relevant (>= 2): a, b


class Metrics(unittest.TestCase):
    def test_ndcg(self):
        self.assertAlmostEqual(M.ndcg(["a", "b", "c", "d"], G), 1.0)
        # b first, unjudged x, then a: (3 + 0 + 7/2) / (7 + 3/log2(3) + 1/2)
        want = (3 / 1 + 0 + 7 / 2) / (7 + 3 / math.log2(3) + 1 / 2)
        self.assertAlmostEqual(M.ndcg(["b", "x", "a"], G), want)
        self.assertIsNone(M.ndcg(["a"], {"a": 0}))
        self.assertEqual(M.ndcg(["x", "y"], G), 0.0)

    def test_recall(self):
        self.assertEqual(M.recall(["a", "x", "b"], G, 2), 0.5)
        self.assertEqual(M.recall(["a", "x", "b"], G, 3), 1.0)
        self.assertEqual(M.recall(["c", "d"], G, 10), 0.0)  # grade 1 is not relevant
        self.assertIsNone(M.recall(["a"], {"a": 1}, 10))

    def test_relevance_rate_ignores_unjudged(self):
        self.assertEqual(M.relevance_rate(["a", "x", "y", "d"], G), 0.5)  # a of {a, d}
        self.assertIsNone(M.relevance_rate(["x", "y"], G))
        self.assertEqual(M.judged_at(["a", "x", "y", "d"], G, 4), 0.5)

    def test_condensed(self):
        # unjudged x, y out: b, a, c, d; nDCG@10 (3 + 7/log2(3) + 1/2 + 0) / ideal
        ranked = ["x", "b", "y", "a", "c", "d"]
        self.assertEqual(M.condense(ranked, G), ["b", "a", "c", "d"])
        ideal = 7 + 3 / math.log2(3) + 1 / 2
        s = M.summarize({"q": ranked}, {"q": G})
        self.assertAlmostEqual(s["condensed_ndcg@10"], (3 + 7 / math.log2(3) + 1 / 2) / ideal)
        self.assertAlmostEqual(s["ndcg@10"], (3 / math.log2(3) + 7 / math.log2(5)
                                              + 1 / math.log2(6)) / ideal)
        # a behind ten unjudged: out of the raw top 10, first once condensed
        only_x = M.summarize({"q": ["x"] * 10 + ["a"]}, {"q": G})
        self.assertEqual(only_x["recall@10"], 0.0)
        self.assertEqual(only_x["condensed_recall@10"], 0.5)  # a of {a, b}
        self.assertAlmostEqual(only_x["condensed_ndcg@10"], 7 / ideal)
        # nothing judged: condensed to nothing, 0 (not undefined)
        none = M.summarize({"q": ["x", "y"]}, {"q": G})
        self.assertEqual(none["condensed_ndcg@10"], 0.0)
        self.assertEqual(none["condensed_recall@100"], 0.0)
        # a at rank 301 of a deeper list: outside the condensed top 300 (as `gram eval`); at
        # rank 300 inside
        for unjudged, found in ((M.CONDENSE_DEPTH, 0.0), (M.CONDENSE_DEPTH - 1, 0.5)):
            deep = M.summarize({"q": ["x"] * unjudged + ["a", "y"]}, {"q": G})
            self.assertEqual(deep["condensed_recall@10"], found)

    def test_interleave(self):
        self.assertEqual(M.interleave(["a", "b", "c"], ["b", "x"], 10), ["a", "b", "x", "c"])
        self.assertEqual(M.interleave(["a"], ["x", "y", "z"], 3), ["a", "x", "y"])

    def test_fuse(self):
        lex = [("a", 10.0), ("b", 8.0), ("c", 5.0), ("d", 1.0)]  # normalized 1, .8, .5, .1
        # weight 0: the lexical ranking, cut at k
        self.assertEqual(M.fuse(lex, ["d", "x"], 0.0, 3), ["a", "b", "c"])
        # ... and no GRAM product fills a short lexical list
        self.assertEqual(M.fuse(lex, ["x", "d"], 0.0, 10), ["a", "b", "c", "d"])
        # 0.3: d 0.1 + 0.3 = 0.4 stays below c 0.5; x (GRAM only) 0.3 below d
        self.assertEqual(M.fuse(lex, ["d", "x"], 0.3, 10), ["a", "b", "c", "d", "x"])
        # 0.45: d 0.55 passes c 0.5; x (0.45) stays below c
        self.assertEqual(M.fuse(lex, ["d", "x"], 0.45, 10), ["a", "b", "d", "c", "x"])
        # 0.25: b 1.05 passes a 1.0
        self.assertEqual(M.fuse(lex, ["b"], 0.25, 2), ["b", "a"])
        # above 1: every GRAM product first, lexical order among them, then GRAM-only ones
        self.assertEqual(M.fuse(lex, ["x", "c", "a"], 2.0, 4), ["a", "c", "x", "b"])
        # GRAM beyond its top k counts nothing; no lexical scores at all: GRAM's order
        self.assertEqual(M.fuse(lex, ["x", "d"], 2.0, 1), ["x"])
        self.assertEqual(M.fuse([], ["y", "x"], 0.3, 5), ["y", "x"])
        # a lexical score of 0 is no hit (bm25s pads its top k with them): GRAM's order rules
        # the products only GRAM holds, whatever order the padding had
        self.assertEqual(M.fuse([("a", 0.0), ("b", 0.0)], ["b"], 0.1, 5), ["b"])
        self.assertEqual(M.fuse([("a", 1.0), ("z", 0.0), ("y", 0.0)], ["x", "y", "z"], 0.5, 3),
                         ["a", "x", "y"])
        # a product twice in GRAM's list counts its weight once
        self.assertEqual(M.fuse([("a", 1.0)], ["b", "b"], 0.6, 5), ["a", "b"])

    @unittest.skipIf(importlib.util.find_spec("bm25s") is None
                     and os.environ.get("GRAM_REQUIRE_TORCH") != "1",
                     "bm25s not installed (it is in the .venv of tools/train-requirements.txt)")
    def test_bm25_returns_only_products_that_match(self):
        # bm25s pads its top k with score-0 products when fewer match; those are not hits
        from tools.train.evaluate import Bm25
        products = [{"id": i, "title": t} for i, t in enumerate(
            ["green velvet sofa", "oak table", "steel lamp", "wool rug", "glass vase"])]
        run = Bm25(products).run(["sofa", "lamp table", "piano"], 5)
        self.assertEqual([d for d, _ in run["sofa"]], ["0"])
        self.assertEqual(sorted(d for d, _ in run["lamp table"]), ["1", "2"])
        self.assertEqual(run["piano"], [])
        self.assertTrue(all(s > 0 for r in run.values() for _, s in r))

    def test_rrf(self):
        # c = 1: a 1/2 + 1/3, b 1/3 + 1/2 (a first: it appeared first), x 1/4, y 1/4
        self.assertEqual(M.rrf([["a", "b", "x"], ["b", "a", "y"]], 10, c=1), ["a", "b", "x", "y"])
        # c = 1: b 1/3 + 1/3 passes a 1/2, which ties z 1/2 and appeared first; x 1/4 last
        self.assertEqual(M.rrf([["a", "b", "x"], ["z", "b"]], 10, c=1), ["b", "a", "z", "x"])
        # the default c = 60: second in both (2/62) beats first in one (1/61)
        self.assertEqual(M.RRF_K, 60)
        self.assertEqual(M.rrf([["a", "b"], ["c", "b"]], 2), ["b", "a"])
        self.assertEqual(M.rrf([["a"], []], 5), ["a"])
        self.assertEqual(M.rrf([["a", "b", "c"]], 2), ["a", "b"])

    def test_read_judgements(self):
        import tempfile
        from pathlib import Path
        with tempfile.TemporaryDirectory() as d:
            j = Path(d) / "j.jsonl"
            j.write_text('{"query": "q1", "grades": {"a": 3, "b": 0}}\n\n'
                         '{"query": "q2", "grades": {"7": 2}}\n')
            self.assertEqual(M.read_judgements(j), {"q1": {"a": 3, "b": 0}, "q2": {"7": 2}})
            c = Path(d) / "j.csv"
            c.write_text("query,docid,rating\nq1,a,3.0\nq1,b,\nq2,7,1\nq1,a,2\n")
            self.assertEqual(M.read_judgements(c), {"q1": {"a": 2}, "q2": {"7": 1}})
            c.write_text("query,product_id,final_rating\nq,x,2\n")
            self.assertEqual(M.read_judgements(c), {"q": {"x": 2}})
            c.write_text("query,docid\nq,x\n")
            with self.assertRaisesRegex(ValueError, "j.csv:1: the header"):
                M.read_judgements(c)
            c.write_text("query,docid,rating\nq,x,good\n")
            with self.assertRaisesRegex(ValueError, "j.csv:2: grade 'good'"):
                M.read_judgements(c)
            j.write_text('{"query": "q1", "grades": {"a": 3}}\n{"query": "q2"}\n')
            with self.assertRaisesRegex(ValueError, "j.jsonl:2"):
                M.read_judgements(j)
            # Grades outside 0..=10, as `gram eval` refuses them (a negative gain made nDCG
            # exceed 1; 2**1024 overflowed).
            c.write_text("query,docid,rating\nq,x,-1\n")
            with self.assertRaisesRegex(ValueError, "j.csv:2: .*grade -1 is outside"):
                M.read_judgements(c)
            j.write_text('{"query": "q1", "grades": {"a": 1024}}\n')
            with self.assertRaisesRegex(ValueError, "j.jsonl:1: .*grade 1024 is outside"):
                M.read_judgements(j)

    def test_read_judgements_as_gram_eval(self):
        # The edge cases where this reader was laxer or stricter than `gram eval`'s
        # (src/eval.rs read_judgements): each now reads the same, or is refused by both.
        import tempfile
        from pathlib import Path
        with tempfile.TemporaryDirectory() as d:
            c = Path(d) / "j.csv"
            # A byte-order mark and a header in other case, padded: read as `gram eval` does.
            c.write_bytes("\ufeffQuery, DocId ,Rating\r\nq,a,2\r\n".encode())
            self.assertEqual(M.read_judgements(c), {"q": {"a": 2}})
            # A short row was read with its grade as missing and skipped without a word.
            c.write_text("query,docid,rating\nq,a\n")
            with self.assertRaisesRegex(ValueError, "j.csv:2: 2 fields, the header has 3"):
                M.read_judgements(c)
            c.write_text("query,docid,rating\nq,a,1,extra\n")
            with self.assertRaisesRegex(ValueError, "j.csv:2: 4 fields"):
                M.read_judgements(c)
            # Product ids are trimmed; an empty one is refused.
            c.write_text("query,docid,rating\nq, a ,1\nq,,2\n")
            with self.assertRaisesRegex(ValueError, "j.csv:3: empty product id"):
                M.read_judgements(c)
            c.write_text('query,docid,rating\n"q, with comma", a ,1\n')
            self.assertEqual(M.read_judgements(c), {"q, with comma": {"a": 1}})
            # JSONL grades must be numbers (a string "2" was taken).
            j = Path(d) / "j.jsonl"
            j.write_text('{"query": "q", "grades": {"a": "2"}}\n')
            with self.assertRaisesRegex(ValueError, "j.jsonl:1: .*not a number"):
                M.read_judgements(j)
            j.write_text('{"query": "q", "grades": {"a": true}}\n')
            with self.assertRaisesRegex(ValueError, "j.jsonl:1: .*not a number"):
                M.read_judgements(j)
            # `.json` is JSONL, as is a file of another name whose text starts with `{`; a
            # BOM before a JSONL line is ignored.
            for name in ("j.json", "judged.txt"):
                f = Path(d) / name
                f.write_bytes('\ufeff{"query": "q", "grades": {"a": 2.5}}\n'.encode())
                self.assertEqual(M.read_judgements(f), {"q": {"a": 2}}, name)
            f = Path(d) / "judged.txt"
            f.write_text("query,docid,rating\nq,a,3\n")
            self.assertEqual(M.read_judgements(f), {"q": {"a": 3}})

    def test_summarize(self):
        s = M.summarize({"q1": ["a", "b"], "q2": ["x"]}, {"q1": G, "q2": {"z": 3}, "q3": {"w": 0}})
        self.assertEqual(s["n_recall@10"], 2)
        self.assertEqual(s["recall@10"], 0.5)  # q1: 1, q2: 0
        self.assertEqual(s["n_ndcg@10"], 2)
        # q1 ranks a, b of a, b, c, d; q2's x is unjudged: 0
        q1 = (7 + 3 / math.log2(3)) / (7 + 3 / math.log2(3) + 1 / 2)
        self.assertAlmostEqual(s["ndcg@10"], q1 / 2)
        self.assertEqual(s["n_relevance_rate@300"], 1)
        self.assertEqual(s["relevance_rate@300"], 1.0)  # q1: a, b of a, b
        self.assertEqual(s["n_judged@10"], 2)
        self.assertEqual(s["judged@10"], 0.5)  # q1: 1, q2: 0
        self.assertEqual(s["mean_returned"], 1.0)  # (2 + 1 + 0) / 3

    def test_summarize_cutoffs(self):
        # 500 ranked ids; relevant r1..r4 at ranks 5, 50, 200, 400; a grade-0 one at 250
        ranked = [f"x{i}" for i in range(500)]
        grades = {"r1": 2, "r2": 2, "r3": 2, "r4": 2, "n": 0}
        for rank, pid in [(5, "r1"), (50, "r2"), (200, "r3"), (400, "r4"), (250, "n")]:
            ranked[rank - 1] = pid
        s = M.summarize({"q": ranked}, {"q": grades})
        self.assertEqual(s["recall@10"], 0.25)
        self.assertEqual(s["recall@100"], 0.5)
        self.assertEqual(s["recall@300"], 0.75)
        self.assertEqual(s["relevance_rate@300"], 0.75)  # r1, r2, r3 of r1, r2, r3, n
        self.assertEqual(s["judged@10"], 0.1)
        ideal = 3 * (1 + 1 / math.log2(3) + 1 / 2 + 1 / math.log2(5))
        self.assertAlmostEqual(s["ndcg@10"], 3 / math.log2(6) / ideal)


    def test_paired(self):
        judged = {"q1": {"a": 3, "b": 0}, "q2": {"c": 2, "d": 0}, "q3": {"e": 3},
                  "q4": {"f": 1}}  # q4: no relevant product, recall undefined there
        runs = {"q1": ["a"], "q2": ["d", "c"], "q3": ["x"], "q4": ["f"]}
        base = {"q1": ["b"], "q2": ["c"], "q3": ["x"], "q4": []}
        p = M.paired(runs, base, judged, "recall@10")
        # q1 1 - 0, q2 1 - 1, q3 0 - 0; q4 left out
        self.assertEqual((p["n"], p["up"], p["down"]), (3, 1, 0))
        self.assertAlmostEqual(p["mean_diff"], 1 / 3)
        lo, hi = p["ci95"]
        self.assertTrue(0.0 <= lo <= 1 / 3 <= hi <= 1.0)
        self.assertEqual(M.paired(runs, base, judged, "recall@10"), p)  # fixed seed
        # nDCG is defined wherever a grade is positive, q4 too: q1 a first (1.0) against b
        # first (0.0); q2 c second against c first; q3 0 against 0; q4 f (1.0) against nothing
        n = M.paired(runs, base, judged, "ndcg@10")
        self.assertEqual((n["n"], n["up"], n["down"]), (4, 2, 1))
        self.assertAlmostEqual(n["mean_diff"], (1.0 + (1 / math.log2(3) - 1.0) + 0.0 + 1.0) / 4)
        # the same difference on every query: the interval is that point
        same = M.paired({q: ["a", "c", "e"] for q in judged}, {q: [] for q in judged},
                        {"q1": {"a": 3}, "q2": {"c": 3}}, "recall@300")
        self.assertEqual((same["mean_diff"], same["ci95"]), (1.0, [1.0, 1.0]))
        self.assertEqual(M.paired(runs, base, {"q4": {"f": 1}}, "recall@10")["n"], 0)

    def test_paired_interval_leaves_equal_tails(self):
        # 40 resamples of 10 distinct differences: 2.5 % is one resample on each side, so the
        # interval is the 2nd lowest and the 2nd highest resampled mean (the upper end was the
        # highest, leaving one resample below the interval and none above it).
        judged = {f"q{i}": {"r": 3} for i in range(10)}
        runs = {f"q{i}": (["x"] * i + ["r"]) for i in range(10)}  # nDCG@10 of rank i + 1
        base = {q: [] for q in judged}
        p = M.paired(runs, base, judged, "ndcg@10", samples=40, seed=7)
        diffs = [M.METRICS["ndcg@10"](runs[q], judged[q]) for q in judged]
        self.assertEqual(len(set(diffs)), 10)
        rng = random.Random(7)
        means = sorted(sum(rng.choice(diffs) for _ in range(10)) / 10 for _ in range(40))
        self.assertLess(means[38], means[39])
        self.assertEqual(p["ci95"], [means[1], means[38]])

if __name__ == "__main__":
    unittest.main()
