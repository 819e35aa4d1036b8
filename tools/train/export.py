"""Stage 6: export a trained model as a directory the engine loads, and check it through the
engine.

    python -m tools.train.export [--work WORK] [--model DIR] --out models/NAME
                                 [--gram PATH] [--no-verify] [--no-catalog]

Writes OUT/config.json, model.safetensors (f32), tokenizer.json, tokenizer_config.json,
gram.json (from stage 5), catalog.jsonl and codes.txt (the catalog the model was trained on,
with its codes: what `gram index build` indexes), NOTICE (data attribution). Then, unless
`--no-verify`, runs the engine on it and compares with transformers:

1. `gram lm --model OUT --prompt P --top 5` against transformers' next-token log-probs;
2. `gram codes --model OUT --codes OUT/codes.txt PROMPT...` against gen.generate (the same
   codes in the same order, scores within 1e-3);
3. `gram index build --model OUT --catalog OUT/catalog.jsonl --out IDX` and
   `gram search --index IDX QUERY`;
4. `gram serve --index IDX` on a free port: `POST /v1/search` answers each query with the
   codes `gram search` gave, and SIGINT stops the server with status 0;

and writes the results to WORK/export-check.json. The engine binary is `--gram` (default
target/release/gram; build it with `cargo build --release`).

The export is written to OUT.new beside OUT and checked there; only a model that passed (or
with `--no-verify`) replaces OUT, by renaming directories (OUT to OUT.old, OUT.new to OUT, then
OUT.old removed), so a failed check or an interrupted export leaves OUT as it was (the failed
export stays in OUT.new; an export killed between the renames is put back from OUT.old by the
next run). Files of the old OUT that the export does not write (with `--no-catalog` its
catalog.jsonl and codes.txt) are copied into the new one, as an export in place left them; its
model card (README.md), eval.json and train-log.jsonl only when the weights are the same, and then also the keys
of its gram.json that the export's lacks (`code_size`, written by the size stage into OUT
only). A model directory whose gram.json is older than its weights (sft or align ran again
after the weights stage) is refused. WORK/export-index is built from OUT.new and names it as its
model: use it with `--model OUT` (code_size.py does).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from tools.train import codes as C
from tools.train import common as K
from tools.train import gen as G

NOTICE = """Model weights, tokenizer and catalog in this directory are derived from product data
(c) Icecat N.V. (Open Icecat), provided "AS IS" under the Icecat Open Content License, via the
Chorus project (querqy/chorus, Apache-2.0). The data is provided "AS IS", without warranty of
any kind. Judgement data used for validation: Chorus (Apache-2.0).
"""

CHECK_PROMPTS = ["laptop", "hdmi cable", "hp toner", "wireless mouse", "usb c charger"]


def run(cmd, **kw):
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr[-2000:]}")
    return r.stdout, time.time() - t


def check_settings_fresh(src, trained=True):
    """Refuses a model directory without a gram.json, and a training output (WORK/align or
    WORK/sft, `trained`) whose gram.json is older than its weights: the scoring weights were
    fitted to an earlier model (sft or align ran again after the weights stage), and shipping
    them with these weights would score with another model's fit. A directory named with
    --model is not judged by its files' times (a checkout or a copy sets them in any order)."""
    g, w = src / "gram.json", src / "model.safetensors"
    if not g.exists():
        raise SystemExit(f"error: {src} has no gram.json: run the weights stage first")
    if trained and w.exists() and g.stat().st_mtime < w.stat().st_mtime:
        raise SystemExit(f"error: {g} is older than {w} (fitted to an earlier model): run the "
                         "weights stage again")


