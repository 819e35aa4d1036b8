//! Every metric the server exports, declared once: names, help, labels and buckets live here,
//! and the rest of the server records through the typed helpers below. `GET /metrics` renders
//! them in the Prometheus text exposition format (version 0.0.4), written by hand.
//!
//! Latencies are in seconds with geometric buckets (100 µs × 2^i, up to ~13 s); sizes (requests
//! and decoder rows per step) have power-of-two buckets.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// What the server counts and times a request under (the route, not the raw path: low
/// cardinality).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Endpoint {
    Search,
    SearchGet,
    Codes,
    Health,
    Ready,
    Metrics,
    Other,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Search => "/v1/search",
            Endpoint::SearchGet => "/search",
            Endpoint::Codes => "/v1/codes",
            Endpoint::Health => "/health",
            Endpoint::Ready => "/ready",
            Endpoint::Metrics => "/metrics",
            Endpoint::Other => "other",
        }
    }

    /// The endpoint of a matched route path.
    pub fn of_route(path: Option<&str>) -> Endpoint {
        match path {
            Some("/v1/search") => Endpoint::Search,
            Some("/search") => Endpoint::SearchGet,
            Some("/v1/codes") => Endpoint::Codes,
            Some("/health") => Endpoint::Health,
            Some("/ready") => Endpoint::Ready,
            Some("/metrics") => Endpoint::Metrics,
            _ => Endpoint::Other,
        }
    }
}

/// The stages of a search that get a latency histogram (`gram_stage_seconds{stage}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting in the queue until admitted to the batch.
    Queue,
    Tokenize,
    Prefill,
    Decode,
    Postings,
    Scoring,
}

impl Stage {
    const ALL: [Stage; 6] = [
        Stage::Queue,
        Stage::Tokenize,
        Stage::Prefill,
        Stage::Decode,
        Stage::Postings,
        Stage::Scoring,
    ];

    fn label(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Tokenize => "tokenize",
            Stage::Prefill => "prefill",
            Stage::Decode => "decode",
            Stage::Postings => "postings",
            Stage::Scoring => "scoring",
        }
    }
}

/// Latency buckets, seconds: 100 µs × 2^i for i in 0..18 (up to ~13.1 s).
fn latency_buckets() -> Vec<f64> {
    (0..18).map(|i| 1e-4 * f64::from(1u32 << i)).collect()
}

/// Size buckets: 1, 2, 4, ... 2^max_pow.
fn size_buckets(max_pow: u32) -> Vec<f64> {
    (0..=max_pow).map(|i| f64::from(1u32 << i)).collect()
}

