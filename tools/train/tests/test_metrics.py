"""Metrics on hand-computed cases (standard library only)."""
import math
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

    def test_interleave(self):
        self.assertEqual(M.interleave(["a", "b", "c"], ["b", "x"], 10), ["a", "b", "x", "c"])
        self.assertEqual(M.interleave(["a"], ["x", "y", "z"], 3), ["a", "x", "y"])

    def test_summarize(self):
        s = M.summarize({"q1": ["a", "b"], "q2": ["x"]}, {"q1": G, "q2": {"z": 3}, "q3": {"w": 0}})
        self.assertEqual(s["n_recall@10"], 2)
        self.assertEqual(s["recall@10"], 0.5)  # q1: 1, q2: 0
        self.assertEqual(s["n_ndcg@10"], 2)
        self.assertIsNone(s["relevance_rate@300"] if s["n_relevance_rate@300"] == 0 else None)
        self.assertEqual(s["n_relevance_rate@300"], 1)


if __name__ == "__main__":
    unittest.main()
