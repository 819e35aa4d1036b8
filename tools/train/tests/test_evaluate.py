"""evaluate.py's handling of the engine's answers: blank and refused queries score as no
products, and the summary reads timings of the queries the engine answered only. Standard
library only (a stand-in `gram` script answers `gram search`)."""
import contextlib
import io
import json
import os
import sys
import tempfile
import unittest
from pathlib import Path

from tools.train import evaluate as E

# `gram search` as the engine runs it: one JSON line a query, in order, and at a query it
# refuses the error on stderr and exit status 1 (what came before stays on stdout).
FAKE_GRAM = r'''
import json, sys
args = sys.argv[1:]
assert args[0] == "search", args
if "FAIL" in args:
    print("error: index x: damaged", file=sys.stderr)
    sys.exit(1)
queries = args[args.index("--") + 1:]
# As `gram search` since the forty-third session: every query is checked before any is
# searched; a refused one is named by its place (from 1) and nothing is printed.
for i, q in enumerate(queries):
    if len(q.encode()) > 40:
        print(f"error: query {i + 1} ({q[:40]!r}): invalid input: query: {len(q.encode())} "
              "bytes, at most 40 allowed", file=sys.stderr)
        sys.exit(1)
for q in queries:
    # A query whose rows go non-finite fails as it is searched, after those before it.
    if q == "NAN":
        print("error: numeric: non-finite log-probabilities", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"query": q, "codes": [{"code": "c " + q}],
                      "products": [{"id": str(len(q)), "title": q}],
                      "timings_ms": {"total": float(len(q)), "open": 1.0},
                      "candidates": len(q)}))
'''


class GramRun(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        d = Path(self.tmp.name)
        self.gram = d / "gram"
        self.gram.write_text(f"#!{sys.executable}\n" + FAKE_GRAM)
        os.chmod(self.gram, 0o755)
        self.idx = d / "idx"
        self.idx.mkdir()
        (self.idx / "index.gram").write_text("")

    def tearDown(self):
        self.tmp.cleanup()

    def run_queries(self, queries):
        with contextlib.redirect_stderr(io.StringIO()):
            return E.gram_run(str(self.gram), self.tmp.name, "catalog.jsonl", self.idx, queries,
                              300, False)

    def test_a_refused_query_gets_no_products(self):
        # Before the fortieth session a query the engine refused (too long) made `gram search`
        # exit nonzero and ended the whole evaluation.
        long1, long2 = "wireless " * 6, "x" * 41
        queries = sorted(["", "  ", "mouse", long1, "hdmi cable", long2, "ssd"])
        g, _, _ = self.run_queries(queries)
        self.assertEqual(sorted(g), queries)
        for q in ("", "  ", long1, long2):
            self.assertEqual(g[q]["products"], [], q)
            self.assertEqual(g[q]["codes"], [], q)
        for q in ("mouse", "hdmi cable", "ssd"):
            self.assertEqual([p["id"] for p in g[q]["products"]], [str(len(q))], q)

    def test_a_query_that_fails_alone_gets_no_products(self):
        # `gram eval` keeps such a query (counted refused); evaluate.py stopped on it.
        queries = sorted(["mouse", "NAN", "ssd"])
        g, _, _ = self.run_queries(queries)
        self.assertEqual(g["NAN"]["products"], [])
        for q in ("mouse", "ssd"):
            self.assertEqual([p["id"] for p in g[q]["products"]], [str(len(q))], q)

    def test_other_failures_still_stop(self):
        with self.assertRaises(SystemExit):
            self.run_queries(["mouse", "FAIL"])

    def test_summary_over_answered_queries(self):
        # A blank query sorts first; its stub has no timings: `g[queries[0]]["timings_ms"]`
        # raised a KeyError after the whole run.
        queries = sorted(["", "mouse", "x" * 50, "hdmi cable"])
        g, _, _ = self.run_queries(queries)
        s = E.gram_stats(g, queries, {"c mouse"})
        self.assertEqual(s["median_timings_ms"], {"total": 7.5, "open": 1.0})
        self.assertEqual(s["mean_candidates"], 7.5)
        self.assertEqual(s["codes_per_query"], 0.5)
        self.assertEqual(s["invalid_code_rate"], 0.5)
        json.dumps(s)
        # Nothing answered: no timings, no candidates.
        s = E.gram_stats(g, [""], None)
        self.assertIsNone(s["median_timings_ms"])
        self.assertNotIn("mean_candidates", s)


if __name__ == "__main__":
    unittest.main()
