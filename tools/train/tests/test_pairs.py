"""Training pairs: query synthesis, targets, and no held-out leakage (split by query, cold
products, judged queries). Standard library only."""
import json
import random
import unittest
from pathlib import Path

from tools.train import codes as C
from tools.train import pairs as P


def catalog(n=400):
    rng = random.Random(1)
    brands, cats = ["hp", "canon", "lenovo", "brother"], ["notebook", "toner cartridge", "mouse"]
    items = []
    for i in range(n):
        a = {"category": rng.choice(cats), "brand": rng.choice(brands),
             "colour": rng.choice(["black", "grey", None]), "model": f"m{i}x"}
        a = {k: v for k, v in a.items() if v}
        items.append({"id": str(1000 + i), "title": f"{a['brand'].upper()} M{i}X {a['category']}",
                      "attributes": a, "codes": C.product_codes(a)})
    return items


class Synthesis(unittest.TestCase):
    def test_targets_are_named_subsets(self):
        it = catalog(1)[0]
        a = it["attributes"]
        t = P.targets(it, ("brand", "category"))
        self.assertIn(a["brand"], t)
        self.assertIn(a["category"] + " | " + a["brand"], t)
        self.assertTrue(all(a["model"] not in c for c in t))
        # a model number implies brand and category
        t = P.targets(it, ("model",))
        self.assertIn(f"{a['category']} | {a['brand']} | {a['model']}", t)

    def test_spec_words_name_no_attribute(self):
        # A spec query is labelled as naming the category only: a model number, colour or
        # type word was drawn as a "spec" (its targets and relevance then wrong), and "pc(s)"
        # slipped past the stopwords once stripped to "pc(s".
        a = {"category": "toner cartridge", "brand": "xerox", "model": "006r90321",
             "type": "original", "colour": "black"}
        it = {"id": "1", "title": "Xerox 006R90321 toner cartridge Original Black 6 pc(s) laser",
              "attributes": a, "codes": C.product_codes(a)}
        specs = {P.spec_query(it, random.Random(s)) for s in range(200)}
        self.assertEqual({s.split()[0] for s in specs if s}, {"laser"})
        it["title"] = "Xerox 006R90321 toner cartridge Original Black 6 pc(s)"
        self.assertEqual({P.spec_query(it, random.Random(s)) for s in range(50)}, {None})

    def test_typo_one_word(self):
        rng = random.Random(3)
        for _ in range(200):
            q = P.typo("wireless keyboard black", rng)
            diff = [a != b for a, b in zip(q.split(), "wireless keyboard black".split())]
            self.assertLessEqual(sum(diff), 1)
            self.assertEqual(len(q.split()), 3)

    def test_queries_distinct_and_normalized(self):
        rng = random.Random(0)
        for it in catalog(50):
            qs = P.synth_queries(it, 6, rng)
            self.assertEqual(len({q for q, _, _ in qs}), len(qs))
            for q, named, base in qs:
                self.assertEqual(q, P.qnorm(q))
                self.assertEqual(base, P.qnorm(base))
                self.assertTrue(P.targets(it, named))


