"""The whole GRAM training pipeline, one stage after the other, each one command.

    python -m tools.train.pipeline [--ci] [--work WORK] [--out DIR] [--from STAGE] [--to STAGE]
                                   [--sft-minutes M] [--seed S] [--gram PATH]

Stages: codes → pairs → sft → align → weights → export → size (the code-size weight, chosen
through the engine) (→ eval, when the BM25/eval script and `gram` are there). Every stage runs as `python -m tools.train.<stage>` with fixed seeds and
appends its losses and events to WORK/train-log.jsonl; a stage's wall time is logged too.

`--ci`: the CI-sized check — 300 products (a fixed sha1 sample), a 135k-parameter model, about a
minute of SFT, a short co-alignment, weights, export to WORK/model and the engine checks of
export.py (codes equal to transformers', index build, search). Run it nice'd:

    nice -n 10 .venv/bin/python -m tools.train.pipeline --ci
    nice -n 10 .venv/bin/python -m tools.train.pipeline --out models/gram-icecat-2m
"""
import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tools.train import codes as C

STAGES = ["codes", "pairs", "sft", "align", "weights", "export", "size", "eval"]


def commands(args, work):
    py = [sys.executable, "-m"]
    w = ["--work", str(work)]
    ci = args.ci
    out = args.out or str(work / "model")
    s = ["--seed", str(args.seed)]
    return {
        "codes": py + ["tools.train.codes", "--out", str(work)] + (["--limit", "300"] if ci else []),
        "pairs": py + ["tools.train.pairs"] + w + s,
        "sft": py + ["tools.train.sft"] + w + s + (["--config", "ci"] if ci else
                                                   ["--minutes", str(args.sft_minutes)]),
        "align": py + ["tools.train.align"] + w + s + (["--pairs", "120", "--per-pair", "2"] if ci else
                                                       ["--minutes", str(args.align_minutes)]),
        "weights": py + ["tools.train.weights"] + w + s + (["--queries", "40", "--valid-queries", "20"]
                                                           if ci else []),
        "export": py + ["tools.train.export"] + w + ["--out", out, "--gram", args.gram],
        "size": py + ["tools.train.code_size"] + w + ["--model", out, "--gram", args.gram]
        + (["--grid", "0,0.25"] if ci else []),
        "eval": py + ["tools.train.evaluate"] + w + ["--model", out, "--gram", args.gram],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ci", action="store_true")
    ap.add_argument("--work", default=None, help="default tools/train/work (ci: tools/train/work/ci)")
    ap.add_argument("--out", default=None, help="exported model dir (default WORK/model)")
    ap.add_argument("--from", dest="first", default="codes", choices=STAGES)
    ap.add_argument("--to", dest="last", default=None, choices=STAGES)
    ap.add_argument("--sft-minutes", type=float, default=45)
    ap.add_argument("--align-minutes", type=float, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gram", default=str(C.REPO / "target" / "release" / "gram"))
    args = ap.parse_args(argv)
    work = Path(args.work) if args.work else (C.WORK / "ci" if args.ci else C.WORK)
    work.mkdir(parents=True, exist_ok=True)
    last = args.last or ("eval" if (Path(__file__).parent / "evaluate.py").exists() else "export")
    todo = STAGES[STAGES.index(args.first):STAGES.index(last) + 1]
    # The stages from export on run the engine (from the repository's root): say so before an
    # hour of training, and before an earlier run's checkpoints are cleared below, not after.
    gram = Path(args.gram) if Path(args.gram).is_absolute() else C.REPO / args.gram
    if {"export", "size", "eval"} & set(todo) and not gram.is_file():
        raise SystemExit(f"{gram}: no gram binary, which the export, size and eval stages run; "
                         f"build it first (cargo build --release --bin gram) or pass --gram PATH")
    args.gram = str(gram)
    # The eval stage's baseline is bm25s: missing, it failed the last stage after the hour.
    if "eval" in todo and importlib.util.find_spec("bm25s") is None:
        raise SystemExit("the eval stage needs bm25s (pinned in tools/train-requirements.txt): "
                         f"{sys.executable} -m pip install -r tools/train-requirements.txt, "
                         "or --to size to stop before it")
    if "sft" in todo:
        for d in ("tokenizer", "sft", "align"):
            shutil.rmtree(work / d, ignore_errors=True)
    cmds = commands(args, work)
    log = work / "train-log.jsonl"
    for stage in todo:
        t = time.time()
        print(f"== {stage}: {' '.join(cmds[stage])}", flush=True)
        r = subprocess.run(cmds[stage], cwd=C.REPO)
        with open(log, "a") as f:
            f.write(json.dumps({"stage": stage, "event": "wall", "seconds": round(time.time() - t, 1),
                                "rc": r.returncode, "cmd": " ".join(cmds[stage][2:])}) + "\n")
        if r.returncode != 0:
            raise SystemExit(f"stage {stage} failed ({r.returncode})")
    print(f"== done: {work}", flush=True)


if __name__ == "__main__":
    main()
