//! `gram bench`: an HTTP load generator for `gram serve` (tokio + hyper's pooled client).
//!
//! - **Closed loop** (`--concurrency N`): N clients, each sending its next query as soon as its
//!   last one is answered. Measures what N users in a loop see; it cannot overload the server.
//! - **Open loop** (`--rate QPS`): requests go out on a fixed schedule (request i at
//!   `start + i / QPS`) whatever the answers, each on a connection of its own when the others are
//!   busy. Latency counts from the *scheduled* send time, so a stalled server or a late
//!   generator shows up in the numbers instead of being left out (no coordinated omission).
//!
//! Either runs for `--duration S` or `--count N` requests, cycling through the query file. The
//! report (JSON on stdout, and `report.json` under `--out`) gives QPS, latency percentiles of
//! the answered requests, the server's own timings, and errors by status; `--out` also gets the
//! raw latencies (`latencies.csv`) and a latency histogram and percentile plot (`latency.svg`).

pub mod plot;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The longest `--duration` / `--timeout-s` (and `--count / --rate`) taken, seconds: 11 days.
const MAX_SECONDS: f64 = 1e6;
/// The highest `--rate` taken, requests per second.
const MAX_RATE: f64 = 1e6;
/// How long the load generator keeps an idle connection: under `gram serve`'s default keep-alive
/// (5 s) and most servers' (see where the client is built); a server that closes idle
/// connections sooner can still race with it.
const POOL_IDLE: Duration = Duration::from_secs(2);

/// The files `--out` gets: the report, the raw latencies, the plot.
const OUT_FILES: [&str; 3] = ["report.json", "latencies.csv", "latency.svg"];

/// A closed-loop client's pause after a request that could not connect (or find a descriptor).
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);

/// Clients of a closed loop at most (each is a task with its own connection).
const MAX_CONCURRENCY: usize = 65_536;

/// `gram bench` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// The server: a base URL (`http://127.0.0.1:8080`, then `POST /v1/search`) or an endpoint
    /// (`.../v1/search` or `.../v1/codes`). Plain HTTP.
    #[arg(long, required_unless_present = "replot")]
    pub url: Option<String>,
    /// Query file: one query per line (blank lines and lines starting with `#` are skipped).
    #[arg(long, required_unless_present = "replot")]
    pub queries: Option<PathBuf>,
    /// Closed loop: this many clients, each sending its next query when its last is answered
    /// (the default, with 1 client).
    #[arg(long, conflicts_with = "rate")]
    pub concurrency: Option<usize>,
    /// Open loop: send this many requests per second on a fixed schedule; latency counts from
    /// each request's scheduled time.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Run for this many seconds (the default: 10).
    #[arg(long, conflicts_with = "count")]
    pub duration: Option<f64>,
    /// Send this many requests.
    #[arg(long)]
    pub count: Option<usize>,
    /// `k` of each request (products to return).
    #[arg(long, default_value_t = 300)]
    pub k: usize,
    /// `beam` of each request.
    #[arg(long, default_value_t = 10)]
    pub beam: usize,
    /// Requests sent one at a time before measuring (not counted).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Client-side timeout of one request, in seconds (counted as `timeout`).
    #[arg(long, default_value_t = 60.0)]
    pub timeout_s: f64,
    /// Directory for report.json, latencies.csv and latency.svg.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Send nothing: redraw DIR/latency.svg from the DIR/report.json and DIR/latencies.csv of
    /// an earlier run.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["url", "queries", "out"])]
    pub replot: Option<PathBuf>,
}

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was (scheduled to be) sent, seconds from the start.
    pub sent_s: f64,
    /// From the (scheduled) send to the whole answer read, seconds.
    pub latency_s: f64,
    /// HTTP status, or the failure (`timeout`, `connect`, `body`, `client`).
    pub status: Status,
    /// How late the generator itself sent it: from the scheduled time to the moment its task
    /// began sending, seconds (open loop; about 0 in a closed loop, which sends at once). The open
    /// loop's latency counts from the scheduled time, so this lateness is inside it.
    pub lag_s: f64,
    /// The server's own timings of a 200: in the server (the `Server-Timing` header's `server`,
    /// which includes writing the answer, else `timings_ms.server`), queued, in the engine.
    pub server_ms: Option<f64>,
    pub queue_ms: Option<f64>,
    pub engine_ms: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Http(u16),
    Timeout,
    Connect,
    Body,
    /// The load generator itself could not open a connection: out of file descriptors (an
    /// open loop past what the server answers keeps opening them; raise `ulimit -n`).
    Client,
}

