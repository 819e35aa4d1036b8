#!/usr/bin/env python3
"""The launch floor of a CUDA graph on this GPU: the GPU time per kernel of a captured chain of
N dependent tiny kernels (one in-place add on 256 floats each), replayed. A decode pass of gram
is such a chain (~8 kernels a layer); this is its cost before any kernel does work.

    python3 tools/gpu/graph_floor.py --out graph_floor.json
"""
import argparse
import json

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--kernels", type=int, nargs="+", default=[1, 60, 240, 480])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    x = torch.ones(256, device="cuda")
    s = torch.cuda.Stream()
    results = []
    for n in args.kernels:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s):
            for _ in range(3):  # warm-up outside the capture
                x.add_(1.0)
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=s):
                for _ in range(n):
                    x.add_(1.0)
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / args.reps
        results.append({"kernels": n, "ms_per_replay": ms, "us_per_kernel": 1000 * ms / n})
        print(results[-1], flush=True)
    json.dump({"device": torch.cuda.get_device_name(), "results": results}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
