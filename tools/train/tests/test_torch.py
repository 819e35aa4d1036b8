"""Checks that need torch + transformers (skipped without them): packed rows score every code
exactly as a plain forward of prompt + code does; the co-alignment loss; S_rele's bracket
against the engine's reference formula; the code-likelihood term of the weights fit."""
import math
import os
import unittest

try:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:  # the stdlib-only CI job
    # Where the checks must run (a .venv with torch), GRAM_REQUIRE_TORCH=1 makes a missing
    # torch an error instead of eight quiet skips.
    if os.environ.get("GRAM_REQUIRE_TORCH") == "1":
        raise
    torch = None


@unittest.skipIf(torch is None, "torch/transformers not installed")
class Packing(unittest.TestCase):
    def setUp(self):
        from tools.train import common as K
        self.K = K
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=True)
        self.m = LlamaForCausalLM(cfg).eval()
        self.m.config._attn_implementation = "sdpa"

    def plain(self, prompt, code):
        with torch.no_grad():
            lp = torch.log_softmax(self.m(input_ids=torch.tensor([prompt + code])).logits[0], -1)
        P = len(prompt)
        return [lp[P - 1 + i, code[i]].item() for i in range(len(code))]

    def test_packed_equals_plain(self):
        rows = [([5, 6, 7], [[10, 11, 2], [20, 2], [30, 31, 32, 2]]), ([8, 9], [[12, 2]])]
        b = self.K.collate(rows, 0)
        with torch.no_grad():
            s, n, lp = self.K.code_logprobs(self.m, b)
        want = [self.plain(p, c) for p, cs in rows for c in cs]
        flat = [x for w in want for x in w]
        self.assertEqual(len(flat), lp.numel())
        for a, e in zip(lp.tolist(), flat):
            self.assertAlmostEqual(a, e, places=4)
        self.assertEqual(n.tolist(), [3, 2, 4, 2])
        for k, w in enumerate(want):
            self.assertAlmostEqual(s[k].item(), sum(w), places=4)

    def test_dpo_loss(self):
        from tools.train import align as A
        # Unequal rewards (winner +0.5, loser -0.75), so that swapping the two betas changes
        # the loss: 0.5·0.5 + 0.25·0.75 = 0.4375 here, 0.25·0.5 + 0.5·0.75 = 0.5 swapped.
        pol = torch.tensor([[-1.0, -2.25]])
        ref = torch.tensor([[-1.5, -1.5]])
        loss, rw, rl = A.dpo_loss(pol, ref, torch.tensor([1.0]), torch.tensor([1.0]), 0.5, 0.25)
        self.assertAlmostEqual(rw.item(), 0.5)
        self.assertAlmostEqual(rl.item(), -0.75)
        self.assertAlmostEqual(loss.item(), -math.log(1 / (1 + math.exp(-(0.25 + 0.1875)))), places=6)
        swapped, _, _ = A.dpo_loss(pol, ref, torch.tensor([1.0]), torch.tensor([1.0]), 0.25, 0.5)
        self.assertGreater(abs(swapped.item() - loss.item()), 0.01)
        f = A.length_factor(["a | b | c | d", "a | b"], [12, 12], 6.0, 1.0)
        self.assertEqual(f.tolist(), [0.5, 1.0])


@unittest.skipIf(torch is None, "torch not installed")
class Bracket(unittest.TestCase):
    def test_matches_engine_reference(self):
        from tools.train.weights import bracket
        # src/score/mod.rs s_rele_f64 with w = 1: 0 when equal, symmetric, zero-probability terms 0
        self.assertEqual(bracket([0.3, 0.7], [0.3, 0.7]), 0.0)
        self.assertAlmostEqual(bracket([0.2], [0.6]), bracket([0.6], [0.2]))
        a, b = 0.2, 0.6
        self.assertAlmostEqual(bracket([a], [b]), a * math.log(2 * a / (a + b)) + b * math.log(2 * b / (a + b)))
        self.assertAlmostEqual(bracket([0.0], [0.5]), 0.5 * math.log(2))


