#!/usr/bin/env python3
"""Summaries of `gram bench` runs for issue 5's overload target ("admitted requests keep their
p99"), shared by tools/bench_overload.sh and tools/bench_soak.sh.

    python3 tools/latency_summary.py overload OUT PAIRS   # closed1 open1 ... closed{PAIRS+1}
    python3 tools/latency_summary.py soak OUT             # closed1 open closed2 + rss.tsv
    python3 tools/latency_summary.py minutes OUT NAME [CLOSED...]  # one run by the minute

Admitted = every request the server took: answered, or given up at its deadline (504) or by
the client (timeout), which is an admitted request's latency too, at least. Refused at the door
(503) is not; nor are failures that never reached an answer (connect, body, client), counted
under "other errors". p99 is nearest rank, as `gram bench` reports it. Standard library only.
"""
import csv
import json
import math
import os
import sys


def admitted(out, name):
    with open(f"{out}/{name}/latencies.csv") as f:
        return [float(r["latency_ms"]) for r in csv.DictReader(f)
                if r["status"] in ("200", "504", "timeout")]


def by_minute(out, name):
    """The run's admitted requests by the minute they were sent in: [(answered, admitted
    latencies, queue ms, engine ms)], queue and engine of the answered ones."""
    minutes = []
    with open(f"{out}/{name}/latencies.csv") as f:
        for r in csv.DictReader(f):
            m = int(float(r["sent_s"]) // 60)
            while len(minutes) <= m:
                minutes.append([0, [], [], []])
            if r["status"] not in ("200", "504", "timeout"):
                continue
            minute = minutes[m]
            minute[1].append(float(r["latency_ms"]))
            if r["status"] == "200":
                minute[0] += 1
                # A 200 whose body did not parse has no timings (empty fields).
                if r["queue_ms"] and r["engine_ms"]:
                    minute[2].append(float(r["queue_ms"]))
                    minute[3].append(float(r["engine_ms"]))
    return minutes


def minutes_table(out, name, closed=()):
    """`name` minute by minute. Under overload the server is saturated throughout, so the rate
    it answers at in a minute is the speed it had then (this host's speed swings by a third
    from one stretch to the next, docs/SERVER.md). Each minute is set against the closed loop
    of `closed` (saturated too) whose rate is nearest its own. That reading takes a slowdown
    the overload itself causes for the host's, so it is a second reading beside the whole
    run's, not a replacement. The last minute is scaled by its length, and left out when it is
    under half a minute."""
    refs = [(c, report(out, c)["qps"], p99(admitted(out, c))) for c in closed]
    r = report(out, name)
    minutes = by_minute(out, name)
    # The run's sending time: `window_s` (gram bench), else `elapsed_s`, else the last send.
    window = r.get("window_s") or r.get("elapsed_s") or 60.0 * len(minutes)
    print(f"| minute of {name} | answered/s | closed loop at the nearest rate | rate / its | "
          f"admitted p99 ms | p99 / its | queue p99 ms | engine p99 ms |\n"
          f"|---|---|---|---|---|---|---|---|")
    for m, (answered, lat, queue, engine) in enumerate(minutes):
        span = min(60.0, window - 60 * m)
        if span < 30:
            continue
        rate = answered / span
        mine = p99(lat)
        # A minute that answered nothing has no speed to match a closed loop by.
        near = min(refs, key=lambda x: abs(x[1] - rate)) if refs and answered else None
        ref = f"{near[0]} ({near[1]:.0f}/s, p99 {fmt(near[2])})" if near else "n/a"
        rate_ratio = rate / near[1] if near else None
        p99_ratio = mine / near[2] if near and near[2] and mine else None
        print(f"| {m} | {rate:.0f} | {ref} | {fmt(rate_ratio, '.2f')} | {fmt(mine)} | "
              f"{fmt(p99_ratio, '.3f')} | {fmt(p99(queue))} | {fmt(p99(engine))} |")


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
          "queue p99 ms | send lag p99 ms | p99 / mean of the closed loops around it |\n"
          "|---|---|---|---|---|---|---|---|---|")


def row(out, name, ratio=""):
    r = report(out, name)
    # The generator's own lateness (an open loop's latency counts from the schedule, so it is
    # inside the admitted p99); absent from reports before the thirty-ninth session.
    lag = r.get("send_lag_ms", {}).get("p99") if r.get("send_lag_ms", {}).get("n") else None
    return (f"| {name} | {r['qps']:.0f} | {r['errors'].get('503', 0)} | {other_errors(r)} | "
            f"{fmt(p99(admitted(out, name)))} | {fmt(r['engine_ms']['p99'])} | "
            f"{fmt(r['queue_ms']['p99'])} | {fmt(lag, '.2f')} | {ratio} |")


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


def cpu_by_minute(ticks, hz=100):
    """Cores busy in each minute of the overload, from the CPU ticks sampled about every 10 s
    (server, every process and the steal, which counts in the second too; minutes counted from
    the first sample of the overload, so up to 10 s after the load's own minutes): each
    minute's ticks over its seconds. A minute that answers fewer requests while the server
    keeps as many cores busy ran slower per CPU second."""
    opened = [(t, n) for t, phase, n in ticks if phase == "open"]
    if len(opened) < 2:
        return
    t0 = opened[0][0]
    by = {}  # minute: [seconds, [ticks of the server, every process, steal]]
    for (ta, na), (tb, nb) in zip(opened, opened[1:]):
        if tb > ta:
            minute = by.setdefault(int((ta - t0) // 60), [0.0, [0, 0, 0]])
            minute[0] += tb - ta
            minute[1] = [x + b - a for x, a, b in zip(minute[1], na, nb)]
    print("\n| minute of the overload (CPU samples) | server cores | all processes' cores, "
          "steal included | steal |\n|---|---|---|---|")
    for m, (secs, total) in sorted(by.items()):
        c = [x / hz / secs for x in total]
        print(f"| {m} | {c[0]:.2f} | {c[1]:.2f} | {c[2]:.3f} |")


def read_samples(path):
    """rss.tsv: (seconds, phase, kB) and, since the thirty-sixth session, the ticks (server,
    every process, steal). A line cut short (the script stopped while writing it) is
    skipped; None when the run has no rss.tsv (runs before the thirty-fourth session)."""
    try:
        with open(path) as f:
            lines = [x for x in (line.split() for line in f) if len(x) in (3, 6)]
    except FileNotFoundError:
        return None
    rss = [(float(x[0]), x[1], int(x[2])) for x in lines]
    ticks = [(float(x[0]), x[1], [int(n) for n in x[3:]]) for x in lines if len(x) == 6]
    return rss, ticks


def soak(out):
    """One server through closed1, open, closed2, its RSS sampled (tools/bench_soak.sh)."""
    print(HEADER)
    print(row(out, "closed1"))
    print(row(out, "open", ratio_around(out, "open", "closed1", "closed2")))
    print(row(out, "closed2"))
    print()
    minutes_table(out, "open", ("closed1", "closed2"))
    r = report(out, "open")
    print(f"\nopen loop: {r['requests']} sent, {r['ok']} answered, "
          f"{r['errors'].get('503', 0)} refused (503), {other_errors(r)} other errors")
    samples = read_samples(f"{out}/rss.tsv")
    if samples is None:
        print("no rss.tsv: no memory or CPU samples in this run")
        return
    rss, ticks = samples
    cpu_by_minute(ticks, os.sysconf("SC_CLK_TCK"))
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
    elif len(argv) >= 4 and argv[1] == "minutes":
        minutes_table(argv[2], argv[3], tuple(argv[4:]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
