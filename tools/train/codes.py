"""Stage 1: GRAM codes from product attributes (chorus-icecat → catalog JSONL + code list).

    python -m tools.train.codes [--data DIR] [--out WORK] [--limit N]

Reads the Icecat products of ../shared/data/chorus-icecat (the zips are read in place with
zipfile; nothing is unpacked), recovers each product's attributes and writes

    WORK/catalog.jsonl   one product a line: {"id","title","attributes","codes"} (gram's format)
    WORK/codes.txt       every distinct code, one a line, sorted
    WORK/codes-stats.json how many products got which attribute, codes per product...

Attributes, in the canonical order a code lists them (ORDER):

    category     recovered from the title (Icecat titles read "Brand Name <category> <specs>"),
                 else a phrase of the category lexicon found in the title, name or description,
                 else print-supply attributes (ink / toner cartridge), else the product-type spec
    brand        `supplier`
    series       the leading word of `name` when it is a product-line word (ProBook, LaserJet...)
    model        the first model-number-like token of `name` (tn-2110, 4520s, bci-6y...)
    type         `attr_t_type` (original, compatible, hdd...) when it is not the category
    connectivity bluetooth / wireless (title words), else wired / wireless (spec)
    colour       product colour spec, else cable colour, else a single printing colour, else a
                 colour word of the title
    material     `attr_t_material` (first value, parentheses dropped)

A code is the values of a subset of the attributes, in ORDER, joined by DELIM (" | "). The
subsets are TEMPLATES: coarse (1–2 attributes), medium (3), fine (4+). Every value is normalized
by `norm` (NFKC, lower case, one space, no "|") and a value that is empty, longer than
MAX_PART_CHARS or without a letter is dropped. Docs: docs/TRAINING.md.

Data license: product data (c) Icecat N.V. (Open Icecat), provided "AS IS" under the Icecat
Open Content License, via the Chorus project (querqy/chorus, Apache-2.0). Outputs derived from
it carry that notice; they are not committed (tools/train/work/ is ignored).
"""
import argparse
import collections
import contextlib
import hashlib
import json
import os
import re
import sys
import unicodedata
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
WORK = Path(__file__).resolve().parent / "work"

DELIM = " | "
ORDER = ("category", "brand", "series", "model", "type", "connectivity", "colour", "material")
MAX_PART_CHARS = 32
MAX_PARTS = 6

# Attribute subsets that make codes. A subset makes a code only when the product has every
# attribute of it; "*" is every attribute the product has (at most MAX_PARTS, the last ones in
# ORDER dropped first).
TEMPLATES = {
    "coarse": [
        ("category",),
        ("brand",),
        ("category", "brand"),
        ("brand", "series"),
        ("category", "colour"),
        ("category", "connectivity"),
    ],
    "medium": [
        ("category", "brand", "series"),
        ("category", "brand", "colour"),
        ("category", "brand", "connectivity"),
        ("category", "brand", "model"),
        ("category", "brand", "type"),
        ("category", "brand", "material"),
        ("brand", "series", "model"),
    ],
    "fine": [
        ("category", "brand", "series", "model"),
        ("category", "brand", "model", "colour"),
        ("*",),
    ],
}

NOTICE = ('Product data (c) Icecat N.V. (Open Icecat), provided "AS IS" under the Icecat Open '
          "Content License, via the Chorus project (querqy/chorus, Apache-2.0).")


# ----------------------------------------------------------------------------- text
_WS = re.compile(r"\s+")
_LETTER = re.compile(r"[^\W\d_]")
_MARKS = dict.fromkeys(map(ord, "®™©℠"), None)


def norm(s):
    """NFKC, lower case, whitespace collapsed, "|" and control characters removed, trimmed.

    ® ™ © are dropped before NFKC (which would turn ™ into "tm")."""
    if s is None:
        return ""
    s = unicodedata.normalize("NFKC", str(s).translate(_MARKS)).lower()
    s = "".join(" " if c == "|" or unicodedata.category(c)[0] == "C" else c for c in s)
    return _WS.sub(" ", s).strip(" ,;:/-")


