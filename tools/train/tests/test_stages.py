"""How the torch stages pick and replace their files (skipped without torch): export swaps a
checked model in and leaves OUT alone when the check fails; weights and export refuse an align
older than sft; sft trains its tokenizer again when the data it was trained on changed."""
import contextlib
import io
import json
import os
import tempfile
import unittest
from pathlib import Path

try:
    import torch
except ImportError:  # the stdlib-only CI job
    if os.environ.get("GRAM_REQUIRE_TORCH") == "1":
        raise
    torch = None


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def files(d):
    return {f.name: f.read_text() for f in sorted(Path(d).iterdir())}


@unittest.skipIf(torch is None, "torch not installed")
class Export(unittest.TestCase):
    """export.main with the export and the engine check replaced by stand-ins."""

    def setUp(self):
        from tools.train import export as E
        self.E = E
        self.tmp = tempfile.TemporaryDirectory()
        d = Path(self.tmp.name)
        self.work, self.out = d / "work", d / "models" / "m"
        write(self.work / "catalog.jsonl", "{}\n")
        write(self.work / "sft" / "model.safetensors", "sft")
        self.old = {"model.safetensors": "old", "catalog.jsonl": "old catalog",
                    "codes.txt": "old codes", "README.md": "card", "NOTICE": "old notice",
                    "eval.json": "{}", "train-log.jsonl": "{}\n",
                    "gram.json": json.dumps({"delimiter": " | ", "code_size": {"weight": 0.25}})}
        self.weights = "new"
        for k, v in self.old.items():
            write(self.out / k, v)
        self.checked = []
        self.ok = True
        self.saved = E.export, E.verify

        def fake_export(src, out, catalog, with_catalog=True, trained=True):
            out.mkdir(parents=True, exist_ok=True)
            (out / "model.safetensors").write_text(self.weights)
            (out / "NOTICE").write_text("notice")
            (out / "gram.json").write_text(json.dumps({"delimiter": " | "}))
            if with_catalog:
                (out / "catalog.jsonl").write_text("new catalog")
                (out / "codes.txt").write_text("new codes")

        def fake_verify(out, gram, work):
            # What the check sees, and that OUT still holds the old model meanwhile.
            self.checked.append((out, files(out), files(self.out)))
            return {"ok": self.ok, "index_build_seconds": 1, "search_seconds": 1}

        E.export, E.verify = fake_export, fake_verify

    def tearDown(self):
        self.E.export, self.E.verify = self.saved
        self.tmp.cleanup()

    def main(self, *extra):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            self.E.main(["--work", str(self.work), "--out", str(self.out), *extra])

    def test_a_failed_check_leaves_out_as_it_was(self):
        # Before the fortieth session the export went straight into OUT and was checked there:
        # a failed check left OUT with a model that failed it.
        self.ok = False
        with self.assertRaises(SystemExit):
            self.main()
        self.assertEqual(files(self.out), self.old)
        checked, seen, out_meanwhile = self.checked[0]
        self.assertNotEqual(checked, self.out)
        self.assertEqual(seen["model.safetensors"], "new")
        self.assertEqual(out_meanwhile, self.old)
        self.assertFalse(self.out.with_name("m.old").exists())

    def test_a_checked_export_replaces_out(self):
        # Other weights: the old model card and eval.json describe the old model and stay
        # behind, and so does gram.json's code_size (fitted to the old weights).
        self.main()
        got = files(self.out)
        self.assertEqual(got, {"model.safetensors": "new", "catalog.jsonl": "new catalog",
                               "codes.txt": "new codes", "NOTICE": "notice",
                               "gram.json": json.dumps({"delimiter": " | "})})
        self.assertEqual(sorted(p.name for p in self.out.parent.iterdir()), ["m"])
        self.assertTrue(json.loads((self.work / "export-check.json").read_text())["ok"])

    def test_the_same_weights_keep_their_card_and_code_size(self):
        # A re-export of the same weights (the catalog again, say) dropped the size stage's
        # code_size from gram.json while keeping the card that reported its figures.
        self.weights = "old"
        self.main()
        got = files(self.out)
        self.assertEqual(got["README.md"], "card")
        self.assertEqual(got["eval.json"], "{}")
        self.assertEqual(got["train-log.jsonl"], "{}\n")
        self.assertEqual(json.loads(got["gram.json"]),
                         {"delimiter": " | ", "code_size": {"weight": 0.25}})

    def test_an_export_killed_mid_swap_is_put_back(self):
        # Killed between its renames: OUT gone, the last model in OUT.old. The next export
        # carried nothing over and removed OUT.old.
        old = self.out.with_name("m.old")
        os.replace(self.out, old)
        self.weights = "old"
        self.main()
        self.assertEqual(files(self.out)["README.md"], "card")
        self.assertFalse(old.exists())

    def test_no_catalog_keeps_the_dirs_catalog(self):
        self.main("--no-catalog")
        _, seen, _ = self.checked[0]
        self.assertEqual(seen["catalog.jsonl"], "old catalog")
        self.assertEqual(files(self.out)["model.safetensors"], "new")
        self.assertEqual(files(self.out)["codes.txt"], "old codes")

    def test_first_export_and_a_leftover(self):
        # No OUT yet, and an OUT.new left by an interrupted run.
        import shutil
        shutil.rmtree(self.out)
        write(self.out.with_name("m.new") / "stale", "x")
        self.main("--no-verify")
        self.assertEqual(files(self.out), {"model.safetensors": "new", "NOTICE": "notice",
                                           "catalog.jsonl": "new catalog",
                                           "codes.txt": "new codes",
                                           "gram.json": json.dumps({"delimiter": " | "})})
        self.assertEqual(self.checked, [])
        self.assertEqual(sorted(p.name for p in self.out.parent.iterdir()), ["m"])


