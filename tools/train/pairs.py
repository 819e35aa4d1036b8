"""Stage 2: training pairs. Product→code from the catalog, query→code from queries synthesized
from product attributes and titles the way users type; the visible judged queries only as
validation; split by query, products held out for a cold-start check.

    python -m tools.train.pairs [--work WORK] [--data DIR] [--per-product N] [--seed S]

Reads WORK/catalog.jsonl (stage 1) and the chorus-icecat judgements; writes to WORK:

    pairs-train.jsonl   {"kind": "product"|"query", "text", "code", "n"}: what SFT learns
    pairs-valid.jsonl   query→code pairs of the validation queries (split by query)
    queries-train.jsonl {"query", "attrs", "pids"}: synthetic training queries and the products
                        they were made from (co-alignment and S_rele weights use them)
    queries-valid.jsonl the same for the validation queries
    cold.jsonl          held-out products {"id", "title", "codes"} and their own synthetic
                        queries: nothing of them is trained on
    judged.jsonl        the visible judged queries {"query", "grades": {docid: grade}}
    pairs-stats.json

Standard library only. Docs: docs/TRAINING.md.
"""
import argparse
import collections
import csv
import hashlib
import json
import random
import re
import sys
from pathlib import Path

from tools.train import codes as C

# Surface forms users type for a category, besides the category itself (hand-written, general
# product vocabulary; a slash name "a/b" also gives "a" and "b").
CATEGORY_WORDS = {
    "notebook": ["laptop", "notebook computer", "laptop computer"],
    "notebook case": ["laptop bag", "laptop case", "notebook bag", "laptop sleeve"],
    "toner cartridge": ["toner", "laser toner", "toner cartridges"],
    "ink cartridge": ["ink", "ink cartridges", "printer ink"],
    "printer cartridge": ["cartridge", "printer cartridge"],
    "uninterruptible power supply": ["ups", "battery backup", "ups battery"],
    "power distribution unit": ["pdu", "power strip"],
    "networking cable": ["ethernet cable", "network cable", "cat6 cable", "patch cable", "lan cable"],
    "fibre optic cable": ["fiber cable", "fiber optic cable", "fibre cable"],
    "headphones/headset": ["headphones", "headset", "earphones"],
    "internal solid state drive": ["ssd", "solid state drive"],
    "internal hard drive": ["hard drive", "hdd", "hard disk"],
    "external hard drive": ["portable hard drive", "external hdd"],
    "memory module": ["ram", "memory", "ddr memory"],
    "memory card": ["sd card", "micro sd card", "flash card"],
    "usb flash drive": ["usb stick", "flash drive", "thumb drive", "memory stick"],
    "computer monitor": ["monitor", "screen", "display"],
    "data projector": ["projector", "beamer"],
    "projector lamp": ["projector bulb", "replacement lamp"],
    "processor": ["cpu", "processors"],
    "motherboard": ["mainboard", "motherboards"],
    "graphics card": ["video card", "gpu"],
    "loudspeaker": ["speaker", "speakers"],
    "mobile device charger": ["charger", "phone charger"],
    "power adapter/inverter": ["power adapter", "ac adapter", "power supply"],
    "power supply unit": ["psu", "power supply"],
    "power extension": ["extension cord", "extension lead"],
    "surge protector": ["surge suppressor", "power strip"],
    "mobile phone case": ["phone case", "phone cover"],
    "smartphone": ["phone", "mobile phone", "cell phone"],
    "smartwatch": ["smart watch", "fitness tracker"],
    "tablet": ["tablet pc"],
    "network switch": ["switch", "ethernet switch", "gigabit switch"],
    "wireless router": ["router", "wifi router"],
    "wireless access point": ["access point", "wifi access point"],
    "notebook dock/port replicator": ["docking station", "dock", "port replicator"],
    "interface hub": ["usb hub", "hub"],
    "kvm switch": ["kvm"],
    "printing paper": ["paper", "copy paper", "printer paper"],
    "photo paper": ["glossy photo paper", "photo printing paper"],
    "label-making tape": ["label tape", "labeling tape"],
    "printer drum": ["drum", "drum unit"],
    "optical disc drive": ["dvd drive", "cd drive", "dvd burner"],
    "blank cd/dvd": ["blank dvd", "blank cd", "cd-r", "dvd-r"],
    "battery": ["batteries"],
    "household battery": ["batteries", "aa batteries"],
    "digital camera": ["camera"],
    "camera lens": ["lens", "camera lenses"],
    "keyboard": ["keyboards", "computer keyboard"],
    "mouse": ["computer mouse", "mice"],
    "pc": ["desktop", "desktop computer", "computer"],
    "tv": ["television", "flat screen tv"],
    "video cable": ["vga cable", "dvi cable", "monitor cable"],
    "usb cable": ["usb cord", "charging cable"],
    "audio cable": ["aux cable", "stereo cable"],
    "mp3/mp4 player": ["mp3 player", "music player"],
    "rack": ["server rack", "rack cabinet"],
    "display privacy filters": ["privacy filter", "privacy screen"],
}
COLOUR_WORDS = {"grey": ["gray"], "multicolour": ["multicolor", "colour", "color"]}

