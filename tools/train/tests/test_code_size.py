"""The code-size stage's choice and gram.json edit (standard library only)."""
import argparse
import unittest

from tools.train import code_size as S


class CodeSize(unittest.TestCase):
    def test_choice_by_ndcg_then_recall_then_the_smaller_weight(self):
        r = lambda b, n, r300: {"beta": b, "ndcg@10": n, "recall@300": r300}
        self.assertEqual(S.choose([r(0, 0.70, 0.80), r(0.25, 0.75, 0.79), r(0.5, 0.74, 0.90)])["beta"], 0.25)
        # nDCG@10 tied: the higher Recall@300.
        self.assertEqual(S.choose([r(0.1, 0.75, 0.80), r(0.3, 0.75, 0.81)])["beta"], 0.3)
        # Both tied: the smaller weight, the smaller change from the gram.json of before.
        self.assertEqual(S.choose([r(0.3, 0.75, 0.81), r(0.0, 0.75, 0.81), r(0.2, 0.75, 0.81)])["beta"], 0.0)
        with self.assertRaises(ValueError):
            S.choose([])

    def test_gram_json_gets_the_weight_and_keeps_the_rest(self):
        base = {"weights": {"coarse": -0.7, "medium": 0.7, "fine": -1.0}, "aggregation": "max",
                "code_logprob": {"weight": 0.79, "per_token": True}}
        out = S.with_code_size(base, 0.25)
        self.assertEqual(out["code_size"], {"weight": 0.25})
        self.assertEqual({k: v for k, v in out.items() if k != "code_size"}, base)
        self.assertNotIn("code_size", base)  # not edited in place
        # 0: no key, the gram.json of before (and a previous weight is taken out).
        self.assertEqual(S.with_code_size(out, 0.0), base)

    def test_grid_parsing(self):
        self.assertEqual(S.grid_values("0.25, 0,0.25,1"), [0.0, 0.25, 1.0])
        for bad in ("", "-0.1", "x", "1e7"):
            with self.assertRaises((argparse.ArgumentTypeError, ValueError)):
                S.grid_values(bad)


if __name__ == "__main__":
    unittest.main()
