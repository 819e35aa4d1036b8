use super::*;

/// A failure wrapping the client's own EMFILE / ENFILE is `client`, anything else
/// `connect` (the client's descriptor limit looked like the server refusing connections).
#[test]
fn the_clients_own_descriptor_limit_is_not_a_connect_error() {
    #[derive(Debug)]
    struct Wrap(std::io::Error);
    impl std::fmt::Display for Wrap {
        fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "client error (Connect)")
        }
    }
    impl std::error::Error for Wrap {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    let os = |n| Wrap(std::io::Error::from_raw_os_error(n));
    let refused = Wrap(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
    if cfg!(unix) {
        assert_eq!(request_failure(&os(24)), Status::Client);
        assert_eq!(request_failure(&os(23)), Status::Client);
    }
    assert_eq!(request_failure(&refused), Status::Connect);
    assert_eq!(request_failure(&os(111)), Status::Connect);
}

#[test]
fn nearest_rank_percentiles() {
    let v: Vec<f64> = (1..=1000).map(f64::from).collect();
    let p = Percentiles::of(&v);
    assert_eq!(
        (p.p50, p.p90, p.p99, p.p999, p.max),
        (500.0, 900.0, 990.0, 999.0, 1000.0)
    );
    assert_eq!(Percentiles::of(&[7.0]).p999, 7.0);
    // Where q·n is not whole the rank rounds up (1.5 → the 2nd), never down.
    let p = Percentiles::of(&[3.0, 1.0, 2.0]);
    assert_eq!((p.p50, p.p90), (2.0, 3.0));
}

/// A summary of no values reports `null`s, not latencies of 0, and reads back; one of values
/// keeps its numbers through the report.
#[test]
fn empty_percentiles_report_nulls() {
    let json = serde_json::to_value(Percentiles::of(&[])).unwrap();
    assert_eq!(json["n"], 0);
    for f in ["mean", "p50", "p90", "p99", "p999", "max"] {
        assert!(json[f].is_null(), "{f}: {json}");
    }
    let back: Percentiles = serde_json::from_value(json).unwrap();
    assert_eq!(back.n, 0);
    let p = Percentiles::of(&[2.5, 4.0]);
    let json = serde_json::to_value(p.clone()).unwrap();
    assert_eq!(
        (json["p50"].as_f64(), json["max"].as_f64()),
        (Some(2.5), Some(4.0))
    );
    let back: Percentiles = serde_json::from_value(json).unwrap();
    assert_eq!((back.n, back.mean, back.p99), (2, 3.25, 4.0));
}

#[test]
fn server_timing_header() {
    let h = "queue;dur=0.027, engine;dur=1.503, server;dur=1.621";
    assert_eq!(timing_dur(h, "server"), Some(1.621));
    assert_eq!(timing_dur(h, "queue"), Some(0.027));
    assert_eq!(timing_dur(h, "db"), None);
    assert_eq!(timing_dur("server;desc=\"x\";dur=2", "server"), Some(2.0));
    assert_eq!(timing_dur("server", "server"), None);
    assert_eq!(timing_dur("server;dur=abc", "server"), None);
    // Rust's float parser takes these; a report cannot hold them.
    assert_eq!(timing_dur("server;dur=NaN", "server"), None);
    assert_eq!(timing_dur("server;dur=inf", "server"), None);
    assert_eq!(timing_dur("", "server"), None);
}

fn args(flags: &[&str]) -> BenchArgs {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }
    let mut argv = vec!["bench", "--url", "http://127.0.0.1:1", "--queries", "q.txt"];
    argv.extend_from_slice(flags);
    <Cli as clap::Parser>::parse_from(argv).bench
}

/// The rates divide by the sending window, not by the wait for the last answer: 1,000
/// sent in a 10 s run whose last answer came at 70 s (one request timed out) are 100 a
/// second.
#[test]
fn rates_are_per_second_of_the_window() {
    let samples: Vec<Sample> = (0..1000)
        .map(|i| Sample {
            sent_s: i as f64 / 100.0,
            latency_s: if i == 999 { 60.0 } else { 0.5 },
            status: if i == 999 {
                Status::Timeout
            } else {
                Status::Http(200)
            },
            lag_s: 0.0,
            server_ms: None,
            queue_ms: None,
            engine_ms: None,
        })
        .collect();
    let (r, _) = report(&args(&["--rate", "100"]), 1, &samples, 70.0, 10.0);
    assert_eq!((r.elapsed_s, r.window_s), (70.0, 10.0));
    assert_eq!((r.sent_qps, r.qps), (100.0, 99.9));
}