# Query patterns: (weight, attributes the query names, pattern). Order inside a query follows
# the pattern (users type "hp toner", "toner hp", "black hp toner"...).
PATTERNS = [
    (6, "category"), (6, "brand category"), (1, "category brand"), (3, "colour category"),
    (3, "connectivity category"), (2, "brand colour category"), (2, "material category"),
    (3, "brand"), (3, "brand series"), (2, "series"), (2, "brand series category"),
    (4, "model"), (4, "brand model"), (3, "brand model category"), (2, "series model"),
    (1, "brand type category"), (1, "brand connectivity category"), (3, "title"),
    (4, "spec category"), (2, "spec"),
]
# "spec": one or two neighbouring title words that are no attribute value, stopword or
# measurement ("android tablet", "rtx 2060", "gps watch"); the query names the category.
STOPWORDS = {"with", "for", "and", "the", "to", "of", "in", "on", "x", "pc(s)", "pcs", "pc", "w/",
             "-", "–", "/", "+", "&", "cm", "mm", "m", "ft", "in.", "inch", "gb", "tb", "mb", "kg",
             "g", "w", "v", "mah", "pixels", "dpi", "ppm", "hz", "ghz", "mhz", "original", "black",
             "white", "grey", "silver", "blue", "red"}
IMPLIES = {"model": ("brand", "series", "category"), "series": ("brand",)}

_WS = re.compile(r"\s+")


def qnorm(q):
    """How queries are compared for the split and the leakage checks: `codes.norm`."""
    return C.norm(q)


def stable_hash(s):
    return int(hashlib.sha1(s.encode("utf-8")).hexdigest()[:12], 16)


def is_cold(title, percent):
    """A product is held out for the cold-start check when sha1 of its normalized title falls
    in the first `percent` % of the hash range (by title, not id: some products share a
    title, and all of them go to the same side)."""
    return stable_hash("cold:" + C.norm(title)) % 1000 < percent * 10


def split_key(q):
    """What decides a query's side of the validation split: its letter and digit runs, sorted,
    with `gray` as `grey` and `.com` dropped. Variants a user types for one query — `tn-2110`,
    `tn2110`, `tn 2110`; `backpack thule`, `thule backpack`; `startech.com`, `startech` — then
    land on one side (split by the exact string, 7.6 % of the validation queries had such a
    twin in training)."""
    q = qnorm(q).replace("gray", "grey").replace(".com", "")
    return " ".join(sorted(re.findall(r"[^\W\d_]+|\d+", q)))


def plural_fold(word):
    """`word` without a plural ending, for words of four characters or more: `-ies` -> `-y`
    (`batteries`), `-sses` / `-xes` / `-ches` / `-shes` lose `-es` (`boxes`), else a final `-s`
    goes unless it ends `-ss`, `-us` or `-is` (`glass`, `status`, `chassis`). Both sides of a
    comparison fold the same way, so an odd stem (`series` -> `sery`) still matches itself."""
    if len(word) < 4 or not word.endswith("s"):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes")):
        return word[:-2]
    if word.endswith(("ss", "us", "is")):
        return word
    return word[:-1]


def judged_key(q):
    """What makes a synthetic query a visible judged query's twin: the split key with each word
    singular (`plural_fold`), so `keyboards` matches the judged `keyboard` and `extension cord`
    the judged `extension cords` (since the fortieth session; before, the split key alone)."""
    return " ".join(sorted(plural_fold(w) for w in split_key(q).split()))


