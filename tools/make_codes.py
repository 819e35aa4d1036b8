#!/usr/bin/env python3
"""Deterministic GRAM code sets ("category | brand | colour" ...) from real product data.

    .venv/bin/python tools/make_codes.py --out FILE --n N [--seed S] [--max-chars C]
                                         [--tokenizer DIR --max-tokens T]

A code is 1-3 lower-cased attribute parts joined by " | ", the first part always a category
(leaf category / product type), e.g. `sofa beds & futons`, `laptop | lenovo | black`,
`curtains | polyester | multicolor`. Writes N distinct codes, one per line (UTF-8, "\\n", no
empty lines), and a one-line summary to stderr.

Order of the output (deterministic for a given --seed and the same input files):
  1. "real" codes: attribute combinations seen together on one real product (or one real
     category node), all of them, shuffled with random.Random(seed);
  2. when those run out: "cartesian" codes, real parts combined freely (category x brand,
     category x brand x colour, category x material x colour, ...), drawn with the same RNG,
     categories and brands taken from the same source (retail vs electronics), skipping
     duplicates.
So `--n 1000` is a random sample of real combinations, `--n 2500000` is every real
combination plus ~2.45M cartesian ones.

Filters (applied before counting to N): --max-chars (whole code, in characters), and
optionally --tokenizer DIR --max-tokens T: keep a code only if
`PreTrainedTokenizerFast.from_pretrained(DIR)(code, add_special_tokens=False)["input_ids"]` has at most
T tokens (the EOS the beam search appends is NOT counted).

Inputs (read-only, ../shared/data, override with --data): flipkart/*.csv.zst (decompressed with
the `zstd` CLI, or the `zstandard` module when installed), chorus-icecat/icecat-products-*.json.zip,
bestbuy-categories/categories.json.gz, wands-queries/query.csv + enriched/query_attributes.csv.
Code sets derived from Flipkart data fall under CC BY-SA 4.0 ("Flipkart product data by
PromptCloud (Kaggle: PromptCloudHQ/flipkart-products), CC BY-SA 4.0"); Icecat parts: "Product
data (c) Icecat N.V. (Open Icecat), provided AS IS under the Icecat Open Content License, via
the Chorus project"; Best Buy taxonomy CC0; WANDS MIT.
"""
import argparse
import csv
import gzip
import io
import json
import random
import re
import subprocess
import sys
import time
import unicodedata
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEP = " | "
MAX_PART_CHARS = 40

# ----------------------------------------------------------------------------- normalisation
_WS = re.compile(r"\s+")
_LETTER = re.compile(r"[^\W\d_]")


def norm(s):
    """Lower-case, NFC, collapse whitespace, trim; None if unusable as a part."""
    if s is None:
        return None
    s = unicodedata.normalize("NFC", str(s))
    s = _WS.sub(" ", s).strip().strip(",;:/-").strip().lower()
    if not s or "|" in s or "..." in s or "…" in s or len(s) > MAX_PART_CHARS:
        return None
    if any(unicodedata.category(c)[0] == "C" for c in s):  # control / format / unassigned
        return None
    if not _LETTER.search(s):  # pure numbers, punctuation
        return None
    return s


def split_multi(s):
    """'Black,Silver' -> ['black', 'silver'] (Icecat/Flipkart multi-valued specs)."""
    if not s:
        return []
    out = []
    for x in str(s).split(","):
        x = norm(x)
        if x and x not in out:
            out.append(x)
    return out


# ----------------------------------------------------------------------------- readers
def read_zst(path: Path) -> str:
    try:
        import zstandard  # type: ignore
        with open(path, "rb") as f:
            return zstandard.ZstdDecompressor().stream_reader(f).read().decode("utf-8")
    except ImportError:
        return subprocess.run(["zstd", "-dc", str(path)], check=True,
                              capture_output=True).stdout.decode("utf-8")


class Pools:
    """Real parts and real combinations, per source domain ('retail' / 'electronics')."""

    def __init__(self):
        self.cats = {"retail": set(), "electronics": set()}
        self.brands = {"retail": set(), "electronics": set()}
        self.colours = set()
        self.materials = set()
        self.records = set()  # (cat, brand, material, colour), None where absent

    def add(self, domain, cat, brand=None, material=None, colour=None):
        cat = norm(cat)
        if not cat:
            return
        brand, material, colour = norm(brand), norm(material), norm(colour)
        self.cats[domain].add(cat)
        if brand:
            self.brands[domain].add(brand)
        if material:
            self.materials.add(material)
        if colour:
            self.colours.add(colour)
        self.records.add((cat, brand, material, colour))


