"""Stage 7: the code-size weight, chosen through the engine on the synthetic validation queries.

    python -m tools.train.code_size [--work WORK] [--model DIR] [--index IDX] [--gram PATH]
                                    [--grid 0,0.05,...] [--dry-run]

The engine adds to each query code's prior `-beta * ln n`, n the number of products the code
reaches (`code_size` in gram.json; src/score/ `size_prior`): log P(t | c) if a code's products
were equally likely, so that a product reached through a specific code outranks one among the
thousands of a coarse code of the same likelihood. The weights stage (5) fits S_rele and the
likelihood term; beta is chosen after it, by a grid, through `gram eval` on the exported model
and its index (export.py's WORK/export-index): for each beta the model dir's gram.json gets
`code_size` (a copy of the dir in WORK, hard-linked where the file system allows, as
evaluate.py's `--settings`), and the beta with the best nDCG@10 on the synthetic validation
queries (WORK/queries-valid.jsonl, judged by synth_judgements.py: never the judged queries of
../shared/data) wins; ties go to the higher Recall@300, then to the smaller beta. A winning 0
writes gram.json without `code_size` (the scores of before the term). Writes MODEL/gram.json
(unless --dry-run; a temporary file renamed over it) and WORK/code-size.json (the grid and its
metrics).

On the 16-epoch default (docs/QUALITY.md, "The code-size term") the grid chose 0.25: nDCG@10
75.48 -> 84.44 and Recall@300 82.38 -> 84.56 on these queries.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.train import codes as C
from tools.train.evaluate import settings_model
from tools.train.pairs import read_jsonl
from tools.train.synth_judgements import judgements

GRID = (0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 1.0)


def with_code_size(settings, beta):
    """gram.json `settings` (a dict) with `code_size` weight `beta`; without the key at 0."""
    out = {k: v for k, v in settings.items() if k != "code_size"}
    if beta != 0:
        out["code_size"] = {"weight": beta}
    return out


def choose(results):
    """The best of [{"beta", "ndcg@10", "recall@300"}]: nDCG@10, then Recall@300, then the
    smaller beta."""
    if not results:
        raise ValueError("no grid point was measured")
    return max(results, key=lambda r: (r["ndcg@10"], r["recall@300"], -r["beta"]))


def grid_values(text):
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not (0 <= v <= 1e6) for v in values):
        raise argparse.ArgumentTypeError(f"--grid {text!r}: comma-separated weights in 0..1e6")
    return sorted(set(values))


def measure(gram, index, copy, settings, beta, judged):
    """`gram eval` of `copy` (the model dir's copy) with `code_size` beta in its gram.json."""
    _write(copy / "gram.json", with_code_size(settings, beta))
    r = subprocess.run([str(gram), "eval", "--index", str(index), "--model", str(copy),
                        "--judgements", str(judged), "--threads", "2"],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"gram eval failed for code_size {beta}:\n{r.stderr.strip()}")
    m = json.loads(r.stdout)["metrics"]
    return {"beta": beta, "ndcg@10": m["ndcg@10"], "recall@300": m["recall@300"],
            "recall@10": m["recall@10"], "recall@100": m["recall@100"]}


def _write(path, obj):
    """`obj` as JSON at `path`, through a temporary file renamed over it: an interrupted run
    leaves the old file or the new one, never a truncated one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--model", default=None, help="the exported model dir (default WORK/model)")
    ap.add_argument("--index", default=None, help="its index (default WORK/export-index)")
    ap.add_argument("--gram", default=str(C.REPO / "target" / "release" / "gram"))
    ap.add_argument("--grid", type=grid_values, default=list(GRID))
    ap.add_argument("--dry-run", action="store_true", help="measure and report; leave gram.json")
    args = ap.parse_args(argv)
    work = Path(args.work)
    model = Path(args.model) if args.model else work / "model"
    index = Path(args.index) if args.index else work / "export-index"
    for p, what in ((model / "gram.json", "the exported model's gram.json"),
                    (index / "index.gram", "the exported model's index (export.py)"),
                    (work / "queries-valid.jsonl", "the synthetic validation queries (stage 2)"),
                    (work / "catalog.jsonl", "the catalog (stage 1)")):
        if not p.exists():
            raise SystemExit(f"error: {what} is missing: {p}")
    settings = json.loads((model / "gram.json").read_text())
    items = read_jsonl(work / "catalog.jsonl")
    # In WORK, so that the model dir's copies can be hard links (a tmpfs /tmp would take full
    # copies of the weights).
    with tempfile.TemporaryDirectory(prefix="code-size-", dir=work) as scratch:
        scratch = Path(scratch)
        judged = scratch / "synth-valid.jsonl"
        with open(judged, "w", encoding="utf-8") as f:
            for j in judgements(items, read_jsonl(work / "queries-valid.jsonl")):
                f.write(json.dumps(j) + "\n")
        # One copy of the model dir; its own gram.json (a copy, not a link) is rewritten for
        # each beta.
        copy = settings_model(model, model / "gram.json", scratch / "model")
        results = []
        for beta in args.grid:
            r = measure(args.gram, index, copy, settings, beta, judged)
            print(json.dumps(r), flush=True)
            results.append(r)
    best = choose(results)
    report = {"model": str(model), "judgements": "synth_judgements over " + str(work / "queries-valid.jsonl"),
              "grid": results, "chosen": best["beta"], "written": not args.dry_run}
    _write(work / "code-size.json", report)
    if not args.dry_run:
        _write(model / "gram.json", with_code_size(settings, best["beta"]))
    print(f"code_size {best['beta']}: nDCG@10 {100 * best['ndcg@10']:.2f}, "
          f"Recall@300 {100 * best['recall@300']:.2f}"
          + (" (dry run: gram.json left as it was)" if args.dry_run else f" -> {model / 'gram.json'}"),
          file=sys.stderr)


if __name__ == "__main__":
    main()