def export(src, out, catalog, with_catalog=True, trained=True):
    check_settings_fresh(src, trained)
    out.mkdir(parents=True, exist_ok=True)
    model = K.load_model(src)
    # RoPE has no learned positions: room for the engine's longest prompt + code (the catalog's
    # longest title is 98 tokens, a query at most 64, a code 16)
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, 256)
    model.save_pretrained(str(out), safe_serialization=True)
    gc = out / "generation_config.json"
    if gc.exists():
        gc.unlink()
    for f in ("tokenizer.json", "tokenizer_config.json", "gram.json"):
        shutil.copyfile(src / f, out / f)
    if with_catalog:
        # Only codes the model was trained to generate (at most MAX_CODE_TOKENS with the EOS;
        # SFT, alignment and the weights stage drop longer ones): the engine generates from
        # the index's trie, so a longer code there would be one the model never learned.
        tok = K.Tok(src / "tokenizer.json")
        items = C.read_catalog(catalog)
        for it in items:
            it["codes"] = [c for c in it["codes"] if len(tok.code(c)) <= K.MAX_CODE_TOKENS]
        with open(out / "catalog.jsonl", "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps(it, ensure_ascii=False) + "\n")
        codes = sorted({c for it in items for c in it["codes"]})
        (out / "codes.txt").write_text("\n".join(codes) + "\n", encoding="utf-8")
    (out / "NOTICE").write_text(NOTICE)


# What `out` holds about its own model (its card, its measured quality): carried into an export
# of the same weights only.
MODEL_NOTES = ("README.md", "eval.json", "train-log.jsonl")


def carry_over(out, new):
    """Copies into `new` what the directory `out` holds that the export did not write (nothing
    when `out` does not exist). When the weights are the same, the keys of out's gram.json that
    the export's lacks (`code_size`, which the size stage writes into the exported model only)
    are kept; when they differ, out's model card and eval.json describe another model and are
    left behind, said on stderr."""
    if not out.is_dir():
        return
    same = ((out / "model.safetensors").is_file()
            and (out / "model.safetensors").read_bytes() == (new / "model.safetensors").read_bytes())
    if same and (out / "gram.json").is_file():
        old, fresh = (json.loads((d / "gram.json").read_text()) for d in (out, new))
        kept = {k: v for k, v in old.items() if k not in fresh}
        if kept:
            with C.replacing(new / "gram.json") as f:
                f.write(json.dumps({**fresh, **kept}, indent=1) + "\n")
    left = []
    for f in sorted(out.iterdir()):
        if f.name == "generation_config.json" or (new / f.name).exists():
            continue
        if not same and f.name in MODEL_NOTES:
            left.append(f.name)
            continue
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, new / f.name)
    if not same:
        print(f"export: {out} held other weights: its " + (", ".join(left) or "files")
              + " not carried over" + (" (they describe that model)" if left else "")
              + "; its gram.json's own keys (code_size) dropped: run the size stage again",
              file=sys.stderr)


def replace_dir(new, out):
    """Directory `new` renamed to `out`; an existing `out` renamed away first (OUT.old) and
    removed after, or put back if the rename fails."""
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    had = out.exists()
    if had:
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if had:
            os.replace(old, out)
        raise
    if had:
        shutil.rmtree(old)


def verify(out, gram, work):
    res = {}
    tok = K.Tok(out / "tokenizer.json")
    model = K.load_model(out).eval()
    settings = json.loads((out / "gram.json").read_text())
    # 1. next-token log-probs
    lm = []
    for q in CHECK_PROMPTS:
        p = settings["query_template"].replace("{query}", q)
        o, _ = run([gram, "lm", "--model", out, "--prompt", p, "--top", "5", "--threads", "2"])
        e = json.loads(o)
        ids = tok.prompt(p)
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
        err = max(abs(ref[t["id"]].item() - t["logprob"]) for t in e["top"])
        top_ref = torch.topk(ref, 5).indices.tolist()
        lm.append({"prompt": p, "tokens_equal": e["tokens"] == ids,
                   "top_ids_equal": [t["id"] for t in e["top"]] == top_ref, "max_abs_err": err})
    res["lm"] = lm
    # 2. codes
    codes = (out / "codes.txt").read_text().splitlines()
    trie = G.CodeTrie(codes, tok)
    prompts = [settings["query_template"].replace("{query}", q) for q in CHECK_PROMPTS]
    o, secs = run([gram, "codes", "--model", out, "--codes", out / "codes.txt", "--threads", "2",
                   *prompts])
    eng = [json.loads(line) for line in o.splitlines() if line.strip()]
    hf = G.generate(model, tok, prompts, trie, beam=10)
    cmp = []
    for e, h in zip(eng, hf):
        ec = [(c["code"], c["score"]) for c in e["codes"]]
        same = [c for c, _ in ec] == [c for c, _ in h]
        err = max((abs(a[1] - b[1]) for a, b in zip(ec, h)), default=0.0)
        cmp.append({"prompt": e["prompt"], "codes_equal": same, "max_score_err": err,
                    "engine": [c for c, _ in ec][:5], "transformers": [c for c, _ in h][:5]})
    res["codes"] = cmp
    res["codes_seconds"] = round(secs, 2)
    # 3. index + search
    idx = work / "export-index"
    if idx.exists():
        shutil.rmtree(idx)
    o, secs = run([gram, "index", "build", "--model", out, "--catalog", out / "catalog.jsonl",
                   "--out", idx, "--threads", "2"])
    res["index_build_seconds"] = round(secs, 1)
    o, secs = run([gram, "search", "--index", idx, "--k", "5", "--threads", "2", *CHECK_PROMPTS])
    res["search"] = [{"query": r["query"], "codes": [c["code"] for c in r["codes"]][:5],
                      "top": [p["title"] for p in r["products"]][:5]}
                     for r in map(json.loads, o.splitlines())]
    res["search_seconds"] = round(secs, 2)
    # 4. the same index served over HTTP: the same codes as `gram search`
    res["serve"] = serve_check(gram, idx, CHECK_PROMPTS, res["search"])
    res["ok"] = len(lm) == len(CHECK_PROMPTS) and len(cmp) == len(prompts) \
        and all(x["tokens_equal"] and x["top_ids_equal"] and x["max_abs_err"] < 1e-3 for x in lm) \
        and all(x["codes_equal"] and x["engine"] and x["max_score_err"] < 1e-3 for x in cmp) \
        and len(res["search"]) == len(CHECK_PROMPTS) and all(x["codes"] for x in res["search"]) \
        and res["serve"]["ok"]
    return res


