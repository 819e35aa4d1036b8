"""tools/bench_peers.py's summary on result files made up here (stdlib only)."""
import contextlib
import io
import json
import os
import tempfile
import unittest

from tools import bench_peers as P


class Machine(unittest.TestCase):
    def test_the_summary_names_the_cpu_from_whichever_peer_saw_it(self):
        # gram's record (first, as bench_side_by_side.sh passes them) has its ISA and core
        # count only; the Python peer's has lscpu's model name and flags.
        with tempfile.TemporaryDirectory() as d:
            gram, peer = os.path.join(d, "gram.jsonl"), os.path.join(d, "llamacpp.jsonl")
            with open(gram, "w") as f:
                f.write(json.dumps({"kind": "machine", "peer": "gram", "isa": "Avx512", "nproc": 2}) + "\n")
            with open(peer, "w") as f:
                f.write(json.dumps({"kind": "machine", "peer": "llamacpp", "nproc": 4,
                                    "Model name": "Test CPU 9000", "flags": ["avx2", "fma"]}) + "\n")
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                text = P.markdown([gram, peer], None)
            text = (text or "") + buf.getvalue()
        first = next(line for line in text.splitlines() if line.startswith("Machine:"))
        self.assertEqual(first, "Machine: Test CPU 9000 (2 cpus), flags: avx2 fma")


class Floors(unittest.TestCase):
    def test_prefill_charges_each_prompt_token_a_share_of_the_lm_head(self):
        # 2 layers, hidden 8, 2 heads of 4, 1 KV head, FFN 16, vocabulary 100: 2 · (64 + 2·32 +
        # 64 + 3·128) = 1,152 layer weights, 800 in the LM head; a decoded token runs all of
        # them, a token of a 32-token prompt the layers and 1/32 of the head.
        cfg = {"hidden_size": 8, "num_hidden_layers": 2, "intermediate_size": 16, "vocab_size": 100,
               "num_attention_heads": 2, "num_key_value_heads": 1}
        floor = {"read_bw_gbps": {"1": {"best": 5.0}, "4": {"best": 10.0}},
                 "fp32_fma_gflops_avx2": {"1": {"best": 1.0}, "4": {"best": 4.0}}}
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "config.json")
            with open(path, "w") as f:
                json.dump(cfg, f)
            rows = P.smollm2_floors(floor, path, prompt_len=32, threads=4)
        f32 = rows[0]
        self.assertEqual(f32["flops_per_token"], 2 * (1152 + 800))
        self.assertEqual(f32["prefill_flops_per_token"], 2 * 1152 + 2 * 800 / 32)
        self.assertAlmostEqual(f32["flop_ceiling_tok_s"], 4e9 / (2 * 1952))
        self.assertAlmostEqual(f32["prefill_flop_ceiling_tok_s"], 4e9 / (2 * 1152 + 50))
        self.assertAlmostEqual(f32["bw_floor_ms_per_step"], 1952 * 4 / 10e9 * 1e3)


if __name__ == "__main__":
    unittest.main()
