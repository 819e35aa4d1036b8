#!/usr/bin/env python3
"""Peer baselines for gram: llama.cpp (llama-cpp-python) and PyTorch/transformers on CPU.

Measures, per model/dtype, at a fixed thread count (default 2):
  prefill     : one forward over a P-token prompt (default 32), logits for the last token only
  decode_b1   : S single-token steps (default 64) after the prompt, greedy argmax, KV cache
  decode_b10  : B sequences (default 10) forked from the same prompt (first tokens = top-B of
                the prompt's last logits, like beam search), then S steps of B tokens per
                forward (one per sequence), greedy argmax per sequence; tok/s = B*S/time
Each measurement: `--warmup` untimed runs, then `--reps` timed runs; best and median reported.
Only the forward passes (+ argmax over logits) are timed; prompt setup/fork is untimed for decode.

One file, one peer per process (each peer lives in its own venv):
  .venv-bench/bin/python tools/bench_peers.py --peer llamacpp --gguf f32=bench-out/smollm2-135m-f32.gguf ...
  .venv/bin/python       tools/bench_peers.py --peer torch --dtype f32 --dtype bf16
  python3 tools/bench_peers.py --markdown RESULTS.jsonl [FLOOR.json]
Output: JSON lines on stdout (one "machine" record, then one "result" record per model/dtype).
Progress/log goes to stderr. No thresholds: this only measures.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "smollm2-135m-instruct")
# Fixed English text; the first P tokens are used as the prompt (same ids for both peers: both
# use the model's own BPE with no special tokens added).
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "developed a system of movable metal type in Mainz. His press combined several existing "
    "technologies into a practical method for producing books quickly and cheaply, which changed "
    "how knowledge spread across Europe."
)
CHECK_PROMPT = "The capital of France is"
CHECK_TOKENS = 16


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def machine_info():
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "nproc": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            k, v = k.strip(), v.strip()
            if k in ("Model name", "CPU family", "Model", "Core(s) per socket", "Thread(s) per core",
                     "L2 cache", "L3 cache", "Hypervisor vendor"):
                info[k] = v
            if k == "Flags":
                want = ["avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                        "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16"]
                have = set(v.split())
                info["flags"] = [f for f in want if f in have]
    except OSError:
        pass
    return info


def summarize(samples, n_tokens):
    """samples: seconds per run. Returns tok/s best/median and the raw times."""
    tps = [n_tokens / s for s in samples]
    return {"tok_s_best": round(max(tps), 2), "tok_s_median": round(statistics.median(tps), 2),
            "ms_median": round(statistics.median(samples) * 1e3, 3), "n_tokens": n_tokens,
            "runs_s": [round(s, 6) for s in samples]}


def measure(fn, warmup, reps):
    """fn() -> elapsed seconds of the timed part."""
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(reps)]


# ----------------------------------------------------------------------------------------------
# llama.cpp via llama-cpp-python low-level API
# ----------------------------------------------------------------------------------------------

def run_llamacpp(args, emit):
    import ctypes
    import numpy as np
    import llama_cpp as L

    L.llama_backend_init()
    sysinfo = L.llama_print_system_info().decode(errors="replace").strip()
    fa = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
          "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[args.flash_attn]

    for spec in args.gguf:
        label, _, path = spec.partition("=")
        if not path:
            label, path = os.path.basename(spec), spec
        log(f"[llamacpp] loading {label}: {path}")
        mp = L.llama_model_default_params()
        mp.use_mmap = True
        model = L.llama_model_load_from_file(path.encode(), mp)
        if not model:
            raise RuntimeError(f"failed to load {path}")
        vocab = L.llama_model_get_vocab(model)
        n_vocab = L.llama_vocab_n_tokens(vocab)

        def new_ctx(n_ctx, n_seq, unified):
            cp = L.llama_context_default_params()
            cp.n_ctx = n_ctx
            cp.n_batch = max(args.prompt_len, args.batch)
            cp.n_ubatch = cp.n_batch
            cp.n_seq_max = n_seq
            cp.n_threads = args.threads
            cp.n_threads_batch = args.threads
            cp.flash_attn_type = fa
            cp.kv_unified = unified
            cp.no_perf = True
            ctx = L.llama_init_from_model(model, cp)
            if not ctx:
                raise RuntimeError("llama_init_from_model failed")
            return ctx

        def tokenize(text):
            buf = (L.llama_token * 4096)()
            b = text.encode()
            n = L.llama_tokenize(vocab, b, len(b), buf, 4096, False, False)
            return list(buf[:n])

        def piece(tok):
            buf = ctypes.create_string_buffer(256)
            n = L.llama_token_to_piece(vocab, tok, buf, 256, 0, False)
            return buf.raw[:n]

        prompt = tokenize(PROMPT_TEXT)[: args.prompt_len]
        assert len(prompt) == args.prompt_len, "PROMPT_TEXT too short"
        nb = max(args.prompt_len, args.batch)
        batch = L.llama_batch_init(nb, 0, args.batch)

        def fill(entries):
            """entries: list of (token, pos, seq_id, want_logits)"""
            batch.n_tokens = len(entries)
            for i, (t, p, s, lg) in enumerate(entries):
                batch.token[i] = t
                batch.pos[i] = p
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = s
                batch.logits[i] = lg

        def decode(ctx):
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode rc={rc}")

        def logits(ctx, i):
            return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))

        ctx1 = new_ctx(args.n_ctx, 1, False)
        mem1 = L.llama_get_memory(ctx1)
        ctxb = new_ctx(args.n_ctx_batch, args.batch, True)
        memb = L.llama_get_memory(ctxb)
        P, S, B = args.prompt_len, args.steps, args.batch

        def prefill_once(ctx, mem):
            L.llama_memory_clear(mem, True)
            fill([(t, i, 0, i == P - 1) for i, t in enumerate(prompt)])
            t0 = time.perf_counter()
            decode(ctx)
            lg = logits(ctx, P - 1)
            nxt = int(lg.argmax())
            return time.perf_counter() - t0, lg, nxt

        def bench_prefill():
            return prefill_once(ctx1, mem1)[0]

        def bench_b1():
            _, _, tok = prefill_once(ctx1, mem1)
            t0 = time.perf_counter()
            for s in range(S):
                fill([(tok, P + s, 0, True)])
                decode(ctx1)
                tok = int(logits(ctx1, 0).argmax())
            return time.perf_counter() - t0

        def bench_bn():
            _, lg, _ = prefill_once(ctxb, memb)
            for j in range(1, B):
                L.llama_memory_seq_cp(memb, 0, j, -1, -1)
            toks = [int(x) for x in np.argsort(-lg)[:B]]
            t0 = time.perf_counter()
            for s in range(S):
                fill([(toks[j], P + s, j, True) for j in range(B)])
                decode(ctxb)
                toks = [int(logits(ctxb, j).argmax()) for j in range(B)]
            return time.perf_counter() - t0

        # greedy correctness check (short)
        L.llama_memory_clear(mem1, True)
        ids = tokenize(CHECK_PROMPT)
        fill([(t, i, 0, i == len(ids) - 1) for i, t in enumerate(ids)])
        decode(ctx1)
        out = []
        tok = int(logits(ctx1, len(ids) - 1).argmax())
        for s in range(CHECK_TOKENS):
            out.append(tok)
            fill([(tok, len(ids) + s, 0, True)])
            decode(ctx1)
            tok = int(logits(ctx1, 0).argmax())
        check_text = b"".join(piece(t) for t in out).decode(errors="replace")
        log(f"[llamacpp] {label} greedy: {CHECK_PROMPT!r} -> {check_text!r}")

        res = {"kind": "result", "peer": "llama.cpp", "dtype": label, "model": os.path.abspath(path),
               "threads": args.threads, "prompt_len": P, "steps": S, "batch": B,
               "warmup": args.warmup, "reps": args.reps,
               "llama_cpp_python": getattr(L, "__version__", None) or _pkg_version("llama-cpp-python"),
               "flash_attn": args.flash_attn, "kv_unified_batch": True,
               "greedy_check": {"prompt": CHECK_PROMPT, "tokens": out, "text": check_text},
               "prompt_tokens": prompt}
        log(f"[llamacpp] {label} prefill"); res["prefill"] = summarize(measure(bench_prefill, args.warmup, args.reps), P)
        log(f"[llamacpp] {label} decode b1"); res["decode_b1"] = summarize(measure(bench_b1, args.warmup, args.reps), S)
        log(f"[llamacpp] {label} decode b{B}"); res[f"decode_b{B}"] = summarize(measure(bench_bn, args.warmup, args.reps), B * S)
        res["llama_system_info"] = sysinfo
        emit(res)

        L.llama_batch_free(batch)
        L.llama_free(ctx1)
        L.llama_free(ctxb)
        L.llama_model_free(model)


def _pkg_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------
# PyTorch / transformers
# ----------------------------------------------------------------------------------------------

def run_torch(args, emit):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(args.threads)
    model_dir = os.path.abspath(args.model_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    log(f"[torch] loading {model_dir} gguf_file={args.gguf_file}")
    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=args.gguf_file, dtype=torch.float32)
    base.eval()
    log(f"[torch] loaded in {time.perf_counter() - t0:.1f}s; attn={base.config._attn_implementation}")
    P, S, B = args.prompt_len, args.steps, args.batch
    prompt = tok(PROMPT_TEXT, add_special_tokens=False)["input_ids"][:P]
    assert len(prompt) == P

    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    for label in args.dtype:
        dt = dtypes[label]
        model = base if dt == torch.float32 else copy.deepcopy(base).to(dt)
        ids1 = torch.tensor([prompt])
        idsb = ids1.expand(B, P).contiguous()

        @torch.inference_mode()
        def prefill(ids):
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return out.cache, out.logits[:, -1, :]

        @torch.inference_mode()
        def bench_prefill():
            t0 = time.perf_counter()
            _, lg = prefill(ids1)
            lg.argmax(-1)
            return time.perf_counter() - t0

        @torch.inference_mode()
        def bench_b1():
            past, lg = prefill(ids1)
            nxt = lg.argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(S):
                out = model(input_ids=nxt, cache=past, use_cache=True)
                past = out.cache
                nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            return time.perf_counter() - t0

        @torch.inference_mode()
        def bench_bn():
            past, lg = prefill(idsb)  # same prompt in all B rows (untimed)
            nxt = torch.topk(lg[0].float(), B).indices.view(B, 1)
            t0 = time.perf_counter()
            for _ in range(S):
                out = model(input_ids=nxt, cache=past, use_cache=True)
                past = out.cache
                nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            return time.perf_counter() - t0

        with torch.inference_mode():
            cids = tok(CHECK_PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
            g = model.generate(cids, max_new_tokens=CHECK_TOKENS, do_sample=False)
            gen = g[0, cids.shape[1]:].tolist()
            check_text = tok.decode(gen)
        log(f"[torch] {label} greedy: {CHECK_PROMPT!r} -> {check_text!r}")

        res = {"kind": "result", "peer": "torch", "dtype": label, "model": f"{model_dir}/{args.gguf_file}",
               "threads": args.threads, "prompt_len": P, "steps": S, "batch": B,
               "warmup": args.warmup, "reps": args.reps, "torch": torch.__version__,
               "transformers": transformers.__version__, "attn_impl": model.config._attn_implementation,
               "greedy_check": {"prompt": CHECK_PROMPT, "tokens": gen, "text": check_text},
               "prompt_tokens": prompt}
        log(f"[torch] {label} prefill"); res["prefill"] = summarize(measure(bench_prefill, args.warmup, args.reps), P)
        log(f"[torch] {label} decode b1"); res["decode_b1"] = summarize(measure(bench_b1, args.warmup, args.reps), S)
        log(f"[torch] {label} decode b{B}"); res[f"decode_b{B}"] = summarize(measure(bench_bn, args.warmup, args.reps), B * S)
        emit(res)


# ----------------------------------------------------------------------------------------------
# Markdown combiner
# ----------------------------------------------------------------------------------------------

def _best(v):
    return v["best"] if isinstance(v, dict) else float(v)


def _fmt_bm(v):
    if v is None:
        return "-"
    if isinstance(v, dict):
        return f"{v['best']:.1f} / {v['median']:.1f}"
    return f"{v:.1f}"


# Bytes per block and weights per block of the GGUF tensor types a checkpoint may store.
GGUF_TYPES = {0: ("F32", 4, 1), 1: ("F16", 2, 1), 30: ("BF16", 2, 1), 2: ("Q4_0", 18, 32),
              3: ("Q4_1", 20, 32), 6: ("Q5_0", 22, 32), 7: ("Q5_1", 24, 32), 8: ("Q8_0", 34, 32),
              12: ("Q4_K", 144, 256), 13: ("Q5_K", 176, 256), 14: ("Q6_K", 210, 256)}


def gguf_matrix_bytes(path):
    """{type name: bytes} of the 2-D tensors of a GGUF file (the matmul weights a decode step
    streams; the tied token embedding is the LM head), read from its header."""
    import struct
    with open(path, "rb") as fh:
        def take(fmt):
            return struct.unpack("<" + fmt, fh.read(struct.calcsize("<" + fmt)))[0]

        def string():
            return fh.read(take("Q")).decode("utf-8", "replace")
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

        def skip_value(t):
            if t == 8:
                string()
            elif t == 9:
                et, n = take("I"), take("Q")
                for _ in range(n):
                    skip_value(et)
            else:
                fh.read(sizes[t])
        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        take("I")  # version
        n_tensors, n_kv = take("Q"), take("Q")
        for _ in range(n_kv):
            string()
            skip_value(take("I"))
        out = {}
        for _ in range(n_tensors):
            string()
            dims = [take("Q") for _ in range(take("I"))]
            t = take("I")
            take("Q")  # offset
            if len(dims) != 2:
                continue
            name, block_bytes, block = GGUF_TYPES[t]
            out[name] = out.get(name, 0) + dims[0] * dims[1] // block * block_bytes
        return out


# Bytes a cached key or value element takes at the least: f16, llama.cpp's KV cache (gram keeps
# f32). The bandwidth floor charges the smallest any engine here reads.
KV_BYTES = 2


def smollm2_floors(floor, cfg_path, prompt_len=32, threads=2, steps=64):
    """Per-token bytes and FLOPs for the model in config.json, vs measured floors at `threads`
    threads. A decoded token runs every matrix, the LM head included; a prompt's token runs the
    layers, and the LM head runs once for the prompt's last token, so the prefill floor charges
    each token a `1 / prompt_len` share of it. Attention counts too (since the forty-second
    session; it was left out, 1.7 % of a decoded token's FLOPs here): a token attending to `c`
    keys takes 4 · c · q_dim FLOPs a layer (scores and the weighted sum), a decode of `steps`
    tokens after the prompt attends to `prompt_len + (steps + 1) / 2` keys on average, a prompt
    token to `(prompt_len + 1) / 2`. A decode step also reads the cached keys and values of its
    context (at KV_BYTES an element) besides the weights."""
    t = str(threads)
    cfg = json.load(open(cfg_path))
    h, L_, ff, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    per_layer = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * ff  # q,k,v,o, gate/up/down
    linear = L_ * per_layer
    lm_head = V * h  # tied embedding used as LM head
    params = linear + lm_head
    bw = _best(floor["read_bw_gbps"][t]) * 1e9 if floor else None
    pk = None
    if floor:
        pk = max(_best(v.get(t, 0)) for k, v in floor.items() if k.startswith("fp32_fma_gflops")) * 1e9
    q_dim = nh * hd
    decode_ctx = prompt_len + (steps + 1) / 2
    attn_decode = 4 * decode_ctx * q_dim * L_
    attn_prefill = 4 * (prompt_len + 1) / 2 * q_dim * L_
    kv_bytes = 2 * nkv * hd * L_ * decode_ctx * KV_BYTES
    decode_flops = 2 * params + attn_decode
    prefill_flops = 2 * linear + 2 * lm_head / prompt_len + attn_prefill
    rows = []
    dtypes = [("f32", params * 4), ("bf16", params * 2)]
    gguf = os.path.join(os.path.dirname(cfg_path), "model.gguf")
    if os.path.exists(gguf):  # the stored checkpoint, as gram's `--dtype stored` streams it
        kinds = gguf_matrix_bytes(gguf)
        dtypes.append(("stored (" + " + ".join(sorted(kinds)) + ")", sum(kinds.values())))
    for name, wb in dtypes:
        r = {"dtype": name, "weight_bytes": wb, "kv_bytes": kv_bytes, "step_bytes": wb + kv_bytes,
             "matmul_params": params, "flops_per_token": decode_flops,
             "attention_flops_per_token": attn_decode, "prefill_flops_per_token": prefill_flops,
             "prompt_len": prompt_len, "steps": steps}
        if bw:
            r["bw_floor_ms_per_step"] = (wb + kv_bytes) / bw * 1e3
            r["bw_ceiling_steps_s"] = bw / (wb + kv_bytes)
        if pk:
            r["flop_floor_us_per_token"] = decode_flops / pk * 1e6
            r["flop_ceiling_tok_s"] = pk / decode_flops
            r["prefill_flop_ceiling_tok_s"] = pk / prefill_flops
        rows.append(r)
    return rows


def markdown(paths, model_dir):
    """The summary of result and floor files. Files come in the order they were made: a result
    is judged against the floors measured just before and just after its file (the host's speed
    drifts within a run), the tables of floors show the one of the highest bandwidth."""
    results, machine, floor, floors_at = [], None, None, []
    for pos, p in enumerate(paths):
        text = open(p).read()
        for line in text.splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                o = json.loads(line)
            except json.JSONDecodeError:
                continue
            if o.get("kind") == "result":
                results.append(dict(o, _file=pos))
            elif o.get("kind") == "machine":
                # gram's record has its ISA and core count only; the Python peers' add the CPU
                # model and flags (lscpu). Merged, the first record's values first.
                machine = {**o, **(machine or {})}
            elif "read_bw_gbps" in o:  # of several floor files, the highest bandwidth
                floors_at.append((pos, o))
                if floor is None or _best(o["read_bw_gbps"]["2"]) > _best(floor["read_bw_gbps"]["2"]):
                    floor = o
    out = []
    if machine:
        out.append(f"Machine: {machine.get('Model name')} ({machine.get('nproc')} cpus), flags: {' '.join(machine.get('flags', []))}\n")
    out.append("| peer | dtype | prefill tok/s (best / median) | decode b1 tok/s (best / median) | decode b10 tok/s (best / median) | greedy check |")
    out.append("|---|---|---|---|---|---|")
    for r in results:
        bk = [k for k in r if k.startswith("decode_b") and k != "decode_b1"]
        cells = []
        for k in ["prefill", "decode_b1"] + bk[:1]:
            m = r.get(k)
            cells.append(f"{m['tok_s_best']:.1f} / {m['tok_s_median']:.1f}" if m else "-")
        txt = r.get("greedy_check", {}).get("text", "").replace("\n", "\\n").replace("|", "\\|").replace("`", "")
        out.append(f"| {r['peer']} | {r['dtype']} | " + " | ".join(cells) + f" | `{txt}` |")
    if floor:
        out.append("")
        out.append("| floor (best / median) | 1 thread | 2 threads |")
        out.append("|---|---|---|")
        for key, name in (("read_bw_gbps", "read bandwidth GB/s"), ("fp32_fma_gflops_avx2", "fp32 FMA GFLOP/s (AVX2)"),
                          ("fp32_fma_gflops_avx512", "fp32 FMA GFLOP/s (AVX-512)"),
                          ("bf16_dpbf16ps_gflops", "bf16 vdpbf16ps GFLOP/s")):
            if key in floor:
                v = floor[key]
                out.append(f"| {name} | {_fmt_bm(v.get('1'))} | {_fmt_bm(v.get('2'))} |")
        cfg = os.path.join(model_dir, "config.json")
        if os.path.exists(cfg):
            out.append("")
            threads = next((r["threads"] for r in results if r.get("threads")), 2)
            prompt_len = next((r["prompt_len"] for r in results if r.get("prompt_len")), 32)
            steps = next((r["steps"] for r in results if r.get("steps")), 64)
            out.append(f"Model floors use the best {threads}-thread bandwidth and best {threads}-thread "
                       "fp32 FMA peak above.")
            out.append("")
            out.append("| model floor | weight MB/step | KV MB/step | ms/step @2T BW | max steps/s (BW) | GFLOP/token (attention) | us/token @2T peak | max tok/s (FLOP) |")
            out.append("|---|---|---|---|---|---|---|---|")
            floors = smollm2_floors(floor, cfg, prompt_len, threads, steps)  # reads the GGUF header once
            for r in floors:
                out.append(f"| {r['dtype']} ({r['matmul_params']/1e6:.1f}M matmul params) | {r['weight_bytes']/1e6:.1f} | "
                           f"{r['kv_bytes']/1e6:.2f} | {r['bw_floor_ms_per_step']:.2f} | {r['bw_ceiling_steps_s']:.1f} | "
                           f"{r['flops_per_token']/1e9:.3f} ({r['attention_flops_per_token']/1e9:.4f}) | "
                           f"{r['flop_floor_us_per_token']:.0f} | {r['flop_ceiling_tok_s']:.0f} |")
            f0 = floors[0]
            out.append("")
            out.append(f"Prefill of {prompt_len} tokens (logits for the last one only): "
                       f"{f0['prefill_flops_per_token'] / 1e9:.3f} GFLOP a token, at most "
                       f"{f0['prefill_flop_ceiling_tok_s']:.0f} tok/s at the fp32 FMA peak (the decode "
                       "ceiling above charges every token a whole LM head).")
            out.extend(b1_against_bandwidth(results, floors_at, floors))
    print("\n".join(out))


def b1_against_bandwidth(results, floors_at, floors):
    """Decode b1 of every result against the bandwidth floor of its dtype, step bytes (weights
    and the context's KV) over a bandwidth of its own phase: the larger of the floors measured
    just before and just after its file, and of the median effective read rate (step bytes ×
    steps/s) any engine of that file reached, which no floor may be under. (Until the forty-second
    session one bandwidth for the whole run: the floor measured at its start, raised to the best
    rate of any single repetition, so rows of a slow phase were judged against a fast one.)"""
    sb = {"f32": floors[0]["step_bytes"], "bf16": floors[1]["step_bytes"],
          "f16": floors[1]["step_bytes"]}
    if len(floors) > 2:
        sb["stored"] = sb["q4_1"] = floors[2]["step_bytes"]
    rows = [(r, sb[r["dtype"]]) for r in results if r.get("decode_b1") and r["dtype"] in sb]
    if not rows or not floors_at:
        return []
    t = str(next((r["threads"] for r, _ in rows if r.get("threads")), 2))

    def measured(pos):
        before = [o for p, o in floors_at if p < pos][-1:]
        after = [o for p, o in floors_at if p > pos][:1]
        return max(_best(o["read_bw_gbps"][t]) for o in before + after) * 1e9

    reached = {}
    for r, b in rows:
        rate = r["decode_b1"]["tok_s_median"] * b
        reached[r["_file"]] = max(reached.get(r["_file"], 0.0), rate)
    out = ["", "Decode b1 against the bandwidth floor: each file's rows against the larger of the "
               "floors measured just before and after it and the best median effective read rate "
               "of its rows.", "",
           "| peer | dtype | MB/step (weights + KV) | b1 tok/s (median) | effective GB/s | floor GB/s (measured / phase) | floor tok/s | median / floor time |",
           "|---|---|---|---|---|---|---|---|"]
    for r, b in rows:
        med = r["decode_b1"]["tok_s_median"]
        m = measured(r["_file"])
        bw = max(m, reached[r["_file"]])
        out.append(f"| {r['peer']} | {r['dtype']} | {b / 1e6:.1f} | {med:.1f} | {med * b / 1e9:.1f} | "
                   f"{m / 1e9:.1f} / {bw / 1e9:.1f} | {bw / b:.1f} | {bw / b / med:.2f}× |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", choices=["llamacpp", "torch"])
    ap.add_argument("--markdown", nargs="+", metavar="FILE",
                    help="combine JSON-lines results (and floor JSON) into a markdown table")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gguf", action="append", default=[], metavar="LABEL=PATH",
                    help="llamacpp: model file(s), e.g. f32=bench-out/smollm2-135m-f32.gguf (repeatable)")
    ap.add_argument("--n-ctx", type=int, default=512, help="llamacpp: context size for batch-1 runs")
    ap.add_argument("--n-ctx-batch", type=int, default=1024, help="llamacpp: unified KV size for batch-B runs")
    ap.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, help="torch: HF dir (config/tokenizer/gguf)")
    ap.add_argument("--gguf-file", default="model.gguf", help="torch: GGUF file name inside --model-dir")
    ap.add_argument("--dtype", action="append", choices=["f32", "bf16", "f16"],
                    help="torch: dtypes to run (repeatable; default f32 and bf16, in that order)")
    args = ap.parse_args()

    if args.markdown:
        markdown(args.markdown, os.path.abspath(args.model_dir))
        return
    if not args.peer:
        ap.error("--peer or --markdown required")
    if args.peer == "torch" and not args.dtype:
        args.dtype = ["f32", "bf16"]
    if args.peer == "llamacpp" and not args.gguf:
        ap.error("--gguf LABEL=PATH required for llamacpp")

    def emit(o):
        print(json.dumps(o), flush=True)

    emit({"kind": "machine", "peer": args.peer, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **machine_info()})
    if args.peer == "llamacpp":
        run_llamacpp(args, emit)
    else:
        run_torch(args, emit)


if __name__ == "__main__":
    main()