# The rules a run's split and twin filter follow (`pairs-stats.json`'s `rules`): the session
# that last changed them. The checks of a run's files apply today's rules to runs made by them.
RULES = 42


def is_valid_query(q, percent):
    """A query's side of the validation split, by its plural-folded split key (`judged_key`):
    `batteries` and `battery` land on one side (since the forty-second session; by the split
    key alone 25 of a run's 1,564 validation queries had a plural twin in training)."""
    return stable_hash("valid:" + judged_key(q)) % 1000 < percent * 10


def surface(attr, value, rng):
    """One way a user writes an attribute value."""
    if attr == "category":
        forms = [value] + CATEGORY_WORDS.get(value, [])
        if "/" in value:
            forms += [w.strip() for w in value.split("/") if w.strip()]
        words = value.split()
        if len(words) > 1 and rng.random() < 0.15:
            forms.append(words[-1])
        return rng.choice(forms)
    if attr == "colour":
        return rng.choice([value] + COLOUR_WORDS.get(value, []))
    if attr == "model":
        r = rng.random()
        if "-" in value and r < 0.25:
            return value.replace("-", "")
        if "-" in value and r < 0.35:
            return value.replace("-", " ")
        return value
    if attr == "brand":
        v = value.replace("startech.com", "startech") if rng.random() < 0.5 else value
        return v
    return value


KEYBOARD = "qwertyuiop asdfghjkl zxcvbnm"


def typo(q, rng):
    """One misspelling in one word of at least four letters: drop, swap, double or a
    neighbouring key."""
    words = q.split()
    idx = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not idx:
        return q
    i = rng.choice(idx)
    w = words[i]
    j = rng.randrange(1, len(w) - 1)
    kind = rng.randrange(4)
    if kind == 0:
        w = w[:j] + w[j + 1:]
    elif kind == 1:
        w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    elif kind == 2:
        w = w[:j] + w[j] + w[j:]
    else:
        row = next((r for r in KEYBOARD.split() if w[j] in r), None)
        if row:
            k = row.index(w[j])
            n = row[max(k - 1, 0):k + 2].replace(w[j], "")
            if n:
                w = w[:j] + rng.choice(n) + w[j + 1:]
    words[i] = w
    return " ".join(words)


def title_query(item, rng):
    """The first 2–4 words of the title, lower-cased (users paste or half-type titles); the
    attributes it names are those whose value it contains."""
    words = C.norm(item["title"]).split()
    q = " ".join(words[:rng.randint(2, 4)])
    named = tuple(a for a, v in item["attributes"].items() if v and re.search(
        r"(?<![\w])%s(?![\w])" % re.escape(v), q))
    return q, named


def spec_query(item, rng):
    """(spec words, spec words + a category surface form) from the title, or None. Spec words
    are title words that name no attribute (the query is labelled as naming the category only,
    so a word of any attribute's value — a model number, a colour, a type — would make its
    targets and its relevance wrong), no stopword and no measurement."""
    a = item["attributes"]
    skip = set(STOPWORDS)
    for k in C.ORDER:
        skip.update(str(a.get(k) or "").split())
    raw = C.norm(item["title"]).split()
    words = [w.strip("(),;:\"'") for w in raw]
    # A stopword is checked before stripping too: "pc(s)" stripped is "pc(s", no stopword.
    ok = [i for i, (r, w) in enumerate(zip(raw, words)) if w and w not in skip and r not in skip
          and C._LETTER.search(w) and not C._MEASURE.match(w) and len(w) >= 2]
    if not ok:
        return None
    i = rng.choice(ok)
    spec = words[i]
    if i + 1 < len(words) and words[i + 1] not in skip and rng.random() < 0.5:
        spec += " " + words[i + 1]
    return spec


def code_attrs(code, attrs):
    """The attribute names of a code's parts, given the product's attributes."""
    inv = {}
    for a in C.ORDER:
        if attrs.get(a):
            inv.setdefault(attrs[a], a)
    return tuple(inv.get(p) for p in code.split(C.DELIM))


