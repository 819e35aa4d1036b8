"""tools/latency_summary.py: the soak's minute-by-minute comparison, its CPU table and its
samples, on runs made up here (stdlib only)."""
import contextlib
import io
import json
import os
import tempfile
import unittest

from tools import latency_summary as L


def write_run(out, name, rows, qps, **extra):
    """rows: (sent_s, latency_ms, status, queue_ms, engine_ms)."""
    os.makedirs(f"{out}/{name}")
    with open(f"{out}/{name}/latencies.csv", "w") as f:
        f.write("sent_s,latency_ms,status,server_ms,queue_ms,engine_ms\n")
        for sent, lat, status, queue, engine in rows:
            f.write(f"{sent},{lat},{status},{lat},{queue},{engine}\n")
    report = {"qps": qps, "errors": {}, "engine_ms": {"p99": 1.0}, "queue_ms": {"p99": 1.0}}
    report.update(extra)
    with open(f"{out}/{name}/report.json", "w") as f:
        json.dump(report, f)


def printed(fn, *args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args)
    return buf.getvalue()


def table_rows(text):
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| minute")]


def noise(t0, n):
    """n requests that are not admitted (refusals, client-side failures), with a latency that
    would move any p99 they entered."""
    return [(t0 + i / 1000, 9999.0, "503" if i % 2 else "connect", 999, 999) for i in range(n)]


class Minutes(unittest.TestCase):
    def test_each_minute_is_set_against_the_closed_loop_at_its_rate(self):
        with tempfile.TemporaryDirectory() as out:
            # A fast closed loop (100/s, p99 10 ms) and a slow one (50/s, p99 20 ms).
            write_run(out, "fast", [(i / 100, 10.0, "200", 1, 9) for i in range(100)], 100.0)
            write_run(out, "slow", [(i / 50, 20.0, "200", 1, 19) for i in range(100)], 50.0)
            # Minute 0 answers 6,000 (100/s) at 11 ms. Minute 1 answers 2,960 at 21 ms and
            # admits 40 more that time out (504 at 30 ms: 1.3 % of its 3,000 admitted, so they
            # set its p99; their queue and engine times, 999, are not answers'). 400 requests
            # a minute are not admitted (503s, failures): 4 % of the rows.
            rows = [(i / 100, 11.0, "200", 2, 9) for i in range(6000)] + noise(1, 400)
            rows += [(60 + i / 50, 21.0, "200", 2, 19) for i in range(2960)]
            rows += [(119.0 + i / 100, 30.0, "504", 999, 999) for i in range(40)] + noise(61, 400)
            write_run(out, "open", rows, 75.0, window_s=120.0)
            got = table_rows(printed(L.minutes_table, out, "open", ("fast", "slow")))
        self.assertEqual(len(got), 2)
        m0, m1 = got
        self.assertEqual(m0[:2], ["0", "100"])
        self.assertTrue(m0[2].startswith("fast (100/s, p99 10.0)"), m0)
        self.assertEqual(m0[3:], ["1.00", "11.0", "1.100", "2.0", "9.0"])
        self.assertEqual(m1[:2], ["1", "49"])
        self.assertTrue(m1[2].startswith("slow (50/s, p99 20.0)"), m1)
        self.assertEqual(m1[3:], ["0.99", "30.0", "1.500", "2.0", "19.0"])

    def test_the_last_minute_counts_by_its_length_and_a_short_one_is_left_out(self):
        for window, key, rows_out in ((100.0, "window_s", 2), (100.0, "elapsed_s", 2),
                                      (85.0, "window_s", 1)):
            with tempfile.TemporaryDirectory() as out:
                write_run(out, "c", [(i, 10.0, "200", 1, 9) for i in range(10)], 10.0)
                # 10 answers a second over the run's whole length.
                rows = [(i / 10, 10.0, "200", 1, 9) for i in range(int(window * 10))]
                write_run(out, "open", rows, 10.0, **{key: window})
                got = table_rows(printed(L.minutes_table, out, "open", ("c",)))
            self.assertEqual(len(got), rows_out, (window, key))
            # The 40 s of minute 1 answered 400: 10 a second, not 400 / 60.
            self.assertEqual([r[1] for r in got], ["10"] * rows_out, (window, key))

    def test_a_minute_that_answers_nothing_has_no_reference(self):
        with tempfile.TemporaryDirectory() as out:
            write_run(out, "c", [(i, 10.0, "200", 1, 9) for i in range(10)], 10.0)
            rows = [(i / 10, 10.0, "200", 1, 9) for i in range(600)]
            rows += [(60 + i, 30.0, "504", 1, 9) for i in range(60)]
            write_run(out, "open", rows, 5.0, window_s=120.0)
            got = table_rows(printed(L.minutes_table, out, "open", ("c",)))
        self.assertEqual(got[1][:6], ["1", "0", "n/a", "n/a", "30.0", "n/a"])


class Cpu(unittest.TestCase):
    def test_cores_busy_by_minute_are_its_ticks_over_its_seconds(self):
        # Samples 10 s apart but one 12 s gap, in which the server takes 2 cores; hz 250. The
        # server takes 1.5 cores in the rest of the first minute (62 s: 99 core-seconds, 1.60
        # cores; the mean of the six samples' rates would be 1.58) and 1 core in the second;
        # every process 2; steal 0, then 0.1 core.
        hz, ticks, n, t = 250, [(0.0, "closed1", [-5000, -5000, -5000])], [0, 0, 0], 10.0
        for i in range(12):
            ticks.append((t, "open", list(n)))
            gap = 12.0 if i == 3 else 10.0
            first = t - 10.0 < 60
            server = 2.0 if i == 3 else 1.5 if first else 1.0
            n = [n[0] + int(gap * hz * server), n[1] + int(gap * hz * 2),
                 n[2] + (0 if first else int(gap * hz * 0.1))]
            t += gap
        ticks.append((t, "open", list(n)))
        ticks.append((t + 10, "closed2", [0, 0, 0]))
        got = table_rows(printed(L.cpu_by_minute, ticks, hz))
        self.assertEqual(got, [["0", "1.60", "2.00", "0.000"], ["1", "1.00", "2.00", "0.100"]])


class Samples(unittest.TestCase):
    def test_old_and_new_lines_and_a_cut_one(self):
        with tempfile.TemporaryDirectory() as out:
            with open(f"{out}/rss.tsv", "w") as f:
                f.write("10 closed1 1000\n20.50 open 2048 300 400 5\n30.5 open 2048 30\n"
                        "40.25 open 3072 600 800 6\n")
            rss, ticks = L.read_samples(f"{out}/rss.tsv")
            self.assertEqual(rss, [(10.0, "closed1", 1000), (20.5, "open", 2048),
                                   (40.25, "open", 3072)])
            self.assertEqual(ticks, [(20.5, "open", [300, 400, 5]), (40.25, "open", [600, 800, 6])])
            self.assertIsNone(L.read_samples(f"{out}/missing.tsv"))


if __name__ == "__main__":
    unittest.main()
