"""What the torch stages share: the prompt templates, tokenization exactly as the engine does it,
packed rows (one prompt followed by several codes, each code attending to the prompt and to
itself only), and per-token code log-probabilities from them.

A packed row is `prompt + code_1 + EOS + code_2 + EOS + ...` with a 4-D attention mask: prompt
tokens are causal among themselves, a code's tokens see the prompt and the earlier tokens of
the same code, and each code's positions restart right after the prompt. So every code is
scored exactly as if it followed the prompt alone (checked in tests/test_torch.py), while the
prompt is computed once. The first token of every code is predicted by the prompt's last row.

Tokenization follows the engine (src/catalog.rs, src/trie.rs): the prompt is `tokenizer(prompt)`
(our tokenizer adds no special tokens), a code is `tokenizer(code)` alone, then EOS.
"""
import json
import math
import random
from pathlib import Path

import torch

QUERY_TEMPLATE = "Q: {query}\n"
PRODUCT_TEMPLATE = "P: {title}\n"
MAX_CODE_TOKENS = 16  # EOS included (gram-spec.md's default)
MAX_PROMPT_TOKENS = 128  # the longest catalog title is 98 tokens; the engine never truncates


def query_prompt(q):
    # Stripped as the engine trims a query (`str::trim` in src/search.rs), so that a query with
    # surrounding whitespace gets the same prompt in training, weight fitting and serving.
    # (pairs.py's synthetic queries are words joined by single spaces: none had any.)
    return QUERY_TEMPLATE.replace("{query}", q.strip())


def product_prompt(t):
    return PRODUCT_TEMPLATE.replace("{title}", t)


class Tok:
    """tokenizer.json through the `tokenizers` library, as the engine reads it."""

    def __init__(self, path):
        from tokenizers import Tokenizer
        self.tk = Tokenizer.from_file(str(path))
        self.eos = self.tk.token_to_id("</s>")
        self.pad = self.tk.token_to_id("<pad>")
        self.vocab_size = self.tk.get_vocab_size()
        self._cache = {}

    def prompt(self, text):
        """The prompt's ids, whole: the engine never truncates a prompt, so a model trained on a
        cut one would be indexed and queried on another (a longer prompt is an error; raise
        MAX_PROMPT_TOKENS, which the export's positions must cover)."""
        ids = self.tk.encode(text).ids if len(text) else []
        if len(ids) > MAX_PROMPT_TOKENS:
            raise ValueError(f"a prompt of {len(ids)} tokens, over MAX_PROMPT_TOKENS "
                             f"({MAX_PROMPT_TOKENS}; it was cut silently): {text[:80]!r}...")
        return ids

    def code(self, code):
        """Code tokens + EOS."""
        ids = self._cache.get(code)
        if ids is None:
            ids = self.tk.encode(code, add_special_tokens=False).ids + [self.eos]
            self._cache[code] = ids
        return ids


def pack_rows(groups, max_codes=8):
    """[(prompt_ids, [code_ids, ...])] → the same with at most `max_codes` codes a row."""
    out = []
    for p, cs in groups:
        for i in range(0, len(cs), max_codes):
            out.append((p, cs[i:i + max_codes]))
    return out


def collate(rows, pad_id, weights=None):
    """Packed rows → model inputs and the loss targets.

    Returns input_ids (B, T), attention mask (B, 1, T, T) float (0 / -inf), position_ids (B, T),
    and the targets: `b`, `row` (the position whose logits predict), `tgt` (the token), `code`
    (which code of the batch, 0..), `weight` (per token) — flat tensors of equal length."""
    T = max(len(p) + sum(len(c) for c in cs) for p, cs in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    allowed = torch.zeros((B, T, T), dtype=torch.bool)
    tb, trow, ttgt, tcode, tw = [], [], [], [], []
    k = 0
    for b, (p, cs) in enumerate(rows):
        P = len(p)
        ids[b, :P] = torch.tensor(p)
        pos[b, :P] = torch.arange(P)
        allowed[b, :P, :P] = torch.tril(torch.ones(P, P, dtype=torch.bool))
        s = P
        for j, c in enumerate(cs):
            n = len(c)
            ids[b, s:s + n] = torch.tensor(c)
            pos[b, s:s + n] = torch.arange(P, P + n)
            allowed[b, s:s + n, :P] = True
            allowed[b, s:s + n, s:s + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            w = 1.0 if weights is None else weights[b][j]
            for i in range(n):
                tb.append(b)
                trow.append(P - 1 if i == 0 else s + i - 1)
                ttgt.append(c[i])
                tcode.append(k)
                tw.append(w)
            s += n
            k += 1
        # padding rows attend to themselves (keeps softmax finite; never read)
        for i in range(s, T):
            allowed[b, i, i] = True
    mask = torch.zeros((B, 1, T, T), dtype=torch.float32)
    mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
            "b": t(tb), "row": t(trow), "tgt": t(ttgt), "code": t(tcode),
            "weight": t(tw, torch.float32), "n_codes": k}


def token_logprobs(model, batch):
    """Log-probability of every target token (flat, in `batch` order)."""
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"])
    h = out.last_hidden_state[batch["b"], batch["row"]]
    logits = model.lm_head(h).float()
    return torch.log_softmax(logits, -1).gather(1, batch["tgt"][:, None])[:, 0]


def code_logprobs(model, batch):
    """(sum of token log-probs per code, token count per code), codes in batch order."""
    lp = token_logprobs(model, batch)
    n = batch["n_codes"]
    s = torch.zeros(n).index_add(0, batch["code"], lp)
    c = torch.zeros(n).index_add(0, batch["code"], torch.ones_like(lp))
    return s, c, lp


def batches(rows, max_tokens, rng, shuffle=True):
    """Rows grouped into batches of about `max_tokens` padded tokens (rows of similar length
    together), in random order."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i][0]) + sum(map(len, rows[i][1])),
                                                    rng.random() if shuffle else i))
    out, cur, cur_max = [], [], 0
    for i in order:
        L = len(rows[i][0]) + sum(map(len, rows[i][1]))
        if cur and max(cur_max, L) * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, L)
    if cur:
        out.append(cur)
    if shuffle:
        rng.shuffle(out)
    return out


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


class Log:
    """Append-only JSONL log of losses and events (WORK/train-log.jsonl)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, **kw):
        with open(self.path, "a") as f:
            f.write(json.dumps(kw) + "\n")
        print(json.dumps(kw), flush=True)


def autocast(on=True):
    """bf16 autocast on CPU (matmuls in bf16, weights and reductions f32), or nothing."""
    import contextlib
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def seed_all(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def trained_model(work):
    """The model the later stages read by default: WORK/align, else WORK/sft. An align older
    than sft (its weights written before sft's: an alignment of an earlier SFT run, when `sft`
    ran again alone) is refused, not silently used."""
    work = Path(work)
    align, sft = work / "align", work / "sft"
    if not align.exists():
        return sft
    a, s = align / "model.safetensors", sft / "model.safetensors"
    if s.exists() and (not a.exists() or a.stat().st_mtime < s.stat().st_mtime):
        raise SystemExit(f"error: {align} is older than {sft} (it aligned an earlier SFT run): "
                         f"run the align stage again, remove {align}, or name the model with "
                         "--model")
    return align


def load_model(path):
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    m.config._attn_implementation = "sdpa"
    return m