def targets(item, named):
    """The product's codes a query naming attributes `named` should generate: those whose
    attributes are all named or implied (a model implies brand, series and category; a series
    implies the brand)."""
    s = set(named)
    for a in list(s):
        s.update(IMPLIES.get(a, ()))
    out = []
    for c in item["codes"]:
        names = code_attrs(c, item["attributes"])
        if None not in names and set(names) <= s:
            out.append(c)
    return out


def synth_queries(item, n, rng, typo_rate=0.06):
    """Up to n (query, named attributes, base) for one product, distinct queries; `base` is the
    query before its misspelling (the query itself when it has none), which decides its side
    of the split and whether it is a judged query's twin."""
    attrs = item["attributes"]
    usable = [(w, p) for w, p in PATTERNS
              if p == "title" or all(attrs.get(a) for a in p.replace("spec", "category").split())]
    out, seen = [], set()
    for _ in range(n * 4):
        if len(out) >= n or not usable:
            break
        pat = rng.choices([p for _, p in usable], weights=[w for w, _ in usable])[0]
        if pat == "title":
            q, named = title_query(item, rng)
        elif pat.startswith("spec"):
            spec = spec_query(item, rng)
            if not spec:
                continue
            q = spec if pat == "spec" else f"{spec} {surface('category', attrs['category'], rng)}"
            named = ("category",)
        else:
            names = pat.split()
            q = " ".join(surface(a, attrs[a], rng) for a in names)
            named = tuple(names)
        base = qnorm(q)
        if rng.random() < typo_rate:
            q = typo(q, rng)
        q = qnorm(q)
        if not q or q in seen or not targets(item, named):
            continue
        seen.add(q)
        out.append((q, named, base))
    return out


