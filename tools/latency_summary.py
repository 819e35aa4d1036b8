#!/usr/bin/env python3
"""Summaries of `gram bench` runs for issue 5's overload target ("admitted requests keep their
p99"), shared by tools/bench_overload.sh and tools/bench_soak.sh.

    python3 tools/latency_summary.py overload OUT PAIRS   # closed1 open1 ... closed{PAIRS+1}
    python3 tools/latency_summary.py soak OUT             # closed1 open closed2 + rss.tsv

Admitted = every request the server took: answered, or given up at its deadline (504) or by
the client (timeout), which is an admitted request's latency too, at least. Refused at the door
(503) is not; nor are failures that never reached an answer (connect, body, client), counted
under "other errors". p99 is nearest rank, as `gram bench` reports it. Standard library only.
"""
import csv
import json
import math
import sys


def admitted(out, name):
    with open(f"{out}/{name}/latencies.csv") as f:
        return [float(r["latency_ms"]) for r in csv.DictReader(f)
                if r["status"] in ("200", "504", "timeout")]


def p99(v):
    """Nearest rank; None for no samples."""
    v = sorted(v)
    return v[max(math.ceil(0.99 * len(v)), 1) - 1] if v else None


def fmt(x, spec=".1f"):
    return "n/a" if x is None else format(x, spec)


def report(out, name):
    with open(f"{out}/{name}/report.json") as f:
        return json.load(f)


def other_errors(r):
    return sum(v for k, v in r["errors"].items() if k != "503")


HEADER = ("| run | answered/s | 503s | other errors | admitted p99 ms | engine p99 ms | "
          "queue p99 ms | p99 / mean of the closed loops around it |\n"
          "|---|---|---|---|---|---|---|---|")


def row(out, name, ratio=""):
    r = report(out, name)
    return (f"| {name} | {r['qps']:.0f} | {r['errors'].get('503', 0)} | {other_errors(r)} | "
            f"{fmt(p99(admitted(out, name)))} | {fmt(r['engine_ms']['p99'])} | "
            f"{fmt(r['queue_ms']['p99'])} | {ratio} |")


def ratio_around(out, open_name, before, after):
    around = [p99(admitted(out, before)), p99(admitted(out, after))]
    mine = p99(admitted(out, open_name))
    if mine is None or None in around:
        return ""
    return f"{mine / (sum(around) / 2):.3f}"


def overload(out, pairs):
    """Closed and open loops alternated against fresh servers (tools/bench_overload.sh)."""
    print(HEADER)
    closed, opened = [], []
    for i in range(1, pairs + 2):
        print(row(out, f"closed{i}"))
        closed += admitted(out, f"closed{i}")
        if i <= pairs:
            name = f"open{i}"
            print(row(out, name, ratio_around(out, name, f"closed{i}", f"closed{i + 1}")))
            opened += admitted(out, name)
    ratio = f"{p99(opened) / p99(closed):.3f}" if opened and closed else "n/a"
    print(f"\npooled: {len(opened)} admitted under overload, p99 {fmt(p99(opened))} ms; "
          f"{len(closed)} in the closed loops, p99 {fmt(p99(closed))} ms; **{ratio}×**")


def soak(out):
    """One server through closed1, open, closed2, its RSS sampled (tools/bench_soak.sh)."""
    print(HEADER)
    print(row(out, "closed1"))
    print(row(out, "open", ratio_around(out, "open", "closed1", "closed2")))
    print(row(out, "closed2"))
    r = report(out, "open")
    print(f"\nopen loop: {r['requests']} sent, {r['ok']} answered, "
          f"{r['errors'].get('503', 0)} refused (503), {other_errors(r)} other errors")
    # rss.tsv: seconds since the server was ready, phase, RSS in kB (MiB below); a line cut
    # short (the script stopped while writing it) is skipped.
    with open(f"{out}/rss.tsv") as f:
        rss = [(float(t), phase, int(kb)) for t, phase, kb in
               (fields for fields in (line.split() for line in f) if len(fields) == 3)]
    opened = [(t, kb) for t, phase, kb in rss if phase == "open"]
    if opened:
        t0 = opened[0][0]
        # From the first minute of overload on (allocators and caches warm up in it).
        settled = [(t, kb) for t, kb in opened if t - t0 >= 60]
        when = "after its first minute" if settled else "at its start (under a minute long)"
        settled = settled or opened
        last = opened[-max(len(opened) // 4, 1):]
        print(f"RSS under overload: {settled[0][1] / 1024:.1f} MiB {when}, "
              f"{min(kb for _, kb in last) / 1024:.1f}–{max(kb for _, kb in last) / 1024:.1f} MiB "
              f"over its last quarter (max {max(kb for _, kb in opened) / 1024:.1f}): "
              f"{(opened[-1][1] - settled[0][1]) / 1024:+.1f} MiB from the first of these "
              f"to its end")
    print(f"RSS at the end ({rss[-1][1]}): {rss[-1][2] / 1024:.1f} MiB ({len(rss)} samples)")
    try:
        with open(f"{out}/server.exit") as f:
            print(f"server: {f.read().strip()}")
    except FileNotFoundError:
        print("server: no exit status recorded")


def main(argv):
    if len(argv) == 4 and argv[1] == "overload":
        overload(argv[2], int(argv[3]))
    elif len(argv) == 3 and argv[1] == "soak":
        soak(argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