class Leakage(unittest.TestCase):
    def setUp(self):
        self.items = catalog()
        # judged queries that the synthesizer certainly produces
        self.judged = {"HP Notebook": {"1000": 3}, "canon": {"1001": 2}, "laptop": {"1002": 0}}
        self.out = P.build(self.items, self.judged, per_product=6, seed=0, cold_percent=10,
                           valid_percent=10)

    def test_judged_queries_never_trained_or_validated(self):
        judged = {P.qnorm(q) for q in self.judged}
        texts = {p["text"] for p in self.out["pairs-train"] + self.out["pairs-valid"]
                 if p["kind"] == "query"}
        self.assertFalse(judged & texts)
        self.assertFalse(judged & {q["query"] for q in self.out["queries-train"]})
        self.assertFalse(judged & {q["query"] for q in self.out["cold"]["queries"]})
        self.assertGreater(self.out["stats"]["synthetic_queries_judged_twins_dropped"], 0)
        self.assertEqual(len(self.out["judged"]), 3)

    def test_misspellings_follow_the_query_they_misspell(self):
        # With many typos: no misspelling of a judged query (or of a reordering of one) is
        # trained, validated or cold, and a misspelling lands on its query's side of the split.
        # Before, both were decided on the misspelled string: 60 training queries were one-typo
        # copies of 20 visible judged ones, and 14 % of the validation queries had a twin in
        # training.
        made = {}
        typo, synth = P.typo, P.synth_queries

        def recording_typo(q, rng):
            t = typo(q, rng)
            made.setdefault(P.qnorm(t), set()).add(P.qnorm(q))
            return t

        P.typo = recording_typo
        P.synth_queries = lambda it, n, rng: synth(it, n, rng, typo_rate=0.5)
        try:
            out = P.build(self.items, {"notebook": {}, "canon mouse": {}}, per_product=6, seed=0,
                          cold_percent=10, valid_percent=30)
        finally:
            P.typo, P.synth_queries = typo, synth
        keys = {P.split_key("notebook"), P.split_key("canon mouse")}
        side = {q["query"]: s for s in ("train", "valid") for q in out["queries-" + s]}
        cold = {q["query"] for q in out["cold"]["queries"]}
        twins = 0
        for t, bases in made.items():
            if t not in side and t not in cold:
                continue
            for b in bases:
                self.assertNotIn(P.split_key(b), keys, (t, b))
                if t in side and b in side:
                    twins += 1
                    self.assertEqual(side[t], side[b], (t, b))
        self.assertGreater(twins, 10)
        self.assertGreater(out["stats"]["synthetic_queries_judged_twins_dropped"], 0)

    def test_plural_twins_of_judged_queries_dropped(self):
        # A judged query is trained in no spelling, singular or plural: before the fortieth
        # session "keyboards" (and its typos) was trained while "keyboard" is a visible judged
        # query, "extension cord" beside the judged "extension cords", "aa batteries" beside
        # "aa battery".
        rng = random.Random(2)
        items = []
        for i in range(300):
            a = {"category": rng.choice(["keyboard", "power extension", "household battery"]),
                 "brand": rng.choice(["hp", "apc", "duracell"]), "model": f"k{i}z"}
            items.append({"id": str(5000 + i), "title": f"{a['brand']} K{i}Z {a['category']}",
                          "attributes": a, "codes": C.product_codes(a)})
        forms = {"keyboard", "keyboards", "extension cord", "extension cords", "aa battery",
                 "aa batteries"}
        synth = P.synth_queries
        P.synth_queries = lambda it, n, rng: synth(it, n, rng, typo_rate=0.5)
        try:
            def made(judged):
                out = P.build(items, judged, per_product=8, seed=0, cold_percent=10,
                              valid_percent=30)
                rows = out["queries-train"] + out["queries-valid"]
                return ({r["query"] for r in rows} | {r.get("misspells") for r in rows}
                        | {r["query"] for r in out["cold"]["queries"]}), out
            free, _ = made({})
            # Without judged queries the synthesizer makes them (so the check below means
            # something).
            self.assertLessEqual({"keyboard", "keyboards", "extension cord", "aa batteries"},
                                 free)
            got, out = made({"keyboard": {}, "Extension Cords": {}, "aa battery": {}})
        finally:
            P.synth_queries = synth
        self.assertEqual(got & forms, set())
        self.assertIn("computer keyboard", got)  # another query: kept
        self.assertGreater(out["stats"]["synthetic_queries_judged_twins_dropped"], 0)

    def test_judged_key_folds_plurals(self):
        same = [("keyboards", "keyboard"), ("Extension Cords", "extension cord"),
                ("aa batteries", "AA battery"), ("boxes", "box"), ("cords usb", "usb cord"),
                ("ps4 games", "ps4 game")]
        for a, b in same:
            self.assertEqual(P.judged_key(a), P.judged_key(b), (a, b))
        for a, b in [("glass", "glas"), ("bus", "bu"), ("status", "statu"), ("canon", "canons x")]:
            self.assertNotEqual(P.judged_key(a), P.judged_key(b), (a, b))
        self.assertEqual(P.judged_key("glasses"), P.judged_key("glass"))
        # The split goes by the folded key too (since the forty-second session): singular and
        # plural land on one side, at every percentage.
        self.assertNotEqual(P.split_key("keyboards"), P.split_key("keyboard"))
        for a, b in same:
            for percent in range(1, 100, 7):
                self.assertEqual(P.is_valid_query(a, percent), P.is_valid_query(b, percent),
                                 (a, b, percent))

    def test_split_by_query(self):
        tr = {p["text"] for p in self.out["pairs-train"] if p["kind"] == "query"}
        va = {p["text"] for p in self.out["pairs-valid"]}
        self.assertTrue(tr and va)
        self.assertFalse(tr & va)
        self.assertEqual(tr, {q["query"] for q in self.out["queries-train"]})
        self.assertEqual(va, {q["query"] for q in self.out["queries-valid"]})
        for row in self.out["queries-valid"]:
            # A misspelling goes where the query it misspells goes.
            self.assertTrue(P.is_valid_query(row.get("misspells", row["query"]), 10))
        for row in self.out["queries-train"]:
            self.assertFalse(P.is_valid_query(row.get("misspells", row["query"]), 10))

    def test_variants_of_a_query_share_a_side(self):
        for group in [["tn-2110 toner", "tn2110 toner", "TN 2110 toner", "toner tn 2110"],
                      ["startech.com hdmi cable", "startech hdmi cable", "hdmi cable startech"],
                      ["grey mouse", "gray mouse", "mouse gray"]]:
            self.assertEqual(len({P.split_key(q) for q in group}), 1, group)
            self.assertEqual(len({P.is_valid_query(q, 50) for q in group}), 1, group)
        self.assertNotEqual(P.split_key("tn 2110"), P.split_key("tn 2120"))

    def test_cold_products_unseen(self):
        cold = self.out["cold"]["products"]
        self.assertTrue(cold)
        ids = {p["id"] for p in cold}
        titles = {p["title"] for p in cold}
        self.assertFalse(titles & {p["text"] for p in self.out["pairs-train"]
                                   if p["kind"] == "product"})
        for q in self.out["queries-train"] + self.out["queries-valid"]:
            self.assertFalse(ids & set(q["pids"]))
        train_q = {q["query"] for q in self.out["queries-train"]}
        self.assertFalse(train_q & {q["query"] for q in self.out["cold"]["queries"]})

    def test_deterministic(self):
        again = P.build(self.items, self.judged, per_product=6, seed=0, cold_percent=10,
                        valid_percent=10)
        self.assertEqual(json.dumps(again, sort_keys=True), json.dumps(self.out, sort_keys=True))