def part(s):
    """A code part: `norm(s)`, or None when empty, too long or without a letter."""
    s = norm(s)
    if not s or len(s) > MAX_PART_CHARS or not _LETTER.search(s):
        return None
    return s


def gran(code):
    """Granularity of a code: its number of attributes (parts)."""
    n = len(code.split(DELIM))
    return "coarse" if n <= 2 else "medium" if n == 3 else "fine"


def make_code(attrs, names):
    """The code of `attrs` (a dict) over the attribute `names`, in ORDER; None if one is
    missing. `("*",)` takes every attribute present (at most MAX_PARTS)."""
    if names == ("*",):
        names = tuple(a for a in ORDER if attrs.get(a))
        while len(names) > MAX_PARTS:
            names = names[:-1]
    else:
        names = tuple(sorted(names, key=ORDER.index))
    vals = [attrs.get(a) for a in names]
    if not vals or not all(vals):
        return None
    return DELIM.join(vals)


def product_codes(attrs):
    """Every code of a product, in TEMPLATES order, without duplicates. A code whose parts
    repeat a value is skipped. The "*" template lands at whatever granularity it has."""
    out = []
    for level in ("coarse", "medium", "fine"):
        for names in TEMPLATES[level]:
            c = make_code(attrs, names)
            if not c or c in out:
                continue
            parts = c.split(DELIM)
            if len(set(parts)) != len(parts):
                continue
            out.append(c)
    return out


# ----------------------------------------------------------------------------- lexicons
COLOURS = ["black", "white", "grey", "gray", "silver", "blue", "red", "green", "yellow", "pink",
           "orange", "purple", "violet", "brown", "beige", "gold", "cyan", "magenta", "ivory",
           "turquoise", "transparent", "multicolour", "multicolor", "aqua", "bronze", "navy",
           "graphite", "anthracite", "champagne", "titanium"]

# Generic heads that need a qualifier: head -> [(qualifier regex, category)], first match wins;
# the head alone gives the last entry's category when it has qualifier None.
QUALIFIED = {
    "cable": [
        (r"fib(?:re|er)|multimode|singlemode|\bom[1-5]\b|\blc/|\bsc/", "fibre optic cable"),
        (r"\bcat ?(?:5e?|6a?|7|8)\b|\bcat\.?\s?(?:5e?|6a?|7)|ethernet|\butp\b|\bftp\b|\bstp\b|"
         r"patch|network|rj-?45|crossover", "networking cable"),
        (r"\bcoax", "coaxial cable"),
        (r"\bhdmi\b", "hdmi cable"),
        (r"displayport|\bdvi\b|dvi-[adi]|\bvga\b|hd15|s-video|svga|video|composite", "video cable"),
        (r"\busb\b|usb-c|type-c|lightning|micro-?usb", "usb cable"),
        (r"audio|stereo|3\.5 ?mm|\brca\b|\bxlr\b|speaker|toslink|optical", "audio cable"),
        (r"serial|db9|db25|rs-?232|null modem", "serial cable"),
        (r"parallel|centronics|ieee ?1284", "parallel cable"),
        (r"\bsata\b|\bsas\b|\bscsi\b|\bata\b|\bide\b", "storage cable"),
        (r"power|\bac\b|iec|nema|c13|c14|c19|c20", "power cable"),
        (r"firewire|1394", "firewire cable"),
        (r"kvm", "kvm cable"),
        (r"printer", "printer cable"),
        (r"phone|telephone|\brj-?11\b", "telephone cable"),
        (None, "cable"),
    ],
    "adapter": [
        (r"\bhdmi\b|displayport|\bdvi\b|\bvga\b|video", "video adapter"),
        (r"\busb\b|usb-c|type-c", "usb adapter"),
        (r"network|ethernet|wi-?fi|wireless|wlan|powerline|lan\b", "network adapter"),
        (r"power|\bac\b|charger|\bdc\b", "power adapter"),
        (r"serial|db9|db25|rs-?232|d-sub|gender", "cable interface/gender adapter"),
        (r"audio|stereo|3\.5 ?mm|\brca\b", "audio adapter"),
        (None, "adapter"),
    ],
    "card": [
        (r"graphics|video card|geforce|radeon|quadro", "graphics card"),
        (r"memory card|\bsd\b|sdhc|sdxc|microsd|compact ?flash|\bcf\b", "memory card"),
        (r"network|ethernet|gigabit|nic\b|lan\b", "networking card"),
        (r"sound|audio", "audio card"),
        (None, None),
    ],
}

