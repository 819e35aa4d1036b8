#!/usr/bin/env bash
# A/B timing on a noisy machine: runs command A and command B in ABBA order (A B B A, repeated),
# so that neither always runs first or second, takes one number from each run's output, and
# prints every run, each side's median / min / max and the ratio of medians (B / A).
#
# Why ABBA: on the project's 2-vCPU VM, the second of two back-to-back runs is often slower,
# by up to 20 % even for two copies of the same binary (docs/PERF.md, thirteenth session).
# An A B A B series that always runs B second then reads as "B is slower".
#
#   A="/tmp/old --model M --threads 2 ..." B="/tmp/new --model M --threads 2 ..." \
#   ROUNDS=3 tools/ab.sh
#
# A, B     the two commands (run with `bash -c`; build each binary first and copy it aside,
#          e.g. from target/release/deps/, so that a rebuild does not replace it)
# METRIC   an extended regex; the last match in a run's stdout+stderr is its number (the last
#          number inside the match). Default: the beam bench's batch-1 `full` median (the bench
#          prints a record per mode; a bare "ms_median" matched the last, `full+prefix`). For
#          lm_throughput, METRIC='"tok_s_median":[0-9.]+' (the last dtype's b10: one dtype and
#          one measurement a command).
# ROUNDS   how many A B B A blocks (default 3: six runs of each)
set -euo pipefail
: "${A:?set A to command A}" "${B:?set B to command B}"
metric=${METRIC:-'"normalize":"full","batch":1,[^}]*"ms_median":[0-9.]+'}
rounds=${ROUNDS:-3}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "error: ROUNDS must be a positive integer" >&2; exit 2; }

one() { # $1 = A|B; prints the run's number
  local cmd out val
  if [ "$1" = A ]; then cmd=$A; else cmd=$B; fi
  out=$(bash -c "$cmd" 2>&1) || { echo "error: command $1 failed:" >&2; echo "$out" | tail -5 >&2; exit 1; }
  val=$(grep -Eo -- "$metric" <<<"$out" | tail -1 | grep -Eo '[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?' | tail -1) || true
  [ -n "$val" ] || { echo "error: no match of /$metric/ in the output of $1" >&2; exit 1; }
  echo "$val"
}

as=() bs=()
for ((r = 1; r <= rounds; r++)); do
  for side in A B B A; do
    v=$(one "$side")
    echo "round $r $side $v"
    if [ "$side" = A ]; then as+=("$v"); else bs+=("$v"); fi
  done
done

stats() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {m = NR % 2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2; printf "%s %s %s", m, v[1], v[NR]}'; }
read -r ma mina maxa <<<"$(stats "${as[@]}")"
read -r mb minb maxb <<<"$(stats "${bs[@]}")"
echo "A: median $ma (min $mina, max $maxa) over ${#as[@]} runs"
echo "B: median $mb (min $minb, max $maxb) over ${#bs[@]} runs"
awk -v a="$ma" -v b="$mb" 'BEGIN { if (a != 0) printf "B / A (medians): %.3f\n", b / a }'