/// A closed loop's rates count the requests answered within its window: 16 clients, each
/// answered 0.3 s after it sends, for 1 s, send at 0, 0.3, 0.6 and 0.9 s; the last 16 are
/// answered at 1.2 s, after the window. Counting them by their sending read 64 a second.
#[test]
fn a_closed_loop_counts_what_it_finished_within_the_window() {
    let samples: Vec<Sample> = (0..64)
        .map(|i| Sample {
            sent_s: 0.3 * (i / 16) as f64,
            latency_s: 0.3,
            status: Status::Http(200),
            lag_s: 0.0,
            server_ms: None,
            queue_ms: None,
            engine_ms: None,
        })
        .collect();
    let (r, _) = report(&args(&["--concurrency", "16"]), 16, &samples, 1.2, 1.0);
    assert_eq!((r.requests, r.ok), (64, 64));
    assert_eq!((r.sent_qps, r.qps), (48.0, 48.0));
    // The open loop counts what it sent in the window, answered whenever.
    let (r, _) = report(&args(&["--rate", "64"]), 1, &samples, 1.2, 1.0);
    assert_eq!((r.sent_qps, r.qps), (64.0, 64.0));
}

/// The plot of runs at the edges: one answer, all alike, sub-microsecond, a wide spread with
/// timeouts and 504s. Every number drawn is finite (an SVG with NaN in it draws nothing),
/// the histogram has its 40 bars, and the tallest is the full height.
#[test]
fn the_plot_draws_finite_numbers_at_the_edges() {
    let run = |lat: &[(f64, Status)]| {
        let samples: Vec<Sample> = lat
            .iter()
            .enumerate()
            .map(|(i, &(l, status))| Sample {
                sent_s: i as f64 * 0.01,
                latency_s: l,
                status,
                lag_s: 0.0,
                server_ms: None,
                queue_ms: None,
                engine_ms: None,
            })
            .collect();
        let (r, _) = report(&args(&["--rate", "100"]), 1, &samples, 1.0, 1.0);
        plot::svg(&r, &samples)
    };
    let ok = Status::Http(200);
    let wide: Vec<(f64, Status)> = (0..500)
        .map(|i| match i {
            0..=489 => (1e-4 * 1.02f64.powi(i), ok),
            490..=494 => (10.0, Status::Http(504)),
            _ => (30.0, Status::Timeout),
        })
        .collect();
    for (name, lat) in [
        ("one", vec![(0.004, ok)]),
        ("alike", vec![(0.002, ok); 50]),
        ("sub-microsecond", vec![(2e-7, ok), (5e-7, ok), (9e-7, ok)]),
        ("wide", wide),
    ] {
        let svg = run(&lat);
        for bad in ["NaN", "inf"] {
            assert!(!svg.contains(bad), "{name}: {bad} in the plot");
        }
        let bars: Vec<&str> = svg.lines().filter(|l| l.contains("#4c78a8")).collect();
        assert_eq!(bars.len(), 40, "{name}");
        assert!(svg.contains("latency histogram"), "{name}");
    }
}

/// The serving overhead is latency less the engine's stages (the queue stays in it, and is
/// reported apart); the generator's lateness is reported over every request sent.
#[test]
fn overhead_and_lateness_are_reported() {
    let samples: Vec<Sample> = (0..10)
        .map(|i| Sample {
            sent_s: i as f64,
            latency_s: 0.010,
            status: if i < 8 {
                Status::Http(200)
            } else {
                Status::Http(503)
            },
            lag_s: 0.001 * i as f64,
            server_ms: Some(9.5),
            queue_ms: Some(3.0),
            engine_ms: Some(6.0),
        })
        .collect();
    let (r, _) = report(&args(&["--rate", "1"]), 1, &samples, 10.0, 10.0);
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(r.overhead_ms.p50, 4.0), "{:?}", r.overhead_ms);
    assert!(close(r.queue_ms.p50, 3.0), "{:?}", r.queue_ms);
    assert!(
        close(r.server_overhead_ms.p50, 3.5),
        "{:?}",
        r.server_overhead_ms
    );
    assert_eq!(r.send_lag_ms.n, 10);
    assert!(close(r.send_lag_ms.max, 9.0), "{:?}", r.send_lag_ms);
    assert!(close(r.send_lag_ms.p50, 4.0), "{:?}", r.send_lag_ms);
}

/// The timeouts and the server's deadline answers (504) are the slowest requests: the
/// 200s' percentiles leave them out, the `latency_with_timeouts_ms` ones count each at the
/// time it was given up (the 504s were left out, and the tail read as the 200s'); a 503 is
/// in neither.
#[test]
fn timeouts_count_in_the_tail_they_belong_to() {
    let samples: Vec<Sample> = (0..200)
        .map(|i| Sample {
            sent_s: i as f64 / 100.0,
            latency_s: match i {
                0..=95 => 0.001 * (i + 1) as f64,
                96 | 97 => 10.0,
                98 | 99 => 30.0,
                _ => 0.0001,
            },
            status: match i {
                0..=95 => Status::Http(200),
                96 | 97 => Status::Http(504),
                98 | 99 => Status::Timeout,
                _ => Status::Http(503),
            },
            lag_s: 0.0,
            server_ms: None,
            queue_ms: None,
            engine_ms: None,
        })
        .collect();
    let (r, _) = report(&args(&["--rate", "100"]), 1, &samples, 32.0, 2.0);
    assert_eq!(
        (r.latency_ms.n, r.latency_ms.p99, r.latency_ms.max),
        (96, 96.0, 96.0)
    );
    let t = &r.latency_with_timeouts_ms;
    assert_eq!((t.n, t.p50, t.p90, t.p99), (100, 50.0, 90.0, 30_000.0));
    assert_eq!(r.errors["504"], 2);
    assert_eq!(r.errors["timeout"], 2);
    assert_eq!(r.errors["503"], 100);
}