def fk_category_and_brand(name, tree):
    """Flipkart category path -> (leaf category, brand or None).

    Paths look like `Clothing >> Women's Clothing >> ... >> Shorts >> Alisha Shorts >> <name>`:
    the last level is often the product name (or a truncated `...` copy), the one before it
    often `<brand> <parent level>`."""
    tree = tree.strip()
    if tree.startswith("["):
        try:
            tree = json.loads(tree)[0]
        except (ValueError, IndexError):
            tree = tree.strip('[]"')
    levels = [x.strip() for x in tree.split(">>") if x.strip()]
    lname = name.strip().lower()
    first = lname.split(" ")[0] if lname else ""
    brand = None
    keep = []
    for i, lv in enumerate(levels):
        low = lv.lower()
        if lv.endswith("...") or low == lname or (len(low) >= 10 and (
                lname.startswith(low) or low.startswith(lname))):
            continue  # the product name (or a truncated copy of it)
        if i > 0 and keep:
            parent = keep[-1]
            if low.endswith(" " + parent.lower()) and first and low.startswith(first):
                brand = lv[: len(lv) - len(parent)].strip()
                continue  # "<brand> <parent>"
        keep.append(lv)
    if len(keep) < 2:  # a top-level department alone is too coarse
        return None, brand
    return keep[-1], brand


_SPEC = re.compile(r'"key"=>"([^"]*)",\s*"value"=>"([^"]*)"')


def add_variants(P, domain, cat, brand, materials, colours, brand_with_both):
    """cat | brand, then with the first material, the first colour, and both (with the brand
    too when `brand_with_both`)."""
    P.add(domain, cat, brand)
    for m in materials[:1]:
        P.add(domain, cat, brand, m, None)
    for col in colours[:1]:
        P.add(domain, cat, brand, None, col)
        for m in materials[:1]:
            P.add(domain, cat, brand if brand_with_both else None, m, col)