@unittest.skipIf(torch is None, "torch not installed")
class StaleOutputs(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.work = Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def age(self, path, t):
        os.utime(path, (t, t))

    def test_an_align_older_than_sft_is_refused(self):
        # `sft` run again alone: weights and export used WORK/align, an alignment of the
        # earlier SFT, without a word.
        from tools.train import common as K
        from tools.train import export as E
        from tools.train import weights as W
        w = self.work
        write(w / "sft" / "model.safetensors", "sft")
        self.assertEqual(K.trained_model(w), w / "sft")
        write(w / "align" / "model.safetensors", "align")
        self.age(w / "sft" / "model.safetensors", 1_000_000)
        self.age(w / "align" / "model.safetensors", 1_000_100)
        self.assertEqual(K.trained_model(w), w / "align")
        self.age(w / "sft" / "model.safetensors", 1_000_200)
        for run in (lambda: K.trained_model(w),
                    lambda: W.main(["--work", str(w)]),
                    lambda: E.main(["--work", str(w), "--out", str(w / "out"), "--no-verify"])):
            with self.assertRaisesRegex(SystemExit, "older than"):
                run()
        self.assertFalse((w / "out").exists())
        # Named with --model, it is used.
        self.assertEqual(K.trained_model(w / "nothing"), w / "nothing" / "sft")

    def test_a_gram_json_older_than_the_weights_is_not_exported(self):
        # sft or align run again after the weights stage: export shipped the new weights with
        # the scoring weights fitted to the old ones.
        from tools.train import export as E
        m = self.work / "align"
        write(m / "model.safetensors", "w")
        with self.assertRaisesRegex(SystemExit, "no gram.json"):
            E.check_settings_fresh(m)
        write(m / "gram.json", "{}")
        self.age(m / "gram.json", 1_000_000)
        self.age(m / "model.safetensors", 1_000_100)
        with self.assertRaisesRegex(SystemExit, "older than"):
            E.export(m, self.work / "out", self.work / "catalog.jsonl")
        self.assertFalse((self.work / "out").exists())
        # Named with --model (a checkout or a copy sets the times in any order): not judged by them.
        E.check_settings_fresh(m, trained=False)
        self.age(m / "gram.json", 1_000_200)
        E.check_settings_fresh(m)

    def test_a_prompt_is_never_cut(self):
        # Tok.prompt cut a prompt at MAX_PROMPT_TOKENS without a word, where the engine reads
        # it whole: trained on one prompt, indexed and queried on another.
        from tools.train import codes as C
        from tools.train import common as K
        tok = K.Tok(C.REPO / "models" / "gram-icecat-2m" / "tokenizer.json")
        short = tok.prompt("hp toner cartridge")
        self.assertTrue(0 < len(short) <= K.MAX_PROMPT_TOKENS)
        with self.assertRaisesRegex(ValueError, "over MAX_PROMPT_TOKENS"):
            tok.prompt("wireless mouse " * K.MAX_PROMPT_TOKENS)

    def test_tokenizer_of_older_data_is_trained_again(self):
        from tools.train import sft as S
        w = self.work
        self.assertEqual(S.tokenizer_stale(w), [])  # none yet: trained anyway
        for f in S.TOKENIZER_INPUTS:
            write(w / f, "{}\n")
            self.age(w / f, 1_000_000)
        write(w / "tokenizer" / "tokenizer.json", "{}")
        self.age(w / "tokenizer" / "tokenizer.json", 1_000_100)
        self.assertEqual(S.tokenizer_stale(w), [])
        # `pairs` ran again: a new split.
        self.age(w / "queries-train.jsonl", 1_000_200)
        self.assertEqual(S.tokenizer_stale(w), ["queries-train.jsonl"])
        self.age(w / "catalog.jsonl", 1_000_300)
        self.assertEqual(S.tokenizer_stale(w), ["catalog.jsonl", "queries-train.jsonl"])


if __name__ == "__main__":
    unittest.main()
