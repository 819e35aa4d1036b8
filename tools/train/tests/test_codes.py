"""Code construction: attribute order, granularity, delimiter, Unicode; attribute recovery on
hand-made Icecat-like products. Standard library only (no torch):

    python3 -m unittest discover -s tools/train/tests -t .
"""
import unittest

from tools.train import codes as C


def product(**kw):
    p = {"id": "1", "supplier": "HP", "name": "X", "title": "HP X"}
    p.update(kw)
    return p


class Normalize(unittest.TestCase):
    def test_nfkc_lower_space(self):
        self.assertEqual(C.norm("  Ｂｌａｃｋ\u00a0\tSILVER  "), "black silver")  # full width, NBSP
        self.assertEqual(C.norm("ﬁbre"), "fibre")  # ligature
        self.assertEqual(C.norm("Cafe\u0301"), "café")  # combining accent composed
        self.assertEqual(C.norm("Café"), C.norm("Cafe\u0301"))
        self.assertEqual(C.norm("ÉTUI"), "étui")

    def test_marks_and_pipes(self):
        self.assertEqual(C.norm("Intel® Core™ i7"), "intel core i7")  # ™ not "tm"
        self.assertEqual(C.norm("a|b"), "a b")
        self.assertEqual(C.norm("a\u200bb\x00c"), "a b c")  # format / control chars
        self.assertEqual(C.norm(None), "")

    def test_part(self):
        self.assertEqual(C.part(" Black "), "black")
        self.assertIsNone(C.part("1234"))  # no letter
        self.assertIsNone(C.part("x" * (C.MAX_PART_CHARS + 1)))
        self.assertIsNone(C.part("  "))


class Codes(unittest.TestCase):
    ATTRS = {"material": "nylon", "colour": "black", "brand": "hp", "category": "notebook case",
             "series": "probook", "model": "4520s"}

    def test_canonical_order(self):
        for code in C.product_codes(self.ATTRS):
            parts = code.split(C.DELIM)
            names = [next(k for k, v in self.ATTRS.items() if v == p) for p in parts]
            self.assertEqual(names, sorted(names, key=C.ORDER.index), code)
        # the same subset asked in any order gives the same code
        self.assertEqual(C.make_code(self.ATTRS, ("colour", "category")),
                         C.make_code(self.ATTRS, ("category", "colour")))
        self.assertEqual(C.make_code(self.ATTRS, ("colour", "category")), "notebook case | black")

    def test_granularity(self):
        self.assertEqual(C.gran("notebook"), "coarse")
        self.assertEqual(C.gran("notebook | hp"), "coarse")
        self.assertEqual(C.gran("notebook | hp | black"), "medium")
        self.assertEqual(C.gran("notebook | hp | probook | 4520s"), "fine")
        self.assertEqual(C.gran("a | b | c | d | e | f"), "fine")
        codes = C.product_codes(self.ATTRS)
        self.assertEqual({C.gran(c) for c in codes}, {"coarse", "medium", "fine"})
        for level, templates in C.TEMPLATES.items():
            for names in templates:
                if names != ("*",):
                    self.assertEqual(C.gran(C.DELIM.join(names)), level, names)
        star = C.make_code(self.ATTRS, ("*",))
        self.assertEqual(len(star.split(C.DELIM)), C.MAX_PARTS)
        self.assertEqual(star, "notebook case | hp | probook | 4520s | black | nylon")

    def test_delimiter(self):
        self.assertEqual(C.DELIM, " | ")
        for code in C.product_codes(self.ATTRS):
            for p in code.split(C.DELIM):
                self.assertEqual(p, p.strip())
                self.assertNotIn("|", p)
        self.assertEqual(C.make_code({"category": "a", "brand": "b"}, ("category", "brand")), "a | b")

    def test_missing_and_duplicates(self):
        self.assertIsNone(C.make_code({"brand": "hp"}, ("category", "brand")))
        codes = C.product_codes({"brand": "hp"})
        self.assertEqual(codes, ["hp"])
        codes = C.product_codes({"category": "mouse", "brand": "mouse"})  # repeated value
        self.assertNotIn("mouse | mouse", codes)
        self.assertEqual(len(codes), len(set(codes)))