# phrase (regex, matched on normalized text) -> category. Hand-written from general product
# vocabulary; Icecat's own category names (the title tails) are added at run time.
ALIASES = [
    (r"toner cartridges?|\btoner\b", "toner cartridge"),
    (r"cartridges?", "printer cartridge"),
    (r"maintenance kit|fuser kit|roller kit", "printer kit"),
    (r"laserjet|deskjet|officejet|designjet|phaser|workcentre|pixma|ecotank|stylus pro", "printer"),
    (r"ink cartridges?|ink tank|\bink\b|printhead cartridge", "ink cartridge"),
    (r"print ?heads?", "print head"),
    (r"drum(?: unit| kit| cartridge)?", "printer drum"),
    (r"fuser(?: unit| kit| assembly)?", "fuser"),
    (r"notebooks?|laptops?|ultrabook|chromebook|netbook", "notebook"),
    (r"notebook (?:case|bag|sleeve)|laptop (?:case|bag|sleeve)|carrying case|briefcase|messenger bag",
     "notebook case"),
    (r"backpack", "backpack"),
    (r"case|bag|sleeve|pouch", "bag/case"),
    (r"mouse|mice", "mouse"),
    (r"mouse pad|mousepad|mouse mat", "mouse pad"),
    (r"keyboard", "keyboard"),
    (r"keyboard (?:drawer|tray)", "keyboard tray"),
    (r"headphones?|earphones?|earbuds?|in-ear|on-ear|over-ear", "headphones/headset"),
    (r"headsets?", "headphones/headset"),
    (r"speakers?|soundbar|loudspeakers?", "loudspeaker"),
    (r"monitor|lcd display|led display|tft display", "computer monitor"),
    (r"\btv\b|television|plasma tv|lcd tv", "tv"),
    (r"projector|beamer", "data projector"),
    (r"projector lamp|replacement lamp|\blamp\b", "projector lamp"),
    (r"processors?|\bcpu\b", "processor"),
    (r"motherboard|mainboard|desktop board", "motherboard"),
    (r"memory module|\bdimm\b|sodimm|\bddr\d?\b|\bram\b", "memory module"),
    (r"memory card|\bsd card|microsd|sdhc|sdxc|compactflash|compact flash", "memory card"),
    (r"flash drive|usb stick|memory stick|pen drive|thumb drive", "usb flash drive"),
    (r"\bssd\b|solid state drive", "internal solid state drive"),
    (r"\bhdd\b|hard drive|hard disk", "internal hard drive"),
    (r"external hard drive|portable hard drive|external hdd", "external hard drive"),
    (r"optical drive|dvd drive|cd drive|dvd-?rw drive|blu-?ray drive|dvd burner", "optical disc drive"),
    (r"\bcd-r\b|\bdvd[-+]r\b|\bdvd[-+]rw\b|\bcd-rw\b|blank (?:cd|dvd)", "blank cd/dvd"),
    (r"\bups\b|uninterruptible power|smart-ups|back-ups|battery backup", "uninterruptible power supply"),
    (r"\bpdu\b|power distribution", "power distribution unit"),
    (r"surge (?:protector|suppressor)|surgearrest", "surge protector"),
    (r"power strip|extension (?:cord|lead|socket)|power extension", "power extension"),
    (r"power supply|\bpsu\b", "power supply unit"),
    (r"power adapter|ac adapter|inverter", "power adapter/inverter"),
    (r"charger|charging station", "mobile device charger"),
    (r"power bank|powerbank|portable battery|external battery", "power bank"),
    (r"batter(?:y|ies)|\baaa?\b|\bcr\d{4}\b|\blr\d+\b", "battery"),
    (r"photo paper|photo glossy|glossy photo", "photo paper"),
    (r"\bpaper\b|copy paper|printing paper", "printing paper"),
    (r"labels?", "label"),
    (r"label (?:tape|cassette)|tze|dk-\d+", "label-making tape"),
    (r"label (?:printer|maker)", "label printer"),
    (r"printer|\bmfp\b|all-in-one|multifunction", "printer"),
    (r"laser(?:jet)? printer|laser mfp", "laser printer"),
    (r"inkjet printer|deskjet|officejet", "inkjet printer"),
    (r"scanner", "scanner"),
    (r"router", "wireless router"),
    (r"access point", "wireless access point"),
    (r"switch", "network switch"),
    (r"kvm switch|\bkvm\b", "kvm switch"),
    (r"\bhub\b", "interface hub"),
    (r"docking station|port replicator|\bdock\b", "notebook dock/port replicator"),
    (r"webcam|web camera", "webcam"),
    (r"camera", "digital camera"),
    (r"camera lens|\blens\b", "camera lens"),
    (r"camera (?:bag|case)", "camera case"),
    (r"tripod", "tripod"),
    (r"graphics card|video card", "graphics card"),
    (r"\bfan\b|cooler|heatsink|heat sink", "computer cooling component"),
    (r"rack|enclosure|cabinet", "rack"),
    (r"rack (?:shelf|rail|mount kit|accessory)|blanking panel", "rack accessory"),
    (r"mount|bracket", "mounting kit"),
    (r"wall mount|tv mount|monitor mount|desk mount", "flat panel mount"),
    (r"privacy filter|privacy screen", "display privacy filters"),
    (r"screen protector", "screen protector"),
    (r"phone case|mobile phone case|iphone case|smartphone case", "mobile phone case"),
    (r"tablet case|ipad case", "tablet case"),
    (r"smartphones?|mobile phones?|\biphone\b|\bgalaxy s\d+", "smartphone"),
    (r"tablets?|\bipad\b", "tablet"),
    (r"smart ?watch|smartwatch|activity tracker|fitness tracker", "smartwatch"),
    (r"stylus|digital pen", "stylus pen"),
    (r"calculator", "calculator"),
    (r"shredder", "paper shredder"),
    (r"laminator", "laminator"),
    (r"microphone", "microphone"),
    (r"radio", "radio"),
    (r"mp3 player|mp4 player|audio player|media player", "mp3/mp4 player"),
    (r"photo ?frame", "digital photo frame"),
    (r"shaver|razor", "men's shaver"),
    (r"coffee (?:maker|machine)|espresso", "coffee maker"),
    (r"kettle", "electric kettle"),
    (r"vacuum", "vacuum"),
    (r"hair dryer", "hair dryer"),
    (r"iron\b", "iron"),
    (r"toothbrush", "electric toothbrush"),
    (r"transceiver|\bsfp\+?\b|gbic", "network transceiver module"),
    (r"media converter", "network media converter"),
    (r"antenna", "network antenna"),
    (r"modem", "modem"),
    (r"server", "server"),
    (r"workstation", "workstation"),
    (r"desktop (?:pc|computer)|tower pc|all-in-one pc|gaming pc|mini pc", "pc"),
    (r"thin client", "thin client"),
    (r"software|license|licence", "software license/upgrade"),
    (r"warranty|care pack|support|service", "warranty/support extension"),
    (r"cable tie|cable management", "cable tie"),
    (r"cable lock|security lock|\block\b", "cable lock"),
    (r"connector|coupler|jack|plug", "wire connector"),
    (r"splitter", "network splitter"),
    (r"extender", "av extender"),
    (r"tray|feeder", "tray/feeder"),
    (r"ribbon", "printer ribbon"),
    (r"transparenc(?:y|ies)|film", "printing film"),
    (r"binder|folder", "folder"),
    (r"puzzle", "jigsaw puzzle"),
    (r"doll|toy|figure", "toy"),
    (r"game", "video game"),
    (r"console", "game console"),
    (r"controller|gamepad|joystick", "gaming controller"),
    (r"remote control", "remote control"),
    (r"bulb|halogen", "light bulb"),
    (r"light|lamp", "lamp"),
]
_ALIASES = [(re.compile(r"(?<![\w-])(?:%s)(?![\w(])" % p), c) for p, c in ALIASES]
_QUALIFIED = {h: [(re.compile(q) if q else None, c) for q, c in v] for h, v in QUALIFIED.items()}
_HEADS = re.compile(r"(?<![\w-])(%s)s?(?![\w])" % "|".join(QUALIFIED))

