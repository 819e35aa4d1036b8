"""tools/latency_summary.py: the soak's minute-by-minute comparison and CPU table on runs made
up here (stdlib only)."""
import contextlib
import io
import json
import os
import tempfile
import unittest

from tools import latency_summary as L


def write_run(out, name, rows, qps, window_s=None):
    """rows: (sent_s, latency_ms, status, queue_ms, engine_ms)."""
    os.makedirs(f"{out}/{name}")
    with open(f"{out}/{name}/latencies.csv", "w") as f:
        f.write("sent_s,latency_ms,status,server_ms,queue_ms,engine_ms\n")
        for sent, lat, status, queue, engine in rows:
            f.write(f"{sent},{lat},{status},{lat},{queue},{engine}\n")
    report = {"qps": qps, "errors": {}, "engine_ms": {"p99": 1.0}, "queue_ms": {"p99": 1.0}}
    if window_s is not None:
        report["window_s"] = window_s
    with open(f"{out}/{name}/report.json", "w") as f:
        json.dump(report, f)


def printed(fn, *args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args)
    return buf.getvalue()


def table_rows(text):
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| minute")]


class Minutes(unittest.TestCase):
    def test_each_minute_is_set_against_the_closed_loop_at_its_rate(self):
        with tempfile.TemporaryDirectory() as out:
            # A fast closed loop (100/s, p99 10 ms) and a slow one (50/s, p99 20 ms).
            write_run(out, "fast", [(i / 100, 10.0, "200", 1, 9) for i in range(100)], 100.0)
            write_run(out, "slow", [(i / 50, 20.0, "200", 1, 19) for i in range(100)], 50.0)
            # Overload: minute 0 answers 6,000 (100/s) at 11 ms; minute 1 answers 2,960 at
            # 21 ms and 40 more are admitted but time out (504, 30 ms): they are 1.3 % of its
            # 3,000 admitted, so they set its p99. 503s and a client-side failure are not
            # admitted.
            rows = [(i / 100, 11.0, "200", 2, 9) for i in range(6000)]
            rows += [(60 + i / 50, 21.0, "200", 2, 19) for i in range(2960)]
            rows += [(119.0 + i / 100, 30.0, "504", 0, 0) for i in range(40)]
            rows += [(30.0, 0.1, "503", 0, 0), (90.0, 0.1, "503", 0, 0), (91.0, 5000.0, "connect", 0, 0)]
            write_run(out, "open", rows, 75.0, window_s=120.0)
            rows = table_rows(printed(L.minutes_table, out, "open", ("fast", "slow")))
        self.assertEqual(len(rows), 2)
        m0, m1 = rows
        self.assertEqual(m0[:2], ["0", "100"])
        self.assertTrue(m0[2].startswith("fast (100/s, p99 10.0)"), m0)
        self.assertEqual((m0[3], m0[4], m0[5]), ("1.00", "11.0", "1.100"))
        self.assertEqual(m1[:2], ["1", "49"])
        self.assertTrue(m1[2].startswith("slow (50/s, p99 20.0)"), m1)
        # The queue and engine columns count answered requests only.
        self.assertEqual((m1[3], m1[4], m1[5], m1[6], m1[7]), ("0.99", "30.0", "1.500", "2.0", "19.0"))

    def test_a_short_last_minute_is_left_out(self):
        with tempfile.TemporaryDirectory() as out:
            write_run(out, "c", [(i, 10.0, "200", 1, 9) for i in range(10)], 1.0)
            rows = [(i / 10, 10.0, "200", 1, 9) for i in range(700)]  # 0-70 s
            write_run(out, "open", rows, 10.0, window_s=70.0)
            got = table_rows(printed(L.minutes_table, out, "open", ("c",)))
        self.assertEqual([r[0] for r in got], ["0"])


class Cpu(unittest.TestCase):
    def test_cores_busy_by_minute_from_tick_samples(self):
        # Ten-second samples at 100 ticks a second: the server takes 1,500 ticks (1.5 cores) a
        # sample in the first minute and 1,000 (1 core) in the second; every process 2,000;
        # steal 0, then 100 (0.1 core). The closed loop's sample before is not counted.
        ticks, n = [], [0, 0, 0]
        ticks.append((0.0, "closed1", [-5000, -5000, -5000]))
        for i in range(13):
            ticks.append((10.0 + 10 * i, "open", list(n)))
            first = i < 6
            n = [n[0] + (1500 if first else 1000), n[1] + 2000, n[2] + (0 if first else 100)]
        rows = table_rows(printed(L.cpu_by_minute, ticks))
        self.assertEqual(rows, [["0", "1.50", "2.00", "0.000"], ["1", "1.00", "2.00", "0.100"]])


if __name__ == "__main__":
    unittest.main()
