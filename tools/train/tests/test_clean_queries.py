import unittest

from tools.train.clean_queries import clean


class CleanQueries(unittest.TestCase):
    def test_twins_of_trained_queries_are_dropped(self):
        trained = ["hdmi cable", "printer", "TN-2110 toner", "grey backpack thule"]
        judged = [
            {"query": q, "grades": {"1": 3}}
            for q in [
                "cable hdmi",  # word order
                "priner",  # a dropped letter
                "prniter",  # two letters swapped
                "printter",  # a doubled letter
                "prynter",  # a substituted letter
                "toner tn2110",  # hyphen and order
                "gray thule backpack",  # gray / grey
                "laser printer",  # a new word: kept
                "pirnters",  # two edits: kept
                "mouse",  # unrelated: kept
            ]
        ]
        kept = [j["query"] for j in clean(judged, trained)]
        self.assertEqual(kept, ["laser printer", "pirnters", "mouse"])

    def test_a_typo_that_moves_its_word_is_a_twin(self):
        # The split key sorts the words, so a typo can change their order: `canon caetridge`
        # keys as `caetridge canon`, and the key's own one-character deletions shared none with
        # `canon cartridge`'s (before the fortieth session it was kept).
        judged = [{"query": q, "grades": {}} for q in
                  ["canon caetridge", "canon acrtridge", "toner brothr", "zebra label", "canon"]]
        kept = [j["query"] for j in clean(judged, ["canon cartridge", "brother toner"])]
        self.assertEqual(kept, ["zebra label", "canon"])

    def test_nothing_trained_keeps_everything(self):
        judged = [{"query": "usb hub", "grades": {}}, {"query": "hub", "grades": {"2": 3}}]
        self.assertEqual(clean(judged, []), judged)


if __name__ == "__main__":
    unittest.main()