@unittest.skipIf(torch is None, "torch not installed")
class CodePrior(unittest.TestCase):
    """The code-likelihood term as weights.py fits it and the engine's `code_prior` adds it
    (src/score/: alpha * the code's token + EOS log-probability, summed or per token, added to
    each code's S_rele before the aggregation)."""

    def test_loglik_forms(self):
        from tools.train.weights import code_loglik
        pq = [0.5, 0.25, 0.8]  # two code tokens and the EOS
        lp = math.log(0.5) + math.log(0.25) + math.log(0.8)
        self.assertEqual(code_loglik(pq, "none"), 0.0)
        self.assertAlmostEqual(code_loglik(pq, "sum"), lp)
        self.assertAlmostEqual(code_loglik(pq, "mean"), lp / 3)

    def test_scores_by_hand(self):
        from tools.train.weights import FORMS, form_scores
        # The hand-computed case of src/score/ (prior_ranks_the_likely_code_first_by_hand):
        # product 0 reached through the unlikely code 1 (D = 0, L = -3), product 1 through the
        # likely code 0 (D = 0.0424747, L = -0.1); w = -1.
        d = 0.5 * math.log(1 / 0.75) + 0.25 * math.log(0.5 / 0.75)
        D = torch.tensor([[float("nan"), 0.0], [d, float("nan")]])
        g = torch.tensor([0, 0])
        L = torch.tensor([[0.0, -0.1, -0.05], [0.0, -3.0, -1.5]])
        item = (D, g, torch.tensor([False, True]), L)
        self.assertEqual(FORMS, ("none", "sum", "mean"))
        for agg in ("max", "sum"):
            s = form_scores(torch.tensor([-1.0, -1.0, -1.0, 0.0]), item, agg, "none")
            self.assertAlmostEqual(s[0].item(), 0.0, places=6)
            self.assertAlmostEqual(s[1].item(), -0.0424747, places=6)
            s = form_scores(torch.tensor([-1.0, -1.0, -1.0, 1.0]), item, agg, "sum")
            self.assertAlmostEqual(s[0].item(), -3.0, places=6)
            self.assertAlmostEqual(s[1].item(), -0.1424747, places=6)
            s = form_scores(torch.tensor([-1.0, -1.0, -1.0, 2.0]), item, agg, "mean")
            self.assertAlmostEqual(s[0].item(), -3.0, places=6)
            self.assertAlmostEqual(s[1].item(), -0.1424747, places=6)
        # Two codes reach one product: max takes the better (D, L) pair, sum adds both.
        D2 = torch.tensor([[0.1, 0.0]])
        item2 = (D2, g, torch.tensor([True]), L)
        th = torch.tensor([-1.0, -1.0, -1.0, 1.0])
        self.assertAlmostEqual(form_scores(th, item2, "max", "sum")[0].item(), -0.2, places=6)
        self.assertAlmostEqual(form_scores(th, item2, "sum", "sum")[0].item(), -3.2, places=6)

    def test_nonpositive_keeps_divergence_from_scoring_higher(self):
        import random
        from tools.train.weights import fit
        # One query, one medium code reaching two products: the relevant one diverges more
        # (D 0.5 against 0.1), so only a positive medium weight ranks it first.
        D = torch.tensor([[0.5], [0.1]])
        item = (D, torch.tensor([1]), torch.tensor([True, False]), torch.zeros(1, 3))
        free, _ = fit([item], "max", 0.1, 1e-3, random.Random(0), "none", steps=200)
        self.assertGreater(free[1].item(), 0.0)
        held, _ = fit([item], "max", 0.1, 1e-3, random.Random(0), "none", steps=200,
                      nonpositive=True)
        self.assertTrue((held[:3] <= 0).all(), held)
        self.assertEqual(held[3].item(), 0.0)

    def test_settings_written_for_the_engine(self):
        from tools.train.weights import settings_of
        th = torch.tensor([-0.5, -0.25, -1.0, 0.75])
        s = settings_of(th, "max", "mean")
        self.assertEqual(s["weights"], {"coarse": -0.5, "medium": -0.25, "fine": -1.0})
        self.assertEqual(s["code_logprob"], {"weight": 0.75, "per_token": True})
        # The spec's "max code tokens" (EOS included): what SFT trained and export keeps.
        self.assertEqual(s["max_code_tokens"], 16)
        self.assertEqual(settings_of(th, "sum", "sum")["code_logprob"]["per_token"], False)
        # Without the term: the gram.json of before, no code_logprob key (engine weight 0).
        self.assertNotIn("code_logprob", settings_of(th, "max", "none"))


if __name__ == "__main__":
    unittest.main()