def load(data: Path) -> Pools:
    P = Pools()

    # Flipkart 20k: name + category path.
    fk = read_zst(data / "flipkart" / "flipkart-20k-name-category.csv.zst")
    for row in csv.reader(io.StringIO(fk)):
        if len(row) < 3:
            continue
        cat, brand = fk_category_and_brand(row[1], row[2])
        P.add("retail", cat, brand)

    # Flipkart 1050: + brand column and specs (Color, Material, Type).
    fk = read_zst(data / "flipkart" / "flipkart-1050-full.csv.zst")
    for row in csv.DictReader(io.StringIO(fk)):
        cat, brand = fk_category_and_brand(row["product_name"], row["product_category_tree"])
        specs = {}
        for k, v in _SPEC.findall(row.get("product_specifications", "")):
            specs.setdefault(k.strip().lower(), v)
        brand = row.get("brand") or specs.get("brand") or brand
        colours = split_multi(specs.get("color"))
        materials = split_multi(specs.get("material"))
        for c in [cat if norm(cat) else specs.get("type")]:  # spec Type only as a fallback
            if not norm(c):
                continue
            add_variants(P, "retail", c, brand, materials, colours, brand_with_both=True)

    # Best Buy taxonomy: leaves (minus service/merch trees); "Name Brands > X > X Things".
    cats = json.load(gzip.open(data / "bestbuy-categories" / "categories.json.gz"))
    skip_roots = {"customer service", "gift ideas", "more categories", "best buy outlet",
                  "deal of the day", "top deals", "name brands"}
    for c in cats:
        path = [p["name"] for p in c["path"]]
        if c["subCategories"] or len(path) < 2:
            continue
        root = path[0].lower()
        if root == "name brands" and len(path) >= 3:
            brand = path[1]
            leaf = path[-1]
            if leaf.lower().startswith(brand.lower() + " "):
                P.add("electronics", leaf[len(brand) + 1:], brand)
            continue
        if root in skip_roots or "sports fan shop" in " ".join(path).lower():
            continue
        P.add("electronics", path[-1])

    # Icecat: supplier (brand), product type, colour, material; category = product type,
    # else a category name found in the title.
    icecat = []
    for i in range(1, 5):
        with zipfile.ZipFile(data / "chorus-icecat" / f"icecat-products-{i}.json.zip") as z:
            icecat += json.loads(z.read(f"{i}.json"))
    bad_types = {"original", "compatible", "on-site", "pick-up&return", "system",
                 "spares and accessories", "carry-in", "return to base (rtb)"}
    typed = set()
    for p in icecat:
        for k in ("attr_t_product_type", "attr_t_type"):
            t = norm(p.get(k))
            if t and t not in bad_types:
                typed.add(t)
    vocab = typed | P.cats["electronics"] | P.cats["retail"]
    vocab = {v for v in vocab if len(v) >= 4}
    max_words = 4
    for p in icecat:
        cat = None
        for k in ("attr_t_product_type", "attr_t_type"):
            t = norm(p.get(k))
            if t and t not in bad_types:
                cat = t
                break
        if cat is None:  # longest (then last) category name occurring in the title
            words = _WS.sub(" ", str(p.get("title", "")).lower()).split(" ")
            best = None
            for n in range(max_words, 0, -1):
                for j in range(len(words) - n, -1, -1):
                    g = " ".join(words[j:j + n]).strip(",.;:()")
                    if g in vocab:
                        best = g
                        break
                if best:
                    break
            cat = best
        if not cat:
            continue
        brand = p.get("supplier")
        colours = split_multi(p.get("attr_t_product_colour"))
        materials = split_multi(p.get("attr_t_material"))
        add_variants(P, "electronics", cat, brand, materials, colours, brand_with_both=False)

    # WANDS (Wayfair, furniture/home): query classes and the LLM-derived attribute hints.
    with open(data / "wands-queries" / "query.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            for c in (row.get("query_class") or "").split("|"):
                P.add("retail", c)
    with open(data / "wands-queries" / "enriched" / "query_attributes.csv",
              encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            for path in (row.get("query_classification") or "").split(" sep "):
                leaf = path.split(" / ")[-1]
                if "/" in path:
                    P.add("retail", leaf)
            pc = row.get("product_class")
            mats = [m for m in (norm(x) for x in (row.get("materials") or "").split(" sep "))
                    if m and m != "unknown"]
            if norm(pc) and pc.strip().lower() != "unknown":
                P.add("retail", pc)
                for m in mats[:1]:
                    P.add("retail", pc, None, m, None)
    return P


# ----------------------------------------------------------------------------- codes
SUBSETS = [(0,), (0, 1), (0, 3), (0, 2), (0, 1, 3), (0, 2, 3), (0, 1, 2)]


def real_codes(P: Pools):
    out = set()
    for rec in P.records:
        for sub in SUBSETS:
            parts = [rec[i] for i in sub]
            if all(parts) and len(set(parts)) == len(parts):
                out.add(SEP.join(parts))
    return sorted(out)


# (weight, pattern) for cartesian codes; c=category, b=brand, m=material, o=colour
PATTERNS = [(30, "cb"), (10, "co"), (8, "cm"), (30, "cbo"), (12, "cmo"), (10, "cbm")]


def cartesian_codes(P: Pools, rng: random.Random):
    doms = sorted(P.cats)
    cats = {d: sorted(P.cats[d]) for d in doms}
    brands = {d: sorted(P.brands[d]) for d in doms}
    weights = [len(cats[d]) for d in doms]
    colours, materials = sorted(P.colours), sorted(P.materials)
    pats = [p for _, p in PATTERNS]
    pw = [w for w, _ in PATTERNS]
    pick = rng.choice
    while True:
        d = rng.choices(doms, weights)[0]
        pat = rng.choices(pats, pw)[0]
        parts = []
        for ch in pat:
            if ch == "c":
                parts.append(pick(cats[d]))
            elif ch == "b":
                parts.append(pick(brands[d]))
            elif ch == "m":
                parts.append(pick(materials))
            else:
                parts.append(pick(colours))
        if len(set(parts)) == len(parts):
            yield SEP.join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="output file ('-' for stdout)")
    ap.add_argument("--n", type=int, required=True, help="number of distinct codes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-chars", type=int, default=64, help="longest code, in characters")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--tokenizer", help="HF tokenizer dir for --max-tokens")
    ap.add_argument("--max-tokens", type=int, help="max tokens per code (EOS not counted)")
    args = ap.parse_args()
    if (args.tokenizer is None) != (args.max_tokens is None):
        ap.error("--tokenizer and --max-tokens go together")
    t0 = time.perf_counter()
    P = load(Path(args.data))
    real = real_codes(P)
    rng = random.Random(args.seed)
    rng.shuffle(real)

    tok = None
    if args.tokenizer:
        import os
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import PreTrainedTokenizerFast
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        tok = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)

    seen = set()
    out = []
    n_real = 0
    ntok_max = 0

    def take(batch, is_real):
        nonlocal n_real, ntok_max
        batch = [c for c in batch if len(c) <= args.max_chars and c not in seen]
        if tok is not None and batch:
            ids = tok(batch, add_special_tokens=False)["input_ids"]
            keep = []
            for c, t in zip(batch, ids):
                if len(t) <= args.max_tokens:
                    keep.append(c)
                    ntok_max = max(ntok_max, len(t))
            batch = keep
        for c in batch:
            if len(out) >= args.n:
                return
            if c in seen:
                continue
            seen.add(c)
            out.append(c)
            n_real += is_real

    CH = 4096
    for i in range(0, len(real), CH):
        if len(out) >= args.n:
            break
        take(real[i:i + CH], 1)
    gen = cartesian_codes(P, rng)
    misses = 0
    while len(out) < args.n:
        before = len(out)
        take([next(gen) for _ in range(CH)], 0)
        misses = misses + 1 if len(out) == before else 0
        if misses > 200:
            sys.exit(f"make_codes: only {len(out)} codes possible under these filters")

    text = "\n".join(out) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")
    lens = [len(c) for c in out]
    parts = [c.count(SEP) + 1 for c in out]
    extra = f", max {ntok_max} tokens" if tok is not None else ""
    print(f"make_codes: {len(out)} codes ({n_real} real of {len(real)} available, "
          f"{len(out) - n_real} cartesian; parts 1/2/3 = {parts.count(1)}/{parts.count(2)}/"
          f"{parts.count(3)}), chars mean {sum(lens) / max(1, len(lens)):.1f} max {max(lens, default=0)}"
          f"{extra}; pools: {sum(len(v) for v in P.cats.values())} categories, "
          f"{sum(len(v) for v in P.brands.values())} brands, {len(P.colours)} colours, "
          f"{len(P.materials)} materials; {time.perf_counter() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