# Title tails that are not categories.
TAIL_JUNK = {"blank", "black", "white", "other", "not categorized", "portable", "multifunctional",
             "component", "holder", "original", "compatible", "series", "pc", "pcs", "pc(s)",
             "with", "for", "and", "in", "x", "mm", "cm", "m", "ft", "in.", "inch"}
_TAILWORD = re.compile(r"^[a-z][a-z\-/&']*$")
# Where a title's main noun phrase ends: the head noun is the last category phrase before it.
_SEGMENT_END = re.compile(r"\s(?:for|with|w/|incl\.?|including|compatible|to fit)\s|\s[-–—]\s|[,(;]")


def title_tail(p):
    """Icecat's own category name: the lower-case words right after "Brand Name" in a title
    built as "Brand Name <category> <specs>", or None."""
    title, pre = p.get("title") or "", f"{p.get('supplier', '')} {p.get('name', '')}"
    if not title.startswith(pre + " "):
        return None
    words = []
    for w in title[len(pre):].split():
        w2 = w.rstrip(",")
        if not _TAILWORD.match(w2):
            break
        words.append(w2)
        if w2 != w:
            break
    tail = " ".join(words)
    if not tail or tail in TAIL_JUNK or len(tail) > MAX_PART_CHARS:
        return None
    return tail


