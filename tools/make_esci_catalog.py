#!/usr/bin/env python3
"""ESCI sample → a gram catalog (JSONL: id, title, attributes) for the end-to-end test.

Reads ../shared/data/esci-samples/vespa-sample-products.jsonl.zst (16 real Amazon products judged
for one query; Apache-2.0, see that folder's README/NOTICE) with the `zstd` CLI and writes
tests/golden/esci-catalog.jsonl. Deterministic; no dependency beyond Python and zstd.

    python3 tools/make_esci_catalog.py
"""
import json
import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parent.parent
SRC = REPO.parent / "shared" / "data" / "esci-samples" / "vespa-sample-products.jsonl.zst"
OUT = REPO / "tests" / "golden" / "esci-catalog.jsonl"

text = subprocess.run(["zstd", "-dc", str(SRC)], check=True, capture_output=True, text=True).stdout
lines = []
for line in text.splitlines():
    f = json.loads(line)["fields"]
    attrs = {k: f[k] for k in ("brand", "color") if f.get(k)}
    lines.append(json.dumps({"id": f["id"], "title": f["title"], "attributes": attrs}, ensure_ascii=False))
OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
print(f"{OUT.relative_to(REPO)}: {len(lines)} products")