def serve_check(gram, idx, queries, searched):
    """`gram serve --index IDX` on a free loopback port: POST /v1/search for each query must
    answer 200 with the codes `gram search` gave; then SIGINT must stop it with status 0."""
    import signal
    import threading
    import urllib.error
    import urllib.request
    proc = subprocess.Popen([str(gram), "serve", "--index", str(idx), "--addr", "127.0.0.1:0",
                             "--threads", "2", "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = {"answers": [], "ok": False}
    # A server that hangs before it says it is ready would block the read below: killed after
    # 120 s, which ends it.
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        addr = None
        for line in proc.stderr:
            if "ready addr=" in line:
                addr = "".join(ch for ch in line.split("ready addr=")[1].split()[0]
                               if ch.isdigit() or ch in ".:")
                break
        watchdog.cancel()
        if addr is None:
            out["error"] = "gram serve ended (or hung 120 s) before it was ready"
            return out
        # Keep reading its log, so that a full pipe never blocks the server.
        import threading
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        for q, want in zip(queries, searched):
            req = urllib.request.Request(f"http://{addr}/v1/search",
                                         data=json.dumps({"query": q, "k": 5}).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    body = json.loads(r.read())
                    got = [c["code"] for c in body["codes"]][:5]
                    out["answers"].append({"query": q, "status": r.status, "codes_equal": got == want["codes"],
                                           "products": len(body["products"])})
            except urllib.error.HTTPError as e:
                out["answers"].append({"query": q, "status": e.code, "error": e.read().decode(errors="replace"),
                                       "codes_equal": False, "products": 0})
            except (urllib.error.URLError, OSError) as e:
                out["answers"].append({"query": q, "status": None, "error": str(e),
                                       "codes_equal": False, "products": 0})
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGINT)
        try:
            out["exit"] = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out["exit"] = "killed after 30 s"
    out["ok"] = len(out["answers"]) == len(queries) and out["exit"] == 0 and all(
        a["status"] == 200 and a["codes_equal"] and a["products"] > 0 for a in out["answers"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--model", default=None,
                    help="default WORK/align, else WORK/sft (an align older than sft refused)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--gram", default=str(C.REPO / "target" / "release" / "gram"))
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--no-catalog", action="store_true")
    ap.add_argument("--verify-only", action="store_true", help="check an exported DIR (--out) again")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    work = Path(args.work)
    # A link to the model dir: the export goes where it points (renaming the link itself away
    # would leave its target as it was).
    out = Path(args.out).resolve() if Path(args.out).is_symlink() else Path(args.out)
    log = K.Log(work / "train-log.jsonl")
    # Exported and checked beside OUT, then swapped in: OUT keeps the model it had until a new
    # one passed.
    new = out if args.verify_only else out.with_name(out.name + ".new")
    old = out.with_name(out.name + ".old")
    if not out.exists() and old.is_dir():
        # An export killed between its two renames left the last model in OUT.old: put back
        # before anything reads OUT (the carry-over) or removes OUT.old.
        os.replace(old, out)
        print(f"export: {out} restored from {old} (an earlier export stopped mid-swap)",
              file=sys.stderr)
    if not args.verify_only:
        src = Path(args.model) if args.model else K.trained_model(work)
        if new.exists():
            shutil.rmtree(new)
        export(src, new, work / "catalog.jsonl", not args.no_catalog, trained=not args.model)
        carry_over(out, new)
        log(stage="export", src=str(src), out=str(out),
            files={f.name: f.stat().st_size for f in sorted(new.iterdir()) if f.is_file()})
    if not args.no_verify:
        res = verify(new, args.gram, work)
        with C.replacing(work / "export-check.json") as f:
            f.write(json.dumps(res, indent=1) + "\n")
        log(stage="export", verify_ok=res["ok"], index_build_seconds=res["index_build_seconds"],
            search_seconds=res["search_seconds"])
        if not res["ok"]:
            print(json.dumps(res, indent=1), file=sys.stderr)
            raise SystemExit("engine and transformers disagree on the exported model"
                             + ("" if args.verify_only else
                                f": {out} left as it was, the export is in {new}"))
    if not args.verify_only:
        replace_dir(new, out)


if __name__ == "__main__":
    main()