def _best(matches):
    """The head-noun match: the one ending last, then the longest."""
    return max(matches, key=lambda m: (m[1], m[1] - m[0]))[2] if matches else None


def lexicon_category(text, tails):
    """A category phrase found in `text` (normalized): Icecat tail names and ALIASES, generic
    heads (cable, adapter, card) with their qualifier. The head noun of the main noun phrase
    wins (the match ending last in the text before " for ", " with ", " - ", "(" ...)."""
    text = norm(text)
    if not text:
        return None
    cut = _SEGMENT_END.search(" " + text + " ")
    segs = [text[:max(cut.start() - 1, 0)]] if cut and cut.start() > 1 else []
    segs.append(text)
    for seg in segs:
        found = []
        for rx, cat in _ALIASES:
            for m in rx.finditer(seg):
                found.append((m.start(), m.end(), cat))
        for t in tails:
            i = seg.rfind(t)
            if i >= 0 and (i == 0 or not seg[i - 1].isalnum()) and (
                    i + len(t) == len(seg) or not seg[i + len(t)].isalnum()):
                found.append((i, i + len(t), t))
        for m in _HEADS.finditer(seg):
            head = m.group(1)
            for rx, cat in _QUALIFIED[head]:
                if cat and (rx is None or rx.search(seg)):
                    found.append((m.start(), m.end(), cat))
                    break
        best = _best(found)
        if best:
            return best
    return None


def print_supply_category(p):
    """Ink or toner cartridges that say neither in the title ("HP 49A Original Black")."""
    if not any(k in p for k in ("attr_t_printing_colours", "attr_n_black_toner_page_yield",
                                "attr_n_colour_toner_page_yield", "attr_t_ink_type",
                                "attr_n_black_ink_page_yield", "attr_n_colour_ink_page_yield")):
        return None
    if str(p.get("attr_t_type", "")).lower() not in ("original", "compatible", ""):
        return None
    tech = norm(p.get("attr_t_print_technology", ""))
    if "attr_t_ink_type" in p or "ink" in tech or "attr_n_black_ink_page_yield" in p:
        return "ink cartridge"
    if "laser" in tech or "led" in tech or "toner" in " ".join(p):
        return "toner cartridge"
    return "printer cartridge"


def spec_category(p, tails):
    """The product-type spec, through the lexicon when it names a known category."""
    for k in ("attr_t_product_type", "attr_t_type"):
        v = part(p.get(k))
        if v and v not in ("original", "compatible", "1", "on-site", "pc") and len(v) > 2:
            return lexicon_category(v, tails) or v
    return None