class Attributes(unittest.TestCase):
    def setUp(self):
        self.tails = ["toner cartridge", "notebook"]
        self.generic = {"cable", "black"}

    def attrs(self, **kw):
        return C.attributes(product(**kw), self.tails, self.generic)

    def test_title_tail(self):
        p = product(name="ProBook 4520s", title="HP ProBook 4520s Notebook Silver 39.6 cm (15.6\")")
        self.assertEqual(C.title_tail(p), None)  # "Notebook": capitalised, not a tail
        p = product(name="ProBook 4520s", title="HP ProBook 4520s notebook 39.6 cm")
        self.assertEqual(C.title_tail(p), "notebook")
        a = C.attributes(p, self.tails, self.generic)
        self.assertEqual((a["category"], a["brand"], a["series"], a["model"]),
                         ("notebook", "hp", "probook", "4520s"))

    def test_lexicon_head_noun(self):
        self.assertEqual(C.lexicon_category("HP USB Optical 3-button Mouse", []), "mouse")
        self.assertEqual(C.lexicon_category(
            "Tripp Lite Cat6 Gigabit UTP Ethernet Cable (RJ45 M to RJ45 M), Blue", []),
            "networking cable")
        self.assertEqual(C.lexicon_category("C2G 1m USB 2.0 A to Mini-b Cable", []), "usb cable")
        self.assertEqual(C.lexicon_category("OKI Cyan Toner Cartridge for C7100 Series", []),
                         "toner cartridge")
        self.assertEqual(C.lexicon_category("Verbatim CD-R 700 MB 50 pc(s)", []), "blank cd/dvd")

    def test_print_supply(self):
        a = self.attrs(name="49A", title="HP 49A Original Black 1 pc(s)", attr_t_type="Original",
                       attr_t_printing_colours="Black", attr_t_print_technology="Laser printing")
        self.assertEqual(a["category"], "toner cartridge")
        self.assertEqual(a["colour"], "black")
        self.assertEqual(a["type"], "original")
        self.assertEqual(a["model"], "49a")

    def test_model_not_measure(self):
        self.assertEqual(C.series_model("3m Cat6 Patch Cable", "c2g", self.generic), (None, None))
        self.assertEqual(C.series_model("16-Port Gigabit Switch", "x", self.generic), (None, None))
        self.assertEqual(C.series_model("TN-2110", "brother", self.generic), (None, "tn-2110"))
        self.assertEqual(C.series_model("LaserJet™ P4015tn", "hp", self.generic),
                         ("laserjet", "p4015tn"))
        self.assertEqual(C.series_model("VGA Cable", "x", self.generic), (None, None))  # acronym

    def test_colour_and_connectivity(self):
        a = self.attrs(title="Logitech M185 Wireless Mouse Grey", name="M185", supplier="Logitech",
                       attr_t_product_colour="Gray,Black")
        self.assertEqual(a["category"], "mouse")
        self.assertEqual(a["colour"], "grey")  # first value, gray -> grey
        self.assertEqual(a["connectivity"], "wireless")
        a = self.attrs(title="JBL Tune Bluetooth Headphones", name="Tune", supplier="JBL")
        self.assertEqual(a["connectivity"], "bluetooth")

    def test_catalog_line(self):
        items = C.build_catalog([product(id=7, name="ProBook 4520s",
                                         title="HP ProBook 4520s notebook 39.6 cm"),
                                 product(id="8", name="ProBook 4720s",
                                         title="HP ProBook 4720s notebook 43.9 cm")])
        self.assertEqual(set(items[0]), {"id", "title", "attributes", "codes"})
        self.assertEqual(items[0]["id"], "7")
        self.assertIn("notebook | hp | probook | 4520s", items[0]["codes"])
        self.assertIn("notebook", items[1]["codes"])


if __name__ == "__main__":
    unittest.main()
