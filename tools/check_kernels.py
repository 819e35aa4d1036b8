#!/usr/bin/env python3
"""Compile every CUDA kernel of gram without a GPU: the CI check of issue 7.

Each `kernels/*.cu` is compiled by NVRTC (through ctypes, as the CUDA backend compiles them at
run time) to PTX for each `--arch` (default `compute_90`; CI passes every architecture the
backend's `arch_of` picks) with `-std=c++17`; every `kernels/*.cuh` is handed to NVRTC as a
named header, as the backend does with its embedded sources. Then, when `ptxas` is available,
each PTX is assembled for `sm_XX` with `-v` and a table gives, per kernel, registers, spill
stores/loads, stack frame, shared memory and barriers.

Fails (exit 1) on: any NVRTC error or warning, an `extern "C" __global__` symbol missing from the
PTX, any ptxas error or warning, and any kernel that spills registers (spills are a bug here:
every kernel has fixed-size register state; `--allow-spills` reports them loudly instead) on
the first architecture named, the reference; on the others a spill is reported, not failed.
A missing ptxas is a skip with a notice, unless `--require-ptxas` (CI) makes it an error.

Libraries come from the PyPI wheels pinned in tools/cuda-requirements.txt: libnvrtc from
`nvidia-cuda-nvrtc-cu12`, the CUDA headers (cuda_bf16.h) from `nvidia-cuda-runtime-cu12`,
ptxas from `nvidia-cuda-nvcc-cu12`; they are looked up under `--site DIR` (the folder pip
installed them into), then on `sys.path` (`import nvidia`).

    python3 tools/check_kernels.py [--site .venv-cuda] [--require-ptxas] [--arch 90,80,...] [--keep-ptx DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def nvidia_dirs(site: str | None) -> list[str]:
    """Folders that may hold the wheels' `nvidia/<component>/` trees."""
    dirs = []
    if site:
        dirs.append(os.path.join(os.path.abspath(site), "nvidia"))
        sys.path.insert(0, os.path.abspath(site))
    try:
        import nvidia  # a namespace package: one path per site folder holding it

        dirs.extend(list(nvidia.__path__))
    except ImportError:
        pass
    seen, out = set(), []
    for d in dirs:
        if os.path.isdir(d) and d not in seen:
            seen.add(d)
            out.append(d)
    return out


def find_one(dirs: list[str], pattern: str) -> str | None:
    for d in dirs:
        hits = sorted(glob.glob(os.path.join(d, pattern)))
        if hits:
            return hits[0]
    return None


# ---- NVRTC through ctypes ------------------------------------------------------------------------


class Nvrtc:
    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        lib = self.lib
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcCreateProgram.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.POINTER(ctypes.c_char_p),
        ]
        lib.nvrtcCompileProgram.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_char_p),
        ]
        lib.nvrtcGetProgramLogSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        lib.nvrtcGetProgramLog.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nvrtcGetPTXSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        lib.nvrtcGetPTX.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = f"{major.value}.{minor.value}"

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            fail(f"{what}: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def compile(
        self, name: str, source: str, headers: dict[str, str], options: list[str]
    ) -> tuple[bool, str, str]:
        """Returns (ok, log, ptx)."""
        lib = self.lib
        prog = ctypes.c_void_p()
        hnames = list(headers)
        n = len(hnames)
        hsrc = (ctypes.c_char_p * max(n, 1))(*[headers[h].encode() for h in hnames])
        hinc = (ctypes.c_char_p * max(n, 1))(*[h.encode() for h in hnames])
        self.check(
            lib.nvrtcCreateProgram(
                ctypes.byref(prog), source.encode(), name.encode(), n, hsrc, hinc
            ),
            f"nvrtcCreateProgram({name})",
        )
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            rc = lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self.check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "log size")
            buf = ctypes.create_string_buffer(size.value)
            self.check(lib.nvrtcGetProgramLog(prog, buf), "log")
            log = buf.value.decode(errors="replace").strip()
            if rc != 0:
                return False, log, ""
            self.check(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "PTX size")
            ptx = ctypes.create_string_buffer(size.value)
            self.check(lib.nvrtcGetPTX(prog, ptx), "PTX")
            return True, log, ptx.value.decode()
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ---- ptxas -v parsing ----------------------------------------------------------------------------


@dataclass
class Resources:
    regs: int = -1
    stack: int = 0
    spill_st: int = 0
    spill_ld: int = 0
    smem: int = 0
    barriers: int = 0
    cmem: list[str] = field(default_factory=list)


