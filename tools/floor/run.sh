#!/usr/bin/env bash
# Build and run the machine-floor microbenchmark; prints one JSON object.
# Env knobs: FLOOR_THREADS (default: all cores), FLOOR_MIB (array size, default 1024),
#            FLOOR_REPS (runs per measurement, default 7; best+median reported), FLOOR_FMA_ITERS (default 1e8).
# Run on an otherwise idle machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${FLOOR_BUILD_DIR:-$here/../../bench-out}"
mkdir -p "$out"
gcc -O3 -march=native -fopenmp -o "$out/floor" "$here/floor.c"
export OMP_PROC_BIND="${OMP_PROC_BIND:-close}" OMP_PLACES="${OMP_PLACES:-cores}"
exec "$out/floor"
