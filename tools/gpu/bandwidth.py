#!/usr/bin/env python3
"""Device memory bandwidth and bf16 matmul rate, the roofline numbers for the GPU session.

    python3 tools/gpu/bandwidth.py --out FILE.json [--device cuda|cpu] [--gib 1] [--reps 20]
                                   [--n 8192]

* copy: dst.copy_(src) of a --gib GiB buffer, --reps timed copies after 3 warm-ups; bandwidth =
  bytes read + written (2 x size) / time; best and median (CUDA events on a GPU).
* matmul: bf16 [n, n] @ [n, n] (n = 8192), 2 n^3 flops per product, --reps timed after 3
  warm-ups; TFLOP/s best and median.
About 5-10 s on an H100/H200. On a CPU (tests) the defaults shrink to 64 MiB and n = 1024.
Needs only torch.
"""
import argparse
import json
import platform
import statistics
import time

import torch

T0 = time.perf_counter()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def timed(fn, reps, device):
    for _ in range(3):
        fn()
    out = []
    if device.type == "cuda":
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gib", type=float, help="copy buffer size (default 1 GiB; 1/16 on CPU)")
    ap.add_argument("--n", type=int, help="matmul size (default 8192; 1024 on CPU)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    gib = args.gib or (1.0 if cuda else 1 / 16)
    n = args.n or (8192 if cuda else 1024)
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if cuda:
        p = torch.cuda.get_device_properties(device)
        info.update({"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                     "gpu_mem_gib": round(p.total_memory / 2**30, 1),
                     "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count})
    log(f"device {info.get('gpu', device)}; copy {gib:g} GiB x {args.reps}, matmul {n}^3 bf16")
    res = {"machine": info}

    nbytes = int(gib * 2**30) // 16 * 16
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ts = timed(lambda: dst.copy_(src), args.reps, device)
    assert torch.equal(dst[:1024], src[:1024])
    moved = 2 * src.numel() * src.element_size()
    res["copy"] = {"buffer_bytes": src.numel() * src.element_size(), "reps": args.reps,
                   "bytes_moved_per_rep": moved, "best_gb_s": moved / min(ts) / 1e9,
                   "median_gb_s": moved / statistics.median(ts) / 1e9,
                   "times_s": ts}
    log(f"copy: best {res['copy']['best_gb_s']:.0f} GB/s, median "
        f"{res['copy']['median_gb_s']:.0f} GB/s (read + written)")
    del src, dst
    if cuda:
        torch.cuda.empty_cache()

    g = torch.Generator(device=device)
    g.manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device, dtype=torch.float32).to(torch.bfloat16)
    b = torch.randn(n, n, generator=g, device=device, dtype=torch.float32).to(torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    ts = timed(lambda: torch.matmul(a, b, out=c), args.reps, device)
    assert torch.isfinite(c[:4].float()).all()
    flops = 2 * n ** 3
    res["matmul_bf16"] = {"n": n, "reps": args.reps, "flops_per_rep": flops,
                          "best_tflop_s": flops / min(ts) / 1e12,
                          "median_tflop_s": flops / statistics.median(ts) / 1e12, "times_s": ts}
    log(f"matmul bf16 {n}^3: best {res['matmul_bf16']['best_tflop_s']:.1f} TFLOP/s, median "
        f"{res['matmul_bf16']['median_tflop_s']:.1f} TFLOP/s")
    res["total_s"] = round(time.perf_counter() - T0, 2)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