def read_judged(data):
    """Visible judged queries: {query: {docid: grade}} from Broad_Query_Set_rated.csv and
    the final ratings of Broad_Query_Set_individual_ratings.csv (rated.csv wins where they
    differ). The 45 held-out queries are not in these files."""
    d = Path(data) / "chorus-icecat"
    grades = collections.defaultdict(dict)
    with open(d / "Broad_Query_Set_individual_ratings.csv", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r.get("final_rating", "").strip():
                grades[r["query"]][r["docid"]] = int(float(r["final_rating"]))
    with open(d / "Broad_Query_Set_rated.csv", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r.get("rating", "").strip():
                grades[r["query"]][r["docid"]] = int(float(r["rating"]))
    return dict(grades)


def relevant(item, named, src):
    """`item` has `src`'s value of every attribute in `named` (a missing value matching a
    missing one)."""
    return all(item["attributes"].get(a) == src["attributes"].get(a) for a in named)


def relevant_to(item, row, by_id):
    """Whether `item` is relevant to the synthetic query `row` (queries-*.jsonl): it has the
    values of one of the products the query was made from, on the attributes that product's
    query named (`sources`). A query two products made ("apc power supply" from a power supply
    and from an adapter) was judged on the union of their attributes against the first only,
    so the second source was not relevant to its own query. Rows without `sources` (older
    work directories): that old rule."""
    sources = row.get("sources")
    if sources is None:
        return relevant(item, row["attrs"], by_id[row["pids"][0]])
    return any(relevant(item, s["attrs"], by_id[s["pid"]]) for s in sources if s["pid"] in by_id)


def build(items, judged, per_product=4, seed=0, cold_percent=5.0, valid_percent=5.0):
    """Everything stage 2 writes, as Python objects (see the module doc)."""
    rng = random.Random(seed)
    # A synthetic query is a judged one's twin when it, or the query it misspells, has a judged
    # query's key (its words in any order, `tn-2110` as `tn 2110`, singular or plural): a
    # misspelling of "printer" trained on the codes of printers is "printer" learnt with one
    # typo, and "keyboards" is "keyboard".
    judged_keys = {judged_key(q) for q in judged}

    def judged_twin(q, base):
        return judged_key(q) in judged_keys or judged_key(base) in judged_keys
    train_pairs = collections.Counter()
    valid_pairs = collections.Counter()
    # Per query: the union of the attributes named, its source products, and what each source's
    # own query named (relevance is judged against each source on its own attributes).
    # And the query it misspells, when it is a misspelling (the first one's, for its side).
    qsrc = {"train": collections.defaultdict(lambda: [set(), set(), {}, None]),
            "valid": collections.defaultdict(lambda: [set(), set(), {}, None])}
    cold, cold_queries = [], collections.defaultdict(set)
    dropped_judged = 0
    side = {}
    for it in items:
        if is_cold(it["title"], cold_percent):
            cold.append({"id": it["id"], "title": it["title"], "codes": it["codes"]})
            for q, named, base in synth_queries(it, per_product, rng):
                if not judged_twin(q, base):
                    cold_queries[q].add(it["id"])
            continue
        for c in it["codes"]:
            train_pairs[("product", it["title"], c)] += 1
        for q, named, base in synth_queries(it, per_product, rng):
            if judged_twin(q, base):
                dropped_judged += 1
                continue
            # By the query it misspells: a query and its misspellings land on one side (and a
            # query string keeps the side it first got, whatever query it came from).
            split = side.setdefault(q, "valid" if is_valid_query(base, valid_percent) else "train")
            pairs = valid_pairs if split == "valid" else train_pairs
            for c in targets(it, named):
                pairs[("query", q, c)] += 1
            qsrc[split][q][0].update(named)
            qsrc[split][q][1].add(it["id"])
            qsrc[split][q][2].setdefault(it["id"], set()).update(named)
            if qsrc[split][q][3] is None:
                qsrc[split][q][3] = base
    train_q = set(qsrc["train"])
    # A cold product's query that some training product also produced is not cold.
    cold_q = [{"query": q, "pids": sorted(p)} for q, p in sorted(cold_queries.items())
              if q not in train_q and q not in qsrc["valid"]]

    def qlist(d):
        rows = []
        for q, (a, p, src, base) in sorted(d.items()):
            row = {"query": q, "attrs": sorted(a, key=C.ORDER.index), "pids": sorted(p),
                   "sources": [{"pid": i, "attrs": sorted(src[i], key=C.ORDER.index)}
                               for i in sorted(src)]}
            if base != q:
                row["misspells"] = base
            rows.append(row)
        return rows

    def plist(c):
        return [{"kind": k, "text": t, "code": code, "n": n} for (k, t, code), n in sorted(c.items())]

    return {
        "pairs-train": plist(train_pairs),
        "pairs-valid": plist(valid_pairs),
        "queries-train": qlist(qsrc["train"]),
        "queries-valid": qlist(qsrc["valid"]),
        "cold": {"products": cold, "queries": cold_q},
        "judged": [{"query": q, "grades": g} for q, g in sorted(judged.items())],
        "stats": {
            "products": len(items), "cold_products": len(cold),
            "train_product_pairs": sum(1 for k in train_pairs if k[0] == "product"),
            "train_query_pairs": sum(1 for k in train_pairs if k[0] == "query"),
            "train_queries": len(qsrc["train"]), "valid_queries": len(qsrc["valid"]),
            "valid_query_pairs": len(valid_pairs), "cold_queries": len(cold_q),
            "judged_queries": len(judged), "synthetic_queries_judged_twins_dropped": dropped_judged,
            "seed": seed, "per_product": per_product, "rules": RULES,
        },
    }


def write(out, work):
    work = Path(work)
    # Each file through a temporary one renamed over it (`codes.replacing`): an interrupted run
    # leaves whole files.
    for name in ("pairs-train", "pairs-valid", "queries-train", "queries-valid", "judged"):
        with C.replacing(work / f"{name}.jsonl") as f:
            for r in out[name]:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with C.replacing(work / "cold.jsonl") as f:
        for r in out["cold"]["products"]:
            f.write(json.dumps(dict(r, kind="product"), ensure_ascii=False) + "\n")
        for r in out["cold"]["queries"]:
            f.write(json.dumps(dict(r, kind="query"), ensure_ascii=False) + "\n")
    with C.replacing(work / "pairs-stats.json") as f:
        f.write(json.dumps(out["stats"], indent=1) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--data", default=str(C.DATA))
    ap.add_argument("--per-product", type=int, default=4, help="synthetic queries per product")
    ap.add_argument("--cold-percent", type=float, default=5.0)
    ap.add_argument("--valid-percent", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    items = C.read_catalog(Path(args.work) / "catalog.jsonl")
    out = build(items, read_judged(args.data), args.per_product, args.seed,
                args.cold_percent, args.valid_percent)
    write(out, args.work)
    print(json.dumps(out["stats"]), file=sys.stderr)


if __name__ == "__main__":
    main()
