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


if __name__ == "__main__":
    unittest.main()