class WorkFiles(unittest.TestCase):
    """The same checks on the files of a real run, when there is one (tools/train/work)."""

    def test_written_pairs(self):
        # Runs live in subfolders (`work/ci`, `work/s34-run`), the default work dir too.
        dirs = [w for w in [C.WORK, *sorted(C.WORK.glob("*/"))]
                if (w / "pairs-train.jsonl").exists() and (w / "judged.jsonl").exists()]
        if not dirs:
            self.skipTest("no stage-2 output in tools/train/work")
        for w in dirs:
            with self.subTest(work=str(w)):
                self.check_written(w)

    def check_written(self, w):
        judged = {P.qnorm(r["query"]) for r in P.read_jsonl(w / "judged.jsonl")}
        train = P.read_jsonl(w / "pairs-train.jsonl")
        valid = P.read_jsonl(w / "pairs-valid.jsonl")
        cold = P.read_jsonl(w / "cold.jsonl")
        tq = {p["text"] for p in train if p["kind"] == "query"}
        self.assertFalse(tq & judged)
        self.assertFalse({p["text"] for p in valid} & judged)
        self.assertFalse(tq & {p["text"] for p in valid})
        cold_titles = {p["title"] for p in cold if p["kind"] == "product"}
        self.assertFalse(cold_titles & {p["text"] for p in train if p["kind"] == "product"})
        # Twins by key (word order, `tn-2110`, plurals, a misspelling's base): only for a run
        # made by today's rules (an older run's split and filter were looser, as documented).
        stats = json.loads((w / "pairs-stats.json").read_text())
        if stats.get("rules") != P.RULES:
            self.skipTest(f"{w}: made by older rules ({stats.get('rules')}): no twin-by-key checks")
        judged_keys = {P.judged_key(q) for q in judged}
        rows = {side: P.read_jsonl(w / f"queries-{side}.jsonl") for side in ("train", "valid")}
        keys = {side: {P.judged_key(r.get("misspells", r["query"])) for r in rs}
                | {P.judged_key(r["query"]) for r in rs}
                for side, rs in rows.items()}
        self.assertFalse(keys["train"] & judged_keys)
        self.assertFalse(keys["valid"] & judged_keys)
        bases = {side: {P.judged_key(r.get("misspells", r["query"])) for r in rs}
                 for side, rs in rows.items()}
        self.assertFalse(bases["train"] & bases["valid"])


