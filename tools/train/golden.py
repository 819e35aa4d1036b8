"""Golden outputs of an exported GRAM model from transformers, for the engine's CI check of the
shipped default model (tests/default_model.rs).

    .venv/bin/python -m tools.train.golden --model models/gram-icecat-2m --limit 300 \
        --out tests/golden/gram-icecat-2m.json

For each check query (export.CHECK_PROMPTS), with the model's query template applied:
- the prompt's token ids and transformers' 5 most likely next tokens with their log-probs;
- every next-token log-prob (f64 log-softmax, stored as f32) in OUT's sibling `*-logprobs.f32`
  (little-endian, one row of the vocabulary per query, in order), for the engine's check of
  every element;
- transformers' constrained beam search (gen.generate: beam 10, HF's stopping rule, length
  penalty 1, `prefix_allowed_tokens_fn` over a trie) over the codes of the first `--limit`
  products of the model's catalog.jsonl: the codes an index of those products offers, so the
  engine's search on that index must return the same codes in the same order with the same
  scores.
"""
import argparse
import json
from pathlib import Path

import torch
import transformers

from tools.train import common as K
from tools.train import gen as G
from tools.train.export import CHECK_PROMPTS


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an exported model directory")
    ap.add_argument("--limit", type=int, default=300, help="catalog lines whose codes form the trie")
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    # One thread, as the other oracles: the f32 sums' order (and so the last bits) does not
    # depend on the machine's core count.
    torch.set_num_threads(1)
    model_dir = Path(args.model)
    tok = K.Tok(model_dir / "tokenizer.json")
    model = K.load_model(model_dir).eval()
    settings = json.loads((model_dir / "gram.json").read_text())
    lines = (model_dir / "catalog.jsonl").read_text().splitlines()[: args.limit]
    codes = sorted({c for line in lines for c in json.loads(line)["codes"]})
    trie = G.CodeTrie(codes, tok)
    prompts = [settings["query_template"].replace("{query}", q) for q in CHECK_PROMPTS]
    beams = G.generate(model, tok, prompts, trie, beam=args.beam)
    queries = []
    rows = []
    for q, p, found in zip(CHECK_PROMPTS, prompts, beams):
        ids = tok.prompt(p)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        rows.append(lp.float())
        top = torch.topk(lp, 5)
        queries.append({
            "query": q,
            "prompt": p,
            "prompt_ids": ids,
            "top": [{"id": i, "logprob": v} for i, v in zip(top.indices.tolist(), top.values.tolist())],
            "codes": [{"code": c, "score": s} for c, s in found],
        })
    out = {
        "made_by": f".venv/bin/python -m tools.train.golden --model {args.model} --limit {args.limit} "
                   f"--beam {args.beam} --out {args.out}",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "model": str(args.model),
        "catalog_lines": len(lines),
        "codes": len(codes),
        "beam": args.beam,
        "max_new_tokens": K.MAX_CODE_TOKENS,
        "queries": queries,
    }
    out_path = Path(args.out)
    rows_path = out_path.with_name(out_path.stem + "-logprobs.f32")
    out["logprobs_file"] = rows_path.name
    out["vocab"] = int(rows[0].numel())
    rows_path.write_bytes(torch.stack(rows).numpy().astype("<f4").tobytes())
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{args.out}: {len(queries)} queries, {len(codes)} codes from {len(lines)} products")


if __name__ == "__main__":
    main()