def parse_ptxas(log: str) -> dict[str, Resources]:
    """`ptxas -v` prints, per entry: 'Compiling entry function 'X'', then
    'N bytes stack frame, N bytes spill stores, N bytes spill loads', then
    'Used N registers, used N barriers, N bytes smem, N bytes cmem[0]'."""
    out: dict[str, Resources] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = out.setdefault(m.group(1), Resources())
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), Resources())
            continue
        if cur is None:
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m:
            cur.stack, cur.spill_st, cur.spill_ld = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur.regs = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            cur.barriers = int(b.group(1)) if b else 0
            s = re.search(r"(\d+) bytes smem", line)
            cur.smem = int(s.group(1)) if s else 0
            cur.cmem = re.findall(r"\d+ bytes cmem\[\d+\]", line)
    return out


def kernel_symbols(source: str) -> list[str]:
    """Names of the `extern "C" __global__` entry points of a source file."""
    flat = re.sub(r"//[^\n]*", "", source)
    lb = r"(?:__launch_bounds__\s*\([^)]*\)\s*)?"
    pat = r'extern\s+"C"\s+__global__\s+' + lb + r"void\s+" + lb + r"(\w+)\s*\("
    return re.findall(pat, flat)


def check_arch(arch: str, strict: bool, args, nvrtc, include, headers, sources, ptxas, ptx_dir,
               errors: list[str]) -> None:
    """NVRTC-compiles every source for `compute_{arch}` and assembles it with ptxas for `sm_{arch}`,
    appending to `errors`. Spills fail only when `strict` (the reference architecture); on the
    others they are reported."""
    options = [
        f"--gpu-architecture=compute_{arch}",
        "-std=c++17",
        f"-I{include}",
    ]
    print(f"NVRTC options: {' '.join(options)}  (+ headers {', '.join(headers) or 'none'})")

    ptx_dir = os.path.join(ptx_dir, f"compute_{arch}")
    os.makedirs(ptx_dir, exist_ok=True)
    ptx_files: list[tuple[str, str, list[str]]] = []
    for path in sources:
        name = os.path.basename(path)
        with open(path) as f:
            src = f.read()
        t = time.monotonic()
        ok, log, ptx = nvrtc.compile(name, src, headers, options)
        dt = time.monotonic() - t
        syms = kernel_symbols(src)
        if not ok:
            errors.append(f"{name}: NVRTC failed")
            print(f"FAIL  {name}: NVRTC error\n{log}")
            continue
        if log:
            # NVRTC prints nothing for a clean compile: any message is a warning, and fails.
            errors.append(f"{name}: NVRTC warnings")
            print(f"FAIL  {name}: NVRTC warnings (treated as errors)\n{log}")
        entries = re.findall(r"\.visible \.entry (\w+)\(", ptx)
        missing = [s for s in syms if s not in entries]
        if missing:
            errors.append(f"{name}: symbols missing from the PTX: {missing}")
        if not syms:
            errors.append(f'{name}: no extern "C" __global__ kernel')
        out = os.path.join(ptx_dir, name[:-3] + ".ptx")
        with open(out, "w") as f:
            f.write(ptx)
        ptx_files.append((name, out, syms))
        print(f"ok    {name}: {len(entries)} kernels, {len(ptx) // 1024} KiB PTX, {dt:.2f} s")

    if not ptxas:
        msg = "ptxas not found (wheel nvidia-cuda-nvcc-cu12): PTX not assembled, no register report"
        if args.require_ptxas:
            errors.append(msg)
        print(f"\n!!! {msg}\n")
    else:
        ver = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
        ver_line = next((l for l in ver.splitlines() if "release" in l), ver.strip())
        print(f"\nptxas -arch=sm_{arch} -v   ({ver_line.strip()})")
        hdr = f"{'file':<22} {'kernel':<36} {'regs':>4} {'spill st/ld':>12} {'stack':>6} {'smem':>7} {'bar':>3}"
        print(hdr)
        print("-" * len(hdr))
        spilled = []
        for name, ptx_path, syms in ptx_files:
            r = subprocess.run(
                [ptxas, f"-arch=sm_{arch}", "-v", "--warn-on-spills", "-o", os.devnull, ptx_path],
                capture_output=True,
                text=True,
            )
            log = r.stdout + r.stderr
            if r.returncode != 0:
                errors.append(f"{name}: ptxas failed")
                print(f"FAIL  {name}: ptxas error\n{log}")
                continue
            warns = [l for l in log.splitlines() if "warning" in l.lower()]
            res = parse_ptxas(log)
            for k in syms:
                rk = res.get(k)
                if rk is None or rk.regs < 0:
                    errors.append(f"{name}: no ptxas report for {k}")
                    continue
                flag = ""
                if rk.spill_st or rk.spill_ld:
                    spilled.append(k)
                    flag = "  <<< SPILLS"
                elif rk.stack:
                    flag = "  (stack frame: local arrays)"
                print(
                    f"{name:<22} {k:<36} {rk.regs:>4} {f'{rk.spill_st}/{rk.spill_ld}':>12} "
                    f"{rk.stack:>6} {rk.smem:>7} {rk.barriers:>3}{flag}"
                )
            other = [w for w in warns if "spill" not in w.lower()]
            if other:
                errors.append(f"{name}: ptxas warnings")
                print("\n".join(f"FAIL  {name}: {w}" for w in other))
        if spilled:
            msg = f"{len(spilled)} kernel(s) spill registers: {', '.join(spilled)}"
            if args.allow_spills or not strict:
                print(f"\n!!! WARNING: {msg} (allowed: {'--allow-spills' if strict else 'not the reference architecture'})")
            else:
                errors.append(msg)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=os.path.join(ROOT, "kernels"), help="kernel folder")
    ap.add_argument("--site", help="folder the CUDA wheels were pip-installed into (--target)")
    ap.add_argument("--arch", default="90",
                    help="compute capabilities, comma-separated (default 90: Hopper); the first is the "
                         "reference, where a register spill fails the check")
    ap.add_argument("--require-ptxas", action="store_true", help="missing ptxas is an error")
    ap.add_argument("--allow-spills", action="store_true", help="report spills without failing")
    ap.add_argument("--keep-ptx", metavar="DIR", help="write each file's PTX there")
    args = ap.parse_args()

    t0 = time.monotonic()
    dirs = nvidia_dirs(args.site)
    if not dirs:
        fail(
            "no `nvidia` wheel folder found: pip install -r tools/cuda-requirements.txt "
            "(into --site DIR or the running Python)"
        )
    libnvrtc = find_one(dirs, "cuda_nvrtc/lib/libnvrtc.so*")
    include = find_one(dirs, "cuda_runtime/include")
    ptxas = find_one(dirs, "cuda_nvcc/bin/ptxas")
    if not libnvrtc:
        fail(f"libnvrtc not found under {dirs} (wheel nvidia-cuda-nvrtc-cu12)")
    if not include or not os.path.exists(os.path.join(include, "cuda_bf16.h")):
        fail(f"cuda_bf16.h not found under {dirs} (wheel nvidia-cuda-runtime-cu12)")
    nvrtc = Nvrtc(libnvrtc)
    print(f"NVRTC {nvrtc.version}: {libnvrtc}")
    print(f"CUDA headers: {include}")

    sources = sorted(glob.glob(os.path.join(args.kernels, "*.cu")))
    if not sources:
        fail(f"no .cu files in {args.kernels}")
    headers = {}
    for h in sorted(glob.glob(os.path.join(args.kernels, "*.cuh"))):
        with open(h) as f:
            headers[os.path.basename(h)] = f.read()
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    if not archs:
        fail("--arch: no architecture")
    errors: list[str] = []
    tmp = None if args.keep_ptx else tempfile.TemporaryDirectory(prefix="gram-ptx-")
    ptx_dir = args.keep_ptx or tmp.name
    for i, arch in enumerate(archs):
        print(f"\n==== compute_{arch}{' (reference: spills fail)' if i == 0 else ''}")
        check_arch(arch, i == 0, args, nvrtc, include, headers, sources, ptxas, ptx_dir, errors)

    kept = f"; PTX in {ptx_dir}" if args.keep_ptx else ""
    print(f"\n{len(sources)} files × {len(archs)} architectures checked in {time.monotonic() - t0:.1f} s{kept}")
    if tmp:
        tmp.cleanup()
    if errors:
        print("\nCUDA kernel check FAILED:", file=sys.stderr)
        for e in errors:
            print(f"  - {e}", file=sys.stderr)
        sys.exit(1)
    print("CUDA kernel check passed")


if __name__ == "__main__":
    main()