class SynthJudgements(unittest.TestCase):
    def test_sources_judge_their_own_queries(self):
        # A query two products made, each naming its own attributes: each source is relevant
        # on its own attributes (the first source on the union judged the second irrelevant to
        # the query made from it); the index lookup of synth_judgements says the same.
        from tools.train import synth_judgements as S
        a = {"category": "power supply unit", "brand": "apc", "model": "s1"}
        b = {"category": "power adapter", "brand": "apc", "model": "s2"}
        c = {"category": "power adapter", "brand": "hp", "model": "s3"}
        items = [{"id": str(i), "title": t, "attributes": x, "codes": C.product_codes(x)}
                 for i, (t, x) in enumerate([("apc psu", a), ("apc adapter", b), ("hp adapter", c)])]
        by_id = {it["id"]: it for it in items}
        built = P.build(items, {}, per_product=0)  # the row format, from build's own writer
        self.assertEqual(built["queries-train"], [])
        row = {"query": "apc power supply", "attrs": ["category", "brand"], "pids": ["0", "1"],
               "sources": [{"pid": "0", "attrs": ["category", "brand"]},
                           {"pid": "1", "attrs": ["brand"]}]}
        self.assertEqual([P.relevant_to(it, row, by_id) for it in items], [True, True, False])
        old = dict(row)
        del old["sources"]
        self.assertEqual([P.relevant_to(it, old, by_id) for it in items], [True, False, False])
        self.assertEqual(set(S.judgements(items, [row])[0]["grades"]), {"0", "1"})

    def test_build_writes_each_sources_attributes(self):
        items = catalog(300)
        out = P.build(items, {}, per_product=4, seed=2)
        by_id = {it["id"]: it for it in items}
        rows = out["queries-train"] + out["queries-valid"]
        self.assertTrue(rows)
        for r in rows:
            self.assertEqual([s["pid"] for s in r["sources"]], r["pids"])
            union = set().union(*(s["attrs"] for s in r["sources"]))
            self.assertEqual(union, set(r["attrs"]))
            # every source is relevant to its own query
            for s in r["sources"]:
                self.assertTrue(P.relevant_to(by_id[s["pid"]], r, by_id), r)

    def test_same_as_weights_relevant(self):
        # The index lookup gives exactly the first source's rule for rows without `sources`,
        # a missing value (colour) matching a missing one.
        from tools.train import synth_judgements as S
        relevant = P.relevant

        items = catalog(200)
        by_id = {it["id"]: it for it in items}
        no_colour = next(it for it in items if "colour" not in it["attributes"])
        queries = [{"query": "q1", "attrs": ["brand", "category"], "pids": [items[0]["id"], items[1]["id"]]},
                   {"query": "q2", "attrs": ["colour", "category"], "pids": [no_colour["id"]]},
                   {"query": "q3", "attrs": [], "pids": [items[2]["id"]]}]
        got = S.judgements(items, queries)
        for q, j in zip(queries, got):
            src = by_id[q["pids"][0]]
            want = {it["id"] for it in items if q["attrs"] and relevant(it, q["attrs"], src)}
            self.assertEqual(set(j["grades"]), want, q["query"])
            self.assertTrue(all(g == 3 for g in j["grades"].values()))
        self.assertIn(no_colour["id"], got[1]["grades"])


if __name__ == "__main__":
    unittest.main()