/// A Prometheus histogram: fixed upper bounds, per-bucket counts (made cumulative when
/// rendered), sum and count. Lock-free.
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    /// f64 bits of the sum.
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: Vec<f64>) -> Histogram {
        Histogram {
            counts: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            bounds,
            sum: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if !v.is_finite() {
            return;
        }
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        let mut old = self.sum.load(Ordering::Relaxed);
        loop {
            let new = (f64::from_bits(old) + v).to_bits();
            match self
                .sum
                .compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(o) => old = o,
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Appends the `_bucket` / `_sum` / `_count` series with `labels` (`k="v",...` or empty).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        // Read count after the buckets: a racing observation can only make +Inf larger.
        let count = self.count.load(Ordering::Relaxed).max(cumulative);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// An open connection, counted in `gram_connections_open` until dropped.
pub struct OpenConnection(std::sync::Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request in `gram_http_requests_in_flight` until dropped.
pub struct InFlightRequest<'a>(&'a Metrics);

impl Drop for InFlightRequest<'_> {
    fn drop(&mut self) {
        self.0.http_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every metric of the server.
pub struct Metrics {
    /// `gram_requests_total{endpoint,status}`.
    requests: Mutex<BTreeMap<(Endpoint, u16), u64>>,
    /// `gram_request_failures_total{kind}`: error responses by error kind.
    failures: Mutex<BTreeMap<&'static str, u64>>,
    /// `gram_request_duration_seconds{endpoint}`: end to end, in the server.
    duration: Mutex<BTreeMap<Endpoint, Histogram>>,
    /// `gram_stage_seconds{stage}`, indexed as `Stage::ALL`.
    stages: Vec<Histogram>,
    /// `gram_step_seconds`: one batched decoder step.
    step_seconds: Histogram,
    /// `gram_step_requests`: requests in flight in a step.
    step_requests: Histogram,
    /// `gram_step_rows`: decoder rows (tokens) in a step, prefill tokens plus one per running
    /// beam.
    step_rows: Histogram,
    /// `gram_step_queue_depth`: requests waiting to be admitted, at each step.
    step_queue_depth: Histogram,
    /// `gram_queue_depth`: requests waiting to be admitted.
    queue_depth: AtomicU64,
    /// `gram_http_errors_total`: requests hyper refused itself (malformed request line or
    /// headers, a URI or headers over its limits: 400 / 414 / 431 with an empty body).
    http_errors: AtomicU64,
    /// `gram_connections_timed_out_total`: connections closed by the header (and idle) timeout.
    timed_out: AtomicU64,
    /// `gram_in_flight`: requests admitted to the batch and not finished.
    in_flight: AtomicU64,
    /// `gram_scoring_backlog`: requests whose codes are done, waiting for a scoring thread.
    scoring_backlog: AtomicU64,
    /// `gram_kv_arena_entries`: the batch arena's size.
    arena_entries: AtomicU64,
    /// `gram_connections_open`: HTTP connections accepted and not closed.
    connections_open: AtomicU64,
    /// `gram_http_requests_in_flight`: requests whose headers are read and whose handler has
    /// not finished (or been dropped), any endpoint, the scrape that reads it included.
    http_in_flight: AtomicU64,
    /// `gram_connections_max`: `--max-connections`; at it, new clients wait in the backlog.
    connections_max: AtomicU64,
    /// `gram_backend_info{backend,device}`: the backend the model runs on, once chosen.
    backend: Mutex<Option<(String, String)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            failures: Mutex::default(),
            duration: Mutex::default(),
            stages: Stage::ALL
                .iter()
                .map(|_| Histogram::new(latency_buckets()))
                .collect(),
            step_seconds: Histogram::new(latency_buckets()),
            step_requests: Histogram::new(size_buckets(10)),
            step_rows: Histogram::new(size_buckets(14)),
            step_queue_depth: Histogram::new(size_buckets(10)),
            queue_depth: AtomicU64::new(0),
            http_errors: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            scoring_backlog: AtomicU64::new(0),
            arena_entries: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            http_in_flight: AtomicU64::new(0),
            connections_max: AtomicU64::new(0),
            backend: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a metrics lock leaves plain counters: still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// One answered request: its status and end-to-end time in the server.
    pub fn record_request(&self, endpoint: Endpoint, status: u16, seconds: f64) {
        *lock(&self.requests).entry((endpoint, status)).or_default() += 1;
        lock(&self.duration)
            .entry(endpoint)
            .or_insert_with(|| Histogram::new(latency_buckets()))
            .observe(seconds);
    }

    /// One error response, by its stable kind (`api::ApiError::kind`).
    pub fn record_failure(&self, kind: &'static str) {
        *lock(&self.failures).entry(kind).or_default() += 1;
    }

    pub fn record_stage(&self, stage: Stage, seconds: f64) {
        let i = Stage::ALL
            .iter()
            .position(|&s| s == stage)
            .expect("every stage is in Stage::ALL");
        self.stages[i].observe(seconds);
    }

    /// One batched decoder step (and the queue's depth at it).
    /// `rows`: `None` for a step that failed (its rows are not known; it is no step of 0 rows).
    pub fn record_step(&self, seconds: f64, requests: usize, rows: Option<usize>) {
        self.step_seconds.observe(seconds);
        self.step_requests.observe(requests as f64);
        if let Some(rows) = rows {
            self.step_rows.observe(rows as f64);
        }
        self.step_queue_depth
            .observe(self.queue_depth.load(Ordering::Relaxed) as f64);
    }

    /// One request hyper answered or dropped itself as malformed (no handler saw it).
    pub fn record_http_error(&self) {
        self.http_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// One connection closed because no request line and headers came in time.
    pub fn record_timed_out_connection(&self) {
        self.timed_out.fetch_add(1, Ordering::Relaxed);
    }

    /// One more open connection, until the guard is dropped.
    pub fn connection_opened(self: &std::sync::Arc<Self>) -> OpenConnection {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }

    /// A request's handler starts (its headers are read): counted in
    /// `gram_http_requests_in_flight` until the returned guard drops.
    pub fn http_request_started(&self) -> InFlightRequest<'_> {
        self.http_in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightRequest(self)
    }

    pub fn set_connections_max(&self, n: usize) {
        self.connections_max.store(n as u64, Ordering::Relaxed);
    }

    pub fn set_queue_depth(&self, n: usize) {
        self.queue_depth.store(n as u64, Ordering::Relaxed);
    }

    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n as u64, Ordering::Relaxed);
    }

    /// A request whose codes are done was handed to the scoring threads (`+1`) or taken by
    /// one (`-1`).
    pub fn scoring_backlog_add(&self, up: bool) {
        if up {
            self.scoring_backlog.fetch_add(1, Ordering::Relaxed);
        } else {
            self.scoring_backlog.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn set_arena_entries(&self, n: usize) {
        self.arena_entries.store(n as u64, Ordering::Relaxed);
    }

    /// The backend the engine opened on.
    pub fn set_backend(&self, info: &crate::search::BackendInfo) {
        let device = info.device.clone().unwrap_or_default();
        *lock(&self.backend) = Some((info.backend.to_string(), device));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut out,
            "gram_requests_total",
            "counter",
            "HTTP requests answered, by endpoint and status.",
        );
        for ((e, s), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "gram_requests_total{{endpoint=\"{}\",status=\"{s}\"}} {n}",
                e.label()
            );
        }
        head(
            &mut out,
            "gram_request_failures_total",
            "counter",
            "Error responses, by error kind.",
        );
        for (k, n) in lock(&self.failures).iter() {
            let _ = writeln!(out, "gram_request_failures_total{{kind=\"{k}\"}} {n}");
        }
        head(
            &mut out,
            "gram_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to its response, in the server, by endpoint.",
        );
        for (e, h) in lock(&self.duration).iter() {
            let labels = format!("endpoint=\"{}\"", e.label());
            h.render(&mut out, "gram_request_duration_seconds", &labels);
        }
        head(
            &mut out,
            "gram_stage_seconds",
            "histogram",
            "Time of each stage of a search (prefill and decode: the shared steps it took part in).",
        );
        for (s, h) in Stage::ALL.iter().zip(&self.stages) {
            let labels = format!("stage=\"{}\"", s.label());
            h.render(&mut out, "gram_stage_seconds", &labels);
        }
        let plain: [(&str, &str, &Histogram); 4] = [
            (
                "gram_step_seconds",
                "Wall time of one batched decoder step.",
                &self.step_seconds,
            ),
            (
                "gram_step_requests",
                "Requests in flight in one decoder step (batch size).",
                &self.step_requests,
            ),
            (
                "gram_step_rows",
                "Decoder rows (tokens) in one step: prompt tokens of new requests plus one per \
                 running beam of the others.",
                &self.step_rows,
            ),
            (
                "gram_step_queue_depth",
                "Requests waiting to be admitted to the batch, sampled at each decoder step.",
                &self.step_queue_depth,
            ),
        ];
        for (name, help, h) in plain {
            head(&mut out, name, "histogram", help);
            h.render(&mut out, name, "");
        }
        let gauges = [
            (
                "gram_queue_depth",
                "Requests waiting to be admitted to the batch.",
                &self.queue_depth,
            ),
            (
                "gram_in_flight",
                "Requests admitted to the batch and not finished.",
                &self.in_flight,
            ),
            (
                "gram_scoring_backlog",
                "Requests whose codes are done, waiting for a scoring thread (at most \
                 --max-batch, plus one being handed over: past it the batcher waits).",
                &self.scoring_backlog,
            ),
            (
                "gram_kv_arena_entries",
                "KV entries of the batch's arena.",
                &self.arena_entries,
            ),
            (
                "gram_connections_open",
                "HTTP connections accepted and not yet closed.",
                &self.connections_open,
            ),
            (
                "gram_connections_max",
                "--max-connections: at it, new clients wait in the listen backlog.",
                &self.connections_max,
            ),
            (
                "gram_http_requests_in_flight",
                "Requests whose headers are read and whose handler has not finished, this scrape included.",
                &self.http_in_flight,
            ),
        ];
        for (name, help, g) in gauges {
            head(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {}", g.load(Ordering::Relaxed));
        }
        head(
            &mut out,
            "gram_http_errors_total",
            "counter",
            "Requests refused by the HTTP layer before any handler (malformed request line or \
             headers, URI or headers too long): 400, 414 or 431 with an empty body.",
        );
        let _ = writeln!(
            out,
            "gram_http_errors_total {}",
            self.http_errors.load(Ordering::Relaxed)
        );
        head(
            &mut out,
            "gram_connections_timed_out_total",
            "counter",
            "Connections closed because a request line and headers did not arrive within \
             --header-timeout-ms: a client stalled in its headers, or a kept-alive connection \
             left idle.",
        );
        let _ = writeln!(
            out,
            "gram_connections_timed_out_total {}",
            self.timed_out.load(Ordering::Relaxed)
        );
        head(
            &mut out,
            "gram_backend_info",
            "gauge",
            "The backend the model runs on (cpu or cuda) and the GPU's name: 1 once chosen.",
        );
        if let Some((backend, device)) = &*lock(&self.backend) {
            // The text format's label escapes: backslash, double quote, line feed.
            let device = device
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = writeln!(
                out,
                "gram_backend_info{{backend=\"{backend}\",device=\"{device}\"}} 1"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU's name goes into a label value with the text format's three escapes, so the
    /// line stays one line of valid exposition whatever the driver reports.
    #[test]
    fn the_device_label_is_escaped() {
        let m = Metrics::default();
        m.set_backend(&crate::search::BackendInfo {
            backend: "cuda",
            device: Some("H\\1 \"x\"\nnext".into()),
            fallback: None,
        });
        let text = m.render();
        let want = "gram_backend_info{backend=\"cuda\",device=\"H\\\\1 \\\"x\\\"\\nnext\"} 1\n";
        assert!(text.contains(want), "{text}");
    }

    #[test]
    fn histogram_is_cumulative_with_sum_and_count() {
        let m = Metrics::default();
        m.record_step(0.01, 3, Some(40));
        m.record_step(0.5, 1, Some(1));
        m.record_step(0.2, 2, None);
        m.record_request(Endpoint::Search, 200, 0.002);
        let text = m.render();
        assert!(
            text.contains("gram_step_requests_bucket{le=\"1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("gram_step_requests_bucket{le=\"4\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("gram_step_requests_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("gram_step_requests_sum 6\n"));
        // The failed step (rows unknown) is no observation of 0 rows.
        assert!(text.contains("gram_step_rows_count 2\n"), "{text}");
        assert!(text.contains("gram_step_rows_sum 41\n"), "{text}");
        assert!(text.contains("gram_requests_total{endpoint=\"/v1/search\",status=\"200\"} 1\n"));
    }
}
