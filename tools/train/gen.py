"""Trie-constrained beam search with transformers (`prefix_allowed_tokens_fn`), batched over
prompts (left padding), and per-token code probabilities by teacher forcing.

`generate` returns, per prompt, the codes of the beams (best first) that end with EOS and are
codes of the trie — what the engine's `gram codes` returns for the same model, prompt and code
list (the engine was checked against exactly this call in tools/beam_oracle.py). Its scores are
HF's `sequences_scores` (sum of log-probs / length ** length_penalty).
"""
import torch

from tools.train import common as K


class CodeTrie:
    """Codes as token sequences (code tokens + EOS) in a nested dict."""
    END = -1

    def __init__(self, codes, tok):
        self.root, self.by_tokens, self.eos = {}, {}, tok.eos
        for c in codes:
            ids = tok.code(c)
            if len(ids) > K.MAX_CODE_TOKENS or tuple(ids) in self.by_tokens:
                continue
            self.by_tokens[tuple(ids)] = c
            node = self.root
            for t in ids[:-1]:
                node = node.setdefault(t, {})
            node[self.END] = True
        self.codes = list(self.by_tokens.values())

    def allowed(self, gen):
        node = self.root
        for t in gen:
            if t == self.eos:
                return [self.eos]
            node = node.get(t)
            if node is None:
                return [self.eos]
        out = [t for t in node if t != self.END]
        if self.END in node:
            out.append(self.eos)
        return out


@torch.no_grad()
def generate(model, tok, prompts, trie, beam=10, batch=16, length_penalty=1.0):
    """[[(code, score), ...] best first] for each prompt text."""
    model.eval()
    out = []
    for i in range(0, len(prompts), batch):
        enc = [tok.prompt(p) for p in prompts[i:i + batch]]
        L = max(map(len, enc))
        ids = torch.full((len(enc), L), tok.pad, dtype=torch.long)
        att = torch.zeros((len(enc), L), dtype=torch.long)
        for j, e in enumerate(enc):
            ids[j, L - len(e):] = torch.tensor(e)
            att[j, L - len(e):] = 1

        def fn(batch_id, input_ids):
            return trie.allowed(input_ids[L:].tolist())

        g = model.generate(input_ids=ids, attention_mask=att, num_beams=beam,
                           num_return_sequences=beam, do_sample=False,
                           length_penalty=length_penalty, max_new_tokens=K.MAX_CODE_TOKENS,
                           prefix_allowed_tokens_fn=fn, eos_token_id=tok.eos,
                           pad_token_id=tok.pad, early_stopping=False,
                           output_scores=True, return_dict_in_generate=True)
        seqs, scores = g.sequences[:, L:].tolist(), g.sequences_scores.tolist()
        for j in range(len(enc)):
            res, seen = [], set()
            for k in range(j * beam, (j + 1) * beam):
                s = seqs[k]
                if tok.eos not in s or scores[k] < -1e8:
                    continue
                s = tuple(s[:s.index(tok.eos) + 1])
                c = trie.by_tokens.get(s)
                if c is not None and c not in seen:
                    seen.add(c)
                    res.append((c, scores[k]))
            out.append(res)
    return out


@torch.no_grad()
def code_token_probs(model, tok, jobs, max_tokens=8192):
    """Teacher forcing: for [(prompt_text, [codes])] the probability of every token of every
    code (EOS included) after the prompt, as [[ [p_1, ..., p_n], ... ], ...]."""
    model.eval()
    rows = [(tok.prompt(p), [tok.code(c) for c in cs]) for p, cs in jobs]
    out = [None] * len(rows)
    order = list(range(len(rows)))
    chunk, size = [], 0
    for i in order + [None]:
        if i is not None:
            L = len(rows[i][0]) + sum(map(len, rows[i][1]))
            if not chunk or (len(chunk) + 1) * max(size, L) <= max_tokens:
                chunk.append(i)
                size = max(size, L)
                continue
        if chunk:
            b = K.collate([rows[j] for j in chunk], tok.pad)
            lp = K.token_logprobs(model, b).exp().tolist()
            k = 0
            for j in chunk:
                res = []
                for c in rows[j][1]:
                    res.append(lp[k:k + len(c)])
                    k += len(c)
                out[j] = res
        if i is not None:
            chunk, size = [i], len(rows[i][0]) + sum(map(len, rows[i][1]))
    return out