#[test]
fn absurd_numbers_are_refused_not_a_panic() {
    for (flags, want) in [
        (&["--duration", "1e20"][..], "--duration"),
        (&["--timeout-s", "1e20"][..], "--timeout-s"),
        (&["--rate", "1e300"][..], "--rate"),
        (
            &["--rate", "0.5", "--count", "2000000"][..],
            "--count 2000000 at --rate",
        ),
        // A subnormal rate's interval is infinite: its report's window read `null`, and
        // `--replot` refused it.
        (&["--rate", "1e-7"][..], "one request every"),
        (&["--rate", "1e-310"][..], "one request every"),
        (&["--concurrency", "100000"][..], "--concurrency 100000"),
        (&["--k", "0"][..], "--k"),
        (&["--beam", "0"][..], "--beam"),
        (&["--beam", "513"][..], "--beam"),
    ] {
        let e = run(args(flags)).unwrap_err();
        assert!(e.contains(want), "{flags:?}: {e}");
    }
}

/// Against a port nobody listens on, every request fails to connect: the run ends (at the
/// lowest rate taken, too, one request in its ten seconds), and it is an error, not a report
/// of nothing with exit status 0.
#[test]
fn a_run_with_no_answer_is_an_error() {
    let dir = std::env::temp_dir().join(format!("gram-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let q = dir.join("q.txt");
    std::fs::write(&q, "oak desk\n").unwrap();
    for flags in [&["--rate", "1e-6"][..], &["--count", "3"][..]] {
        let mut a = args(flags);
        a.queries = Some(q.clone());
        let e = run(a).unwrap_err();
        assert!(e.contains("no request was answered"), "{flags:?}: {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An `--out` that cannot be written is refused before the load (a path under a regular
/// file): the run's report was lost at its end.
#[test]
fn an_unwritable_out_is_refused_before_the_run() {
    let dir = std::env::temp_dir().join(format!("gram-loadgen-out-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let q = dir.join("q.txt");
    std::fs::write(&q, "oak desk\n").unwrap();
    let mut a = args(&["--count", "3"]);
    a.queries = Some(q.clone());
    a.out = Some(q.join("out"));
    let e = run(a).unwrap_err();
    assert!(e.contains("q.txt/out"), "{e}");
    assert!(!e.contains("no request was answered"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every status `csv` writes reads back (`--replot`): a run whose load generator ran out of
/// file descriptors (`client`) was refused as malformed.
#[test]
fn every_status_round_trips_through_the_csv() {
    let statuses = [
        Status::Http(200),
        Status::Http(503),
        Status::Timeout,
        Status::Connect,
        Status::Body,
        Status::Client,
    ];
    let samples: Vec<Sample> = statuses
        .iter()
        .enumerate()
        .map(|(i, &status)| Sample {
            sent_s: 0.25 * i as f64,
            latency_s: 0.0015,
            status,
            lag_s: 0.000125 * i as f64,
            server_ms: (status == Status::Http(200)).then_some(0.125),
            queue_ms: None,
            engine_ms: None,
        })
        .collect();
    let text = csv(&samples);
    let back: Vec<Sample> = text
        .lines()
        .skip(1)
        .map(|l| parse_csv_line(l).expect(l))
        .collect();
    assert_eq!(back.iter().map(|s| s.status).collect::<Vec<_>>(), statuses);
    for (b, s) in back.iter().zip(&samples) {
        assert!((b.lag_s - s.lag_s).abs() < 1e-9, "{b:?}");
    }
    // A file from before the lateness column reads with none.
    let old = parse_csv_line("0.5,1.25,200,0.1,,0.9").unwrap();
    assert_eq!(old.lag_s, 0.0);
}

#[test]
fn a_latency_file_with_a_non_finite_number_is_malformed() {
    assert!(parse_csv_line("0.5,1.25,200,0.1,,0.9").is_some());
    for line in [
        "0.5,inf,200,,,",
        "NaN,1.25,200,,,",
        "0.5,1.25,200,inf,,",
        "0.5,-inf,timeout,,,",
    ] {
        assert!(parse_csv_line(line).is_none(), "{line}");
    }
}

#[test]
fn endpoints() {
    let (u, k) = endpoint("http://127.0.0.1:8080").unwrap();
    assert_eq!(
        (u.to_string().as_str(), k),
        ("http://127.0.0.1:8080/v1/search", true)
    );
    let (u, k) = endpoint("http://localhost:1/v1/codes").unwrap();
    assert_eq!((u.path(), k), ("/v1/codes", false));
    assert!(endpoint("https://x/").is_err());
}