# ----------------------------------------------------------------------------- attributes
_MODEL = re.compile(r"^(?=.*\d)(?=.*[a-z])[a-z0-9][a-z0-9\-./+]*$|^\d{3,}[a-z0-9\-]*$")
_MEASURE = re.compile(r"^\d+(?:[.,]\d+)?(?:-\d+(?:[.,]\d+)?)?-?(?:m|cm|mm|ft|in|inch|gb|tb|mb|kb|ghz|mhz|w|kw|v|va|kva|"
                      r"mah|p|pcs|pc|pk|x|u|port|ports|pin|bit|mbps|gbps|g|kg|ml|l|pages|sheets|"
                      r"dpi|ppm|hz|awg|mp|rpm|mbit|bit|k|\")$|^\d+(?:[.,]\d+)?x\d+|^(?:cat\.?\d+[a-z]?|rj-?\d+|db\d+|hd\d+|[a-z]{1,2}\d)$")
_SERIES = re.compile(r"^[a-z][a-z\-]*[a-z]$")


def generic_words(products):
    """Words that are not product-line names: written in lower case inside at least two titles,
    or found in the names of more than one brand (a series belongs to one brand)."""
    lower, brands = collections.Counter(), collections.defaultdict(set)
    for p in products:
        for w in re.findall(r"(?<![\w-])[a-z][a-z\-]+(?![\w-])", p.get("title", "")):
            lower[w] += 1
        for w in set(norm(p.get("name", "")).split()):
            brands[w].add(p.get("supplier"))
    return ({w for w, n in lower.items() if n >= 2} | {w for w, b in brands.items() if len(b) > 1}
            | set(COLOURS) | {"original", "compatible", "genuine"})


def series_model(name, brand, generic):
    """(series, model) from a product name: series = the leading word when it is a product-line
    word (letters only, at least 3, some lower case as written — "VGA", "SATA" are acronyms —,
    not generic, not the brand); model = the first of the first six tokens with digits that is
    not a measurement (3m, 16-port, 10x22, cat6, rj45...)."""
    raw = [w.strip("(),;:'\"*") for w in
           unicodedata.normalize("NFKC", str(name).translate(_MARKS)).split()]
    raw = [w for w in raw if w]
    series = model = None
    if raw:
        w0, r0 = norm(raw[0]), raw[0]
        if _SERIES.match(w0) and len(w0) >= 3 and w0 not in generic and w0 != brand \
                and any(c.islower() for c in r0):
            series = w0
    for w in raw[:6]:
        w = norm(w).rstrip(".-/")
        if _MODEL.match(w) and not _MEASURE.match(w) and len(w) <= 20:
            model = w
            break
    return part(series), part(model)


def first_value(v):
    if v is None:
        return None
    return part(re.sub(r"\s*\([^)]*\)", "", str(v).split(",")[0]))


def colour_of(p, title):
    """A print supply's single printing colour (several: "multicolour"), else the product or
    cable colour spec (first value), else the first colour word of the title."""
    pc = [c for c in (part(x) for x in str(p.get("attr_t_printing_colours", "")).split(",")) if c]
    if len(pc) == 1:
        return pc[0]
    if len(pc) > 1:
        return "multicolour"
    for k in ("attr_t_product_colour", "attr_t_cable_colour"):
        if p.get(k):
            c = first_value(p[k])
            if c:
                return "grey" if c == "gray" else c
    m = re.search(r"(?<![\w-])(%s)(?![\w-])" % "|".join(COLOURS), title)
    if m:
        return "grey" if m.group(1) == "gray" else m.group(1)
    return None


def connectivity_of(p, title):
    if re.search(r"\bbluetooth\b", title) or p.get("attr_b_bluetooth") is True and \
            re.search(r"headphone|headset|speaker|mouse|keyboard|earbud", title):
        return "bluetooth"
    if re.search(r"\bwireless\b|\bwi-?fi\b|\bcordless\b", title):
        return "wireless"
    ct = norm(p.get("attr_t_connectivity_technology", ""))
    if ct in ("wired", "wireless"):
        return ct
    return None


