"""Files a later stage reads are replaced whole: a write that fails half-way leaves the old
file (`codes.replacing`). Standard library only."""
import tempfile
import unittest
from pathlib import Path

from tools.train import codes as C
from tools.train import pairs as P


class Unserializable:
    pass


class Replacing(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.d = Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def old(self, *names):
        for n in names:
            (self.d / n).write_text(f"old {n}\n")

    def assertOld(self, *names):
        for n in names:
            self.assertEqual((self.d / n).read_text(), f"old {n}\n", n)
        self.assertEqual(sorted(p.name for p in self.d.glob("*.tmp")), [])

    def test_replacing(self):
        self.old("a.json")
        with self.assertRaises(RuntimeError):
            with C.replacing(self.d / "a.json") as f:
                f.write("half")
                raise RuntimeError
        self.assertOld("a.json")
        with C.replacing(self.d / "a.json") as f:
            f.write("new\n")
        self.assertEqual((self.d / "a.json").read_text(), "new\n")
        with C.replacing(self.d / "b.json") as f:
            f.write("é\n")
        self.assertEqual((self.d / "b.json").read_text(encoding="utf-8"), "é\n")
        self.assertEqual(sorted(p.name for p in self.d.iterdir()), ["a.json", "b.json"])

    def test_pairs_write_fails_whole(self):
        # Before the fortieth session stage 2 wrote its files in place: a run that failed
        # half-way (killed, disk full) left a truncated pairs-train.jsonl for SFT.
        self.old("pairs-train.jsonl")
        out = {"pairs-train": [{"kind": "query", "text": "a", "code": "b", "n": 1},
                               {"kind": "query", "text": Unserializable()}]}
        with self.assertRaises(TypeError):
            P.write(out, self.d)
        self.assertOld("pairs-train.jsonl")

    def test_catalog_write_fails_whole(self):
        self.old("catalog.jsonl")
        items = [{"id": "1", "title": "t", "attributes": {}, "codes": ["x"]},
                 {"id": "2", "title": Unserializable(), "attributes": {}, "codes": []}]
        with self.assertRaises(TypeError):
            C.write_catalog(items, self.d)
        self.assertOld("catalog.jsonl")

    def test_synth_judgements_write_fails_whole(self):
        from tools.train import synth_judgements as S
        self.old("synth-valid.jsonl")
        (self.d / "catalog.jsonl").write_text("")
        (self.d / "queries-valid.jsonl").write_text("")
        saved = S.judgements
        S.judgements = lambda items, queries: [{"query": "a", "grades": {}},
                                                {"query": Unserializable(), "grades": {}}]
        try:
            with self.assertRaises(TypeError):
                S.main(["--work", str(self.d)])
        finally:
            S.judgements = saved
        self.assertOld("synth-valid.jsonl")


if __name__ == "__main__":
    unittest.main()
