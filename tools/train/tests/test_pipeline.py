"""The pipeline's checks before it runs a stage (stdlib only): what a later stage needs is
asked for before the first stage starts, not found missing after an hour of training."""
import tempfile
import unittest
from pathlib import Path
from unittest import mock

from tools.train import pipeline


class BeforeTheFirstStage(unittest.TestCase):
    def run_pipeline(self, work, gram, *extra):
        with mock.patch("subprocess.run") as run, self.assertRaises(SystemExit) as stop:
            pipeline.main(["--work", work, "--gram", str(gram), *extra])
        run.assert_not_called()
        return str(stop.exception)

    def test_eval_without_bm25s_stops_first(self):
        with tempfile.TemporaryDirectory() as d:
            gram = Path(d) / "gram"
            gram.write_text("")
            with mock.patch("importlib.util.find_spec", return_value=None):
                said = self.run_pipeline(d, gram)
            self.assertIn("bm25s", said)
            self.assertIn("--to size", said)

    def test_a_missing_gram_binary_stops_first(self):
        with tempfile.TemporaryDirectory() as d:
            said = self.run_pipeline(d, Path(d) / "no-such-gram", "--from", "export")
            self.assertIn("no gram binary", said)


if __name__ == "__main__":
    unittest.main()