def attributes(p, tails, generic):
    """The attributes of one raw Icecat product (dict name -> normalized value; absent ones
    left out)."""
    title = norm(p.get("title"))
    brand = part(p.get("supplier"))
    cat = title_tail(p)
    cat = part(cat) if cat else None
    if not cat:
        for text in (p.get("title"), p.get("name"), p.get("short_description")):
            cat = lexicon_category(text or "", tails)
            if cat:
                break
    if cat in (None, "printer cartridge"):
        cat = print_supply_category(p) or cat
    cat = cat or spec_category(p, tails)
    series, model = series_model(p.get("name", ""), brand, generic)
    typ = part(p.get("attr_t_type"))
    if typ in ("1",) or (typ and cat and (typ == cat or typ in cat)):
        typ = None
    a = {
        "category": part(cat),
        "brand": brand,
        "series": series if series not in (cat, typ) else None,
        "model": model,
        "type": typ,
        "connectivity": connectivity_of(p, title),
        "colour": colour_of(p, title),
        "material": first_value(p.get("attr_t_material")),
    }
    return {k: v for k, v in a.items() if v}


# ----------------------------------------------------------------------------- I/O
def load_products(data=DATA):
    """The raw Icecat products (list of dicts), in file order."""
    ps = []
    for i in range(1, 5):
        with zipfile.ZipFile(Path(data) / "chorus-icecat" / f"icecat-products-{i}.json.zip") as z:
            ps += json.loads(z.read(f"{i}.json"))
    return ps


def learn_tails(products, min_count=2):
    """Icecat category names seen as title tails at least `min_count` times, longest first."""
    c = collections.Counter(t for t in map(title_tail, products) if t)
    return sorted((t for t, n in c.items() if n >= min_count), key=lambda t: (-len(t), t))


def build_catalog(products):
    """[{"id","title","attributes","codes"}] for every product, in input order."""
    tails, generic = learn_tails(products), generic_words(products)
    out = []
    for p in products:
        a = attributes(p, tails, generic)
        out.append({"id": str(p["id"]), "title": _WS.sub(" ", str(p["title"])).strip(),
                    "attributes": a, "codes": product_codes(a)})
    return out


@contextlib.contextmanager
def replacing(path):
    """A text file (UTF-8) to write in place of `path`: written as PATH.tmp and renamed over
    `path` when the block ends, removed if the block fails, so a later stage reads the old file
    or the new one, never a part of one (as code_size.py's `_write`)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_catalog(items, work):
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    with replacing(work / "catalog.jsonl") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    codes = sorted({c for it in items for c in it["codes"]})
    with replacing(work / "codes.txt") as f:
        f.write("\n".join(codes) + "\n")
    attr = collections.Counter(k for it in items for k in it["attributes"])
    per = [len(it["codes"]) for it in items]
    g = collections.Counter(gran(c) for c in codes)
    stats = {"products": len(items), "codes": len(codes), "codes_by_granularity": dict(g),
             "codes_per_product_mean": sum(per) / max(len(per), 1),
             "products_without_codes": sum(1 for n in per if n == 0),
             "attribute_coverage": dict(attr.most_common()), "notice": NOTICE}
    with replacing(work / "codes-stats.json") as f:
        f.write(json.dumps(stats, indent=1) + "\n")
    return stats


def sample(items, n):
    """The n items with the smallest sha1(id), in input order: a fixed, spread sample."""
    keep = set(sorted((hashlib.sha1(it["id"].encode()).hexdigest(), it["id"]) for it in items)[:n])
    keep = {i for _, i in keep}
    return [it for it in items if it["id"] in keep]


def read_catalog(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=str(WORK))
    ap.add_argument("--limit", type=int, default=0,
                    help="keep N products: those with the smallest sha1(id), a fixed sample (the CI "
                         "subset; the lexicons still learn from every product)")
    args = ap.parse_args(argv)
    ps = load_products(args.data)
    items = build_catalog(ps)
    if args.limit:
        items = sample(items, args.limit)
    stats = write_catalog(items, args.out)
    print(json.dumps({k: v for k, v in stats.items() if k != "notice"}), file=sys.stderr)


if __name__ == "__main__":
    main()
