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
        # Attention: q_dim 8, 2 layers; a decoded token of the 64 after the prompt attends to
        # 64.5 keys on average (4 · 64.5 · 8 · 2 = 4,128 FLOPs), a prompt token to 16.5 (1,056).
        self.assertEqual(f32["attention_flops_per_token"], 4128)
        self.assertEqual(f32["flops_per_token"], 2 * (1152 + 800) + 4128)
        self.assertEqual(f32["prefill_flops_per_token"], 2 * 1152 + 2 * 800 / 32 + 1056)
        self.assertAlmostEqual(f32["flop_ceiling_tok_s"], 4e9 / (2 * 1952 + 4128))
        self.assertAlmostEqual(f32["prefill_flop_ceiling_tok_s"], 4e9 / (2 * 1152 + 50 + 1056))
        # A step reads the weights and its context's keys and values: 2 · 1 KV head · 4 · 2
        # layers · 64.5 keys · 2 bytes = 2,064 bytes.
        self.assertEqual(f32["kv_bytes"], 2064)
        self.assertAlmostEqual(f32["bw_floor_ms_per_step"], (1952 * 4 + 2064) / 10e9 * 1e3)


class DecodeB1(unittest.TestCase):
    def test_each_file_is_judged_in_its_own_phase(self):
        # Floors of 10, 20 and 12 GB/s measured around two result files: the first file's rows
        # against max(10, 20), the second's against max(20, 12); a row that read faster than its
        # floors raises its own file's floor only.
        floors = [{"dtype": "f32", "step_bytes": 1e9}, {"dtype": "bf16", "step_bytes": 5e8}]
        bw = lambda g: {"read_bw_gbps": {"2": {"best": g, "median": g}}}
        row = lambda peer, dtype, tok_s, pos: {"peer": peer, "dtype": dtype, "threads": 2, "_file": pos,
                                               "decode_b1": {"tok_s_median": tok_s}}
        results = [row("a", "f32", 10.0, 1), row("b", "f32", 25.0, 3), row("b", "bf16", 30.0, 3)]
        lines = P.b1_against_bandwidth(results, [(0, bw(10)), (2, bw(20)), (4, bw(12))], floors)
        table = [l for l in lines if l.startswith("| a ") or l.startswith("| b ")]
        # a: floor 20 GB/s, 20 steps/s at 1 GB a step: 2.00× its 10/s.
        self.assertTrue(table[0].endswith("| 20.0 / 20.0 | 20.0 | 2.00× |"), table[0])
        # b, f32: 25 GB/s reached beyond the 20 measured: the floor is 25, 1.00×.
        self.assertTrue(table[1].endswith("| 20.0 / 25.0 | 25.0 | 1.00× |"), table[1])
        # b, bf16 (0.5 GB a step): the same file's floor, 50 steps/s against its 30: 1.67×.
        self.assertTrue(table[2].endswith("| 20.0 / 25.0 | 50.0 | 1.67× |"), table[2])


if __name__ == "__main__":
    unittest.main()