impl Status {
    fn label(self) -> String {
        match self {
            Status::Http(s) => s.to_string(),
            Status::Timeout => "timeout".into(),
            Status::Connect => "connect".into(),
            Status::Body => "body".into(),
            Status::Client => "client".into(),
        }
    }
}

/// What a failed request's error says: the client out of file descriptors (EMFILE, ENFILE:
/// its own limit, not the server refusing), else a connection failure.
fn request_failure(e: &(dyn std::error::Error + 'static)) -> Status {
    let mut at = Some(e);
    while let Some(err) = at {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if cfg!(unix) && matches!(io.raw_os_error(), Some(23 | 24)) {
                return Status::Client;
            }
        }
        at = err.source();
    }
    Status::Connect
}

/// An open loop's p99 lateness (ms) past which `gram bench` warns.
const LATE_MS: f64 = 0.5;

/// Latency summary, milliseconds. With no values (`n` 0) the report writes every other field
/// as `null`, not a latency of 0 that no request had.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(into = "PercentilesJson", from = "PercentilesJson")]
pub struct Percentiles {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values` (any order).
    pub fn of(values: &[f64]) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Percentiles {
            n: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: rank(&v, 0.5),
            p90: rank(&v, 0.9),
            p99: rank(&v, 0.99),
            p999: rank(&v, 0.999),
            max: v[v.len() - 1],
        }
    }
}

/// [`Percentiles`] as a report holds it: `null`s when there were no values.
#[derive(Serialize, Deserialize)]
struct PercentilesJson {
    n: usize,
    mean: Option<f64>,
    p50: Option<f64>,
    p90: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
    max: Option<f64>,
}

impl From<Percentiles> for PercentilesJson {
    fn from(p: Percentiles) -> Self {
        let v = |x: f64| (p.n > 0).then_some(x);
        PercentilesJson {
            n: p.n,
            mean: v(p.mean),
            p50: v(p.p50),
            p90: v(p.p90),
            p99: v(p.p99),
            p999: v(p.p999),
            max: v(p.max),
        }
    }
}

impl From<PercentilesJson> for Percentiles {
    fn from(p: PercentilesJson) -> Self {
        let v = |x: Option<f64>| x.unwrap_or(0.0);
        Percentiles {
            n: p.n,
            mean: v(p.mean),
            p50: v(p.p50),
            p90: v(p.p90),
            p99: v(p.p99),
            p999: v(p.p999),
            max: v(p.max),
        }
    }
}

/// The nearest-rank `q` quantile of sorted `v`.
pub fn rank(v: &[f64], q: f64) -> f64 {
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// What `gram bench` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub url: String,
    /// `closed` or `open`.
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Wall time from the first send to the last answer.
    pub elapsed_s: f64,
    /// The sending window the rates divide by: the open loop's requests / rate (`--duration`
    /// rounded up to whole intervals), the closed loop's `--duration`, or with `--count` its
    /// whole run (the answers still coming in after the window do not dilute the rates). Absent from older reports (they divided by
    /// `elapsed_s`).
    #[serde(default)]
    pub window_s: f64,
    pub requests: usize,
    pub ok: usize,
    /// Answered with 200 per second of the window: an open loop's requests sent in it (answered
    /// whenever), a closed loop's answered within it.
    pub qps: f64,
    /// Sent per second of the window (the open loop's `--rate`; a closed loop's requests
    /// finished within it).
    pub sent_qps: f64,
    /// Failures by status (`503`, `timeout`, ...).
    pub errors: BTreeMap<String, usize>,
    /// End to end in the client, 200s only.
    pub latency_ms: Percentiles,
    /// End to end over every admitted request: the 200s, the server's deadline answers (504)
    /// and the client's timeouts, each of the last counted at the time it was given up (a
    /// lower bound of its latency): the 200s alone leave out the slowest requests, so where
    /// this differs from `latency_ms` the run has a tail it did not see. The same set as
    /// `tools/latency_summary.py`'s "admitted". Absent from older reports (which left the 504s
    /// out).
    #[serde(default)]
    pub latency_with_timeouts_ms: Percentiles,
    /// The generator's own lateness ([`Sample::lag_s`]) over every request sent: in an open
    /// loop, what of each latency is the client's and not the server's. A p99 of more than a
    /// few tenths of a millisecond means the generator could not keep its schedule (a slow
    /// or busy client host). Absent from older reports.
    #[serde(default)]
    pub send_lag_ms: Percentiles,
    /// In the server, arrival to answer written (the `Server-Timing` header's `server`; from a
    /// server without it, `timings_ms.server`, which stops before the body is written), 200s only.
    pub server_ms: Percentiles,
    /// `timings_ms.queue`: waiting for the batch.
    pub queue_ms: Percentiles,
    /// The engine's stages (tokenize + prefill + decode + postings + scoring).
    pub engine_ms: Percentiles,
    /// What serving adds to the engine, per request: client latency minus the engine's stages
    /// (HTTP, JSON, validation, and the time queued: at concurrency 1 the handoff to the
    /// batcher, which is serving's cost; with more clients than a batch takes, mostly the wait
    /// for other requests' steps, which `queue_ms` shows apart).
    pub overhead_ms: Percentiles,
    /// The server's own part of it: `server_ms` minus the engine's stages (parsing, validation,
    /// queue handoff, answer building and writing; no client, no loopback). Absent from older
    /// reports.
    #[serde(default)]
    pub server_overhead_ms: Percentiles,
    /// The rest: client latency minus `server_ms` (the client, the loopback, connection work).
    #[serde(default)]
    pub client_ms: Percentiles,
}

/// What to send.
struct Target {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    bodies: Vec<Bytes>,
    timeout: Duration,
}

impl Target {
    /// Sends body `i % n` and reads the whole answer; latency from `since`.
    async fn send(&self, i: usize, since: Instant, start: Instant) -> Sample {
        let lag_s = since.elapsed().as_secs_f64();
        let body = self.bodies[i % self.bodies.len()].clone();
        let request = hyper::Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header("content-type", "application/json")
            .body(Full::new(body))
            .expect("a request from a parsed URI and static headers; this is a bug");
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| request_failure(&e))?;
            let status = response.status().as_u16();
            let server_timing = response
                .headers()
                .get("server-timing")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| timing_dur(v, "server"));
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|_| Status::Body)?
                .to_bytes();
            Ok::<_, Status>((status, bytes, server_timing))
        };
        // From the (scheduled) send, the latency's own clock: a late start does not extend it.
        let outcome = tokio::time::timeout_at(since + self.timeout, exchange).await;
        let latency_s = since.elapsed().as_secs_f64();
        let mut sample = Sample {
            sent_s: since.duration_since(start).as_secs_f64(),
            latency_s,
            status: Status::Timeout,
            lag_s,
            server_ms: None,
            queue_ms: None,
            engine_ms: None,
        };
        match outcome {
            Err(_) => {}
            Ok(Err(s)) => sample.status = s,
            Ok(Ok((status, bytes, server_timing))) => {
                sample.status = Status::Http(status);
                if status == 200 {
                    server_timings(&bytes, &mut sample);
                    // The header's `server` includes writing the body; the body's cannot.
                    sample.server_ms = server_timing.or(sample.server_ms);
                }
            }
        }
        sample
    }
}

/// The `dur` of metric `name` in a W3C `Server-Timing` header value
/// (`queue;dur=0.1, server;dur=1.9`).
fn timing_dur(header: &str, name: &str) -> Option<f64> {
    header.split(',').find_map(|metric| {
        let mut parts = metric.split(';').map(str::trim);
        if parts.next()? != name {
            return None;
        }
        parts.find_map(|p| {
            p.strip_prefix("dur=")?
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite())
        })
    })
}

/// Reads `timings_ms` of a search answer into `sample`.
fn server_timings(body: &[u8], sample: &mut Sample) {
    #[derive(serde::Deserialize)]
    struct Answer {
        timings_ms: BTreeMap<String, f64>,
    }
    let Ok(a) = serde_json::from_slice::<Answer>(body) else {
        return;
    };
    let t = &a.timings_ms;
    sample.server_ms = t.get("server").copied();
    sample.queue_ms = t.get("queue").copied();
    let stages = ["tokenize", "prefill", "decode", "postings", "scoring"];
    sample.engine_ms = Some(stages.iter().filter_map(|s| t.get(*s)).sum());
}

/// The endpoint URI of `url` (a bare base gets `/v1/search`) and whether it takes `k`.
fn endpoint(url: &str) -> Result<(Uri, bool), String> {
    let uri: Uri = url.parse().map_err(|e| format!("--url `{url}`: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("--url `{url}`: only http:// is supported"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("--url `{url}`: no host"))?;
    let path = match uri.path() {
        "" | "/" => "/v1/search",
        p => p,
    };
    let full: Uri = format!("http://{authority}{path}")
        .parse()
        .map_err(|e| format!("--url `{url}`: {e}"))?;
    Ok((full, !path.ends_with("/v1/codes")))
}

/// The queries of a query file.
pub fn read_queries(path: &Path) -> Result<Vec<String>, String> {
    let bytes =
        crate::container::read_input(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text =
        String::from_utf8(bytes).map_err(|e| format!("{}: not UTF-8 ({e})", path.display()))?;
    let queries: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if queries.is_empty() {
        return Err(format!("{}: no queries", path.display()));
    }
    Ok(queries)
}

/// `gram bench`: runs the load, prints the report, writes the files.
pub fn run(args: BenchArgs) -> Result<(), String> {
    let concurrency = args.concurrency.unwrap_or(1);
    if concurrency == 0 || concurrency > MAX_CONCURRENCY {
        return Err(format!(
            "--concurrency {concurrency}: expected 1..={MAX_CONCURRENCY}"
        ));
    }
    if args.k == 0 {
        return Err("--k must be at least 1".into());
    }
    crate::beam::check_width(args.beam).map_err(|e| format!("--beam: {e}"))?;
    // Bounds that keep the schedule's arithmetic finite (an absurd value is an error, not a
    // panic or a run that never ends).
    if let Some(r) = args.rate {
        if !(r > 0.0 && r <= MAX_RATE) {
            return Err(format!(
                "--rate {r}: expected a positive number of at most {MAX_RATE}"
            ));
        }
        // One interval longer than a run may be: 1 / r would overflow the schedule (a
        // subnormal rate's interval is infinite).
        if 1.0 / r > MAX_SECONDS {
            return Err(format!(
                "--rate {r}: one request every {} seconds is over {MAX_SECONDS}",
                1.0 / r
            ));
        }
        if let Some(n) = args.count {
            if n as f64 / r > MAX_SECONDS {
                return Err(format!(
                    "--count {n} at --rate {r} takes over {MAX_SECONDS} seconds"
                ));
            }
        }
    }
    let duration = match (args.duration, args.count) {
        (Some(d), _) if !(d > 0.0 && d <= MAX_SECONDS) => {
            return Err(format!(
                "--duration {d}: expected a positive number of at most {MAX_SECONDS}"
            ))
        }
        (Some(d), _) => Some(Duration::from_secs_f64(d)),
        (None, Some(0)) => return Err("--count must be at least 1".into()),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    if !(args.timeout_s > 0.0 && args.timeout_s <= MAX_SECONDS) {
        return Err(format!(
            "--timeout-s {}: expected a positive number of at most {MAX_SECONDS}",
            args.timeout_s
        ));
    }
    if let Some(dir) = &args.replot {
        return replot(dir);
    }
    let (Some(url), Some(queries)) = (&args.url, &args.queries) else {
        return Err("--url and --queries are needed".into());
    };
    let (uri, takes_k) = endpoint(url)?;
    let queries = read_queries(queries)?;
    // The output directory is checked before the load: a run of minutes is not lost to a
    // directory it cannot write in.
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for name in OUT_FILES {
            crate::container::check_writable(&dir.join(name)).map_err(|e| e.to_string())?;
        }
    }
    let bodies = queries
        .iter()
        .map(|q| {
            let body = if takes_k {
                serde_json::json!({"query": q, "k": args.k, "beam": args.beam})
            } else {
                serde_json::json!({"query": q, "beam": args.beam})
            };
            Bytes::from(body.to_string())
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let report = runtime.block_on(async {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // An idle connection is dropped before the server's keep-alive ends (`gram serve`
        // closes one idle for `--header-timeout-ms`, 5 s): a request sent on a connection just
        // as the server closes it fails, and an open loop, which opens connections in bursts
        // and leaves most idle afterwards, hit that race (7 `connect` failures in one 15 s run
        // at 734/s, all on connections idle ~5 s).
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(usize::MAX)
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        let target = Arc::new(Target {
            client,
            uri,
            bodies,
            timeout: Duration::from_secs_f64(args.timeout_s),
        });
        for i in 0..args.warmup {
            let now = Instant::now();
            target.send(i, now, now).await;
        }
        let (samples, elapsed) = match args.rate {
            Some(rate) => open_loop(&target, rate, duration, args.count).await,
            None => closed_loop(&target, concurrency, duration, args.count).await,
        };
        // The sending window: an open loop sends request i at i / rate, so n requests span
        // n / rate (a duration shorter than 1 / rate still sends one); a closed loop its
        // duration, or with a count its whole run.
        let window = match (duration, args.rate) {
            (_, Some(rate)) => samples.len().max(1) as f64 / rate,
            (Some(d), None) => d.as_secs_f64(),
            (None, None) => elapsed,
        };
        report(&args, concurrency, &samples, elapsed, window)
    });
    let (report, samples) = report;
    let answered = report.ok;
    // An open loop's latencies count from the schedule: the generator's own lateness is in
    // them. Worth a word when it is more than a few tenths of a millisecond.
    if report.mode == "open" && report.send_lag_ms.p99 > LATE_MS {
        crate::note!(
            "warning: the load generator sent late (p99 {:.2} ms, max {:.2} ms behind its \
             schedule): the open-loop latencies include that much of the client's own time",
            report.send_lag_ms.p99,
            report.send_lag_ms.max
        );
    }
    let text = serde_json::to_string_pretty(&report).expect("a report serializes; this is a bug");
    // The files first: a closed standard output (a pipe whose reader left) loses only the
    // printed copy. A file that fails to write (the disk filled during the run) still leaves
    // the report printed, then the error.
    let mut written = Ok(());
    if let Some(dir) = &args.out {
        let [report_json, latencies_csv, latency_svg] = OUT_FILES;
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            crate::container::write_atomic(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))
        };
        written = write(report_json, text.as_bytes())
            .and_then(|_| write(latencies_csv, csv(&samples).as_bytes()))
            .and_then(|_| write(latency_svg, plot::svg(&report, &samples).as_bytes()));
        if written.is_ok() {
            crate::note!(
                "wrote {0}/report.json, {0}/latencies.csv, {0}/latency.svg",
                dir.display()
            );
        }
    }
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|_| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(format!("writing the report to standard output: {e}"))
        }
        _ => {}
    }
    written?;
    // A run in which nothing was answered measured nothing: say so in the exit status too.
    if answered == 0 {
        return Err(format!(
            "no request was answered with 200 ({} sent; the report's `errors` says how each failed)",
            samples.len()
        ));
    }
    Ok(())
}

/// `concurrency` clients in a loop until the duration ends or `count` requests are sent.
async fn closed_loop(
    target: &Arc<Target>,
    concurrency: usize,
    duration: Option<Duration>,
    count: Option<usize>,
) -> (Vec<Sample>, f64) {
    let start = Instant::now();
    let end = duration.map(|d| start + d);
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (target, next) = (target.clone(), next.clone());
        clients.spawn(async move {
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                if count.is_some_and(|n| i >= n) || end.is_some_and(|e| now >= e) {
                    return samples;
                }
                let sample = target.send(i, now, start).await;
                // Out of descriptors (`client`) spins the same way until one frees.
                let unreachable = matches!(sample.status, Status::Connect | Status::Client);
                samples.push(sample);
                // A server that is gone (stopped mid-run, a wrong port) refuses each connect
                // at once: without a pause every client spun, ~90,000 attempts a second that
                // filled the report and a core. Counted as before, one a client per pause.
                if unreachable {
                    tokio::time::sleep(CONNECT_BACKOFF).await;
                }
            }
        });
    }
    let mut samples = Vec::new();
    while let Some(r) = clients.join_next().await {
        samples.extend(r.expect("a client task does not panic; this is a bug"));
    }
    samples.sort_by(|a, b| a.sent_s.total_cmp(&b.sent_s));
    (samples, start.elapsed().as_secs_f64())
}

/// Requests at `rate` per second on a fixed schedule, latency from the scheduled time.
async fn open_loop(
    target: &Arc<Target>,
    rate: f64,
    duration: Option<Duration>,
    count: Option<usize>,
) -> (Vec<Sample>, f64) {
    let start = Instant::now();
    // The schedule keeps a thread of its own (tokio's blocking pool) and sleeps there: tokio's
    // timer rounds every deadline up to its next whole millisecond, and the latency counts
    // from the scheduled time, so each open-loop sample carried 0–1 ms of the generator's own
    // lateness (client-side p50 1.0–1.5 ms against 0.24 ms in a closed loop, found in review).
    // A thread's sleep is precise to tens of microseconds; the requests still run on the
    // runtime's workers.
    let runtime = tokio::runtime::Handle::current();
    let target = target.clone();
    let spawned = tokio::task::spawn_blocking(move || {
        let mut spawned = Vec::new();
        for i in 0.. {
            // Compared as seconds before any `Duration` is made: at a tiny rate the second
            // request's offset is past what an `Instant` can hold.
            let offset = i as f64 / rate;
            if count.is_some_and(|n| i >= n) || duration.is_some_and(|d| offset >= d.as_secs_f64())
            {
                break;
            }
            let at = start + Duration::from_secs_f64(offset);
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            let target = target.clone();
            spawned.push(runtime.spawn(async move { target.send(i, at, start).await }));
        }
        spawned
    })
    .await
    .expect("the schedule does not panic; this is a bug");
    let mut samples = Vec::with_capacity(spawned.len());
    for task in spawned {
        samples.push(
            task.await
                .expect("a request task does not panic; this is a bug"),
        );
    }
    samples.sort_by(|a, b| a.sent_s.total_cmp(&b.sent_s));
    (samples, start.elapsed().as_secs_f64())
}

fn report(
    args: &BenchArgs,
    concurrency: usize,
    samples: &[Sample],
    elapsed_s: f64,
    window_s: f64,
) -> (Report, Vec<Sample>) {
    let ok: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.status == Status::Http(200))
        .collect();
    // What the rates count: an open loop's requests sent in the window (its offered load,
    // answered whenever); a closed loop's requests answered within it (its clients send until
    // the window ends, and the last of each were answered after it: counting those by their
    // sending overstated a short run's rate by up to the concurrency over the window).
    let in_window = |s: &Sample| args.rate.is_some() || s.sent_s + s.latency_s <= window_s;
    let rate = |n: usize| n as f64 / window_s;
    let mut errors = BTreeMap::new();
    for s in samples.iter().filter(|s| s.status != Status::Http(200)) {
        *errors.entry(s.status.label()).or_insert(0) += 1;
    }
    let ms = |f: &dyn Fn(&Sample) -> Option<f64>| -> Percentiles {
        Percentiles::of(&ok.iter().filter_map(|s| f(s)).collect::<Vec<_>>())
    };
    let report = Report {
        url: args.url.clone().unwrap_or_default(),
        mode: if args.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        concurrency: args.rate.is_none().then_some(concurrency),
        rate: args.rate,
        elapsed_s,
        window_s,
        requests: samples.len(),
        ok: ok.len(),
        qps: rate(ok.iter().filter(|s| in_window(s)).count()),
        sent_qps: rate(samples.iter().filter(|s| in_window(s)).count()),
        errors,
        latency_ms: ms(&|s| Some(s.latency_s * 1e3)),
        latency_with_timeouts_ms: Percentiles::of(
            &samples
                .iter()
                .filter(|s| {
                    matches!(
                        s.status,
                        Status::Http(200) | Status::Http(504) | Status::Timeout
                    )
                })
                .map(|s| s.latency_s * 1e3)
                .collect::<Vec<_>>(),
        ),
        send_lag_ms: Percentiles::of(&samples.iter().map(|s| s.lag_s * 1e3).collect::<Vec<_>>()),
        server_ms: ms(&|s| s.server_ms),
        queue_ms: ms(&|s| s.queue_ms),
        engine_ms: ms(&|s| s.engine_ms),
        overhead_ms: ms(&|s| s.engine_ms.map(|e| s.latency_s * 1e3 - e)),
        server_overhead_ms: ms(&|s| Some(s.server_ms? - s.engine_ms?)),
        client_ms: ms(&|s| s.server_ms.map(|v| s.latency_s * 1e3 - v)),
    };
    (report, samples.to_vec())
}

/// Redraws `dir/latency.svg` from the run's report and raw latencies.
fn replot(dir: &Path) -> Result<(), String> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))
    };
    let report: Report = serde_json::from_str(&read("report.json")?)
        .map_err(|e| format!("{}/report.json: {e}", dir.display()))?;
    let samples = read("latencies.csv")?
        .lines()
        .skip(1)
        .map(parse_csv_line)
        .collect::<Option<Vec<Sample>>>()
        .ok_or_else(|| format!("{}/latencies.csv: malformed", dir.display()))?;
    let p = dir.join("latency.svg");
    crate::container::write_atomic(&p, plot::svg(&report, &samples).as_bytes())
        .map_err(|e| format!("{}: {e}", p.display()))?;
    crate::note!("wrote {}", p.display());
    Ok(())
}

/// One line of `latencies.csv` (see [`csv`]).
fn parse_csv_line(line: &str) -> Option<Sample> {
    let f: Vec<&str> = line.split(',').collect();
    // Finite numbers only: the plot's axes are built from them ("inf" parses as an f64).
    let num = |s: &str| s.parse::<f64>().ok().filter(|x| x.is_finite());
    let opt = |s: &str| {
        if s.is_empty() {
            Some(None)
        } else {
            num(s).map(Some)
        }
    };
    let status = match *f.get(2)? {
        "timeout" => Status::Timeout,
        "connect" => Status::Connect,
        "body" => Status::Body,
        "client" => Status::Client,
        s => Status::Http(s.parse().ok()?),
    };
    Some(Sample {
        sent_s: num(f.first()?)?,
        latency_s: num(f.get(1)?)? / 1e3,
        status,
        server_ms: opt(f.get(3)?)?,
        queue_ms: opt(f.get(4)?)?,
        engine_ms: opt(f.get(5)?)?,
        // Files written before the column: no lateness measured.
        lag_s: match f.get(6) {
            None => 0.0,
            Some(s) => num(s)? / 1e3,
        },
    })
}

/// The raw samples, one line each.
fn csv(samples: &[Sample]) -> String {
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_default();
    let mut out = String::from("sent_s,latency_ms,status,server_ms,queue_ms,engine_ms,lag_ms\n");
    for s in samples {
        out.push_str(&format!(
            "{:.6},{:.4},{},{},{},{},{:.4}\n",
            s.sent_s,
            s.latency_s * 1e3,
            s.status.label(),
            opt(s.server_ms),
            opt(s.queue_ms),
            opt(s.engine_ms),
            s.lag_s * 1e3
        ));
    }
    out
}

#[cfg(test)]
mod tests;
