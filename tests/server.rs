//! `gram serve` end to end: the real server on a loopback port (port 0) over a tiny-llama index,
//! driven over HTTP: every endpoint, the error matrix, batching (concurrent answers equal the
//! in-process engine's), the full queue (503 + Retry-After), the deadline (504), graceful
//! shutdown, and the metrics as Prometheus text exposition. No timing thresholds: where a test
//! needs requests to meet in the queue it holds them there with a long gathering window, which
//! ends as soon as the batch is full.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;

use clap::Parser;
use common::*;
use gram::search::{Engine, Request};
use gram::server::{ServeArgs, Server};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::HeaderMap;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// A small index over tiny-llama (catalog codes), built once with the CLI.
fn index() -> &'static PathBuf {
    static INDEX: OnceLock<PathBuf> = OnceLock::new();
    INDEX.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        // Indexes left by earlier runs whose process is gone.
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("gram-server-") {
                let proc = std::path::Path::new("/proc");
                if proc.join("self").exists() && !proc.join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let tmp = root.join(format!("gram-server-{}", std::process::id()));
        let mut lines = Vec::new();
        let kinds = ["sofa", "chair", "lamp", "rug", "desk"];
        let materials = ["velvet", "oak", "wool"];
        for (i, k) in kinds.iter().enumerate() {
            for (j, m) in materials.iter().enumerate() {
                let codes = [k.to_string(), format!("{k} | {m}")];
                lines.push(
                    json!({"id": format!("p{i}-{j}"), "title": format!("{m} {k}"), "codes": codes})
                        .to_string(),
                );
            }
        }
        build_index(&tmp, "tiny-llama", &lines)
    })
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

/// The config of a server on a free loopback port, one thread, on `device`, with `flags` added.
fn config_on(device: &str, flags: &[&str]) -> gram::server::ServeConfig {
    let ix = index().to_str().unwrap().to_string();
    let mut argv = vec![
        "serve",
        "--index",
        &ix,
        "--addr",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--device",
        device,
    ];
    argv.extend_from_slice(flags);
    Cli::parse_from(argv).serve.config().unwrap()
}

/// Starts a server with `flags` added to the defaults (on the CPU: the answers are compared
/// with the in-process CPU engine's).
async fn start(flags: &[&str]) -> Server {
    Server::start(config_on("cpu", flags)).await.unwrap()
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on a connection of its own.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> Answer {
    let headers: Vec<(&str, &str)> = content_type
        .map(|ct| ("content-type", ct))
        .into_iter()
        .collect();
    call_with(addr, method, path, &headers, body).await
}

/// A request with these headers (besides `host`).
async fn call_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = send
        .send_request(req.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> Answer {
    call(
        addr,
        "POST",
        path,
        Some("application/json"),
        body.to_string(),
    )
    .await
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    call(addr, "GET", path, None, Bytes::new()).await
}

/// Asserts `a` is an error of `status` and `kind` in the documented JSON shape, and returns its
/// message.
fn error_of(a: &Answer, status: u16, kind: &str, case: &str) -> String {
    assert_eq!(a.status, status, "{case}: {}", a.text());
    let v = a.json();
    assert_eq!(v["error"]["kind"], kind, "{case}: {v}");
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{case}: {v}"));
    assert!(!msg.is_empty(), "{case}");
    // The kind says what the error is; the message does not say it again (the engine's
    // refusals read as the server's own: `k: 10001 is out of range`).
    assert!(!msg.starts_with("invalid input"), "{case}: {msg}");
    assert_eq!(
        v.as_object().unwrap().len(),
        1,
        "{case}: only `error` in {v}"
    );
    msg.to_string()
}

fn codes(v: &Value) -> Vec<String> {
    v["codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["code"].as_str().unwrap().to_string())
        .collect()
}

fn ids(v: &Value) -> Vec<String> {
    v["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

/// Checks `text` is Prometheus text exposition (0.0.4): every sample line `name{labels} value`
/// of a metric declared by a `# TYPE` line, every histogram's buckets cumulative up to a
/// `+Inf` bucket equal to its `_count`, with a `_sum`. Returns each series' value by its full
/// name with labels.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut series = HashMap::new();
    // histogram name + labels without `le` → its buckets, in order.
    let mut buckets: HashMap<(String, String), Vec<(f64, f64)>> = HashMap::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let parts: Vec<&str> = rest.splitn(3, ' ').collect();
            assert!(parts.len() == 3, "comment line: {line}");
            assert!(parts[0] == "HELP" || parts[0] == "TYPE", "{line}");
            assert!(valid_name(parts[1]), "{line}");
            if parts[0] == "TYPE" {
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&parts[2]),
                    "{line}"
                );
                types.insert(parts[1].to_string(), parts[2].to_string());
            }
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value of {line}")),
        };
        let (name, labels) = match key.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').unwrap_or_else(|| panic!("{line}"))),
            None => (key, ""),
        };
        assert!(valid_name(name), "{line}");
        let mut pairs = Vec::new();
        if !labels.is_empty() {
            for pair in labels.split(',') {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
                assert!(valid_name(k), "{line}");
                assert!(
                    v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                    "{line}"
                );
                pairs.push((k.to_string(), v[1..v.len() - 1].to_string()));
            }
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| types.get(*b).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(base), "no # TYPE for {line}");
        if name.ends_with("_bucket") && base != name {
            let le = pairs
                .iter()
                .find(|(k, _)| k == "le")
                .unwrap_or_else(|| panic!("bucket without le: {line}"));
            let le: f64 = if le.1 == "+Inf" {
                f64::INFINITY
            } else {
                le.1.parse().unwrap()
            };
            let rest: Vec<String> = pairs
                .iter()
                .filter(|(k, _)| k != "le")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            buckets
                .entry((base.to_string(), rest.join(",")))
                .or_default()
                .push((le, value));
        }
        assert!(
            series.insert(key.to_string(), value).is_none(),
            "duplicate {line}"
        );
    }
    for ((base, labels), list) in &buckets {
        for w in list.windows(2) {
            assert!(w[0].0 < w[1].0, "{base}{{{labels}}}: le out of order");
            assert!(
                w[0].1 <= w[1].1,
                "{base}{{{labels}}}: buckets not cumulative"
            );
        }
        let last = list.last().unwrap();
        assert!(last.0.is_infinite(), "{base}{{{labels}}}: no +Inf bucket");
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                let quoted: Vec<String> = s
                    .split(',')
                    .map(|p| {
                        let (k, v) = p.split_once('=').unwrap();
                        format!("{k}=\"{v}\"")
                    })
                    .collect();
                format!("{{{}}}", quoted.join(","))
            }
        };
        let count = series[&format!("{base}_count{}", braces(labels))];
        assert_eq!(count, last.1, "{base}{{{labels}}}: +Inf bucket != _count");
        assert!(series.contains_key(&format!("{base}_sum{}", braces(labels))));
    }
    series
}

async fn metrics(addr: SocketAddr) -> HashMap<String, f64> {
    let a = get(addr, "/metrics").await;
    assert_eq!(a.status, 200);
    let ct = a.headers["content-type"].to_str().unwrap();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    parse_prometheus(&a.text())
}

/// Reads metric `name` until it is `want` (at most ~5 s), and returns its last value.
async fn metric_reaches(addr: SocketAddr, name: &str, want: f64) -> f64 {
    let mut got = f64::NAN;
    for _ in 0..250 {
        got = metrics(addr).await[name];
        if got == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers() {
    let server = start(&[]).await;
    let addr = server.addr();
    assert_eq!(
        get(addr, "/health").await.json(),
        json!({"status": "ok", "backend": {"backend": "cpu"}})
    );
    assert_eq!(get(addr, "/ready").await.json(), json!({"status": "ready"}));

    let a = post(
        addr,
        "/v1/search",
        json!({"query": "velvet sofa", "k": 3, "beam": 4}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.headers["content-type"], "application/json");
    let s = a.json();
    assert_eq!(s["query"], "velvet sofa");
    let n_codes = s["codes"].as_array().unwrap().len();
    assert!((1..=4).contains(&n_codes), "{s}");
    for c in s["codes"].as_array().unwrap() {
        assert!(c["score"].as_f64().unwrap() <= 0.0);
        assert!(!c["token_logprobs"].as_array().unwrap().is_empty());
    }
    let products = s["products"].as_array().unwrap();
    assert!(!products.is_empty() && products.len() <= 3, "{s}");
    for p in products {
        assert!(p["id"].is_string() && p["title"].is_string() && p["score"].is_number());
        assert!(!p["codes"].as_array().unwrap().is_empty());
    }
    for t in [
        "tokenize", "prefill", "decode", "postings", "scoring", "queue", "server",
    ] {
        assert!(s["timings_ms"][t].as_f64().unwrap() >= 0.0, "{t}: {s}");
    }
    assert!(s["steps"].as_u64().unwrap() >= 1);
    // Server-Timing: the same queue and engine times as the body, and `server` at least the
    // body's (it also covers writing the body).
    let timing = a.headers["server-timing"].to_str().unwrap().to_string();
    let dur = |name: &str| -> f64 {
        let m = timing
            .split(", ")
            .find_map(|m| m.strip_prefix(&format!("{name};dur=")))
            .unwrap_or_else(|| panic!("no {name} in server-timing: {timing}"));
        m.parse().unwrap()
    };
    let t = &s["timings_ms"];
    let engine: f64 = ["tokenize", "prefill", "decode", "postings", "scoring"]
        .iter()
        .map(|k| t[*k].as_f64().unwrap())
        .sum();
    assert!((dur("engine") - engine).abs() < 2e-3, "{timing}: {t}");
    assert!(
        (dur("queue") - t["queue"].as_f64().unwrap()).abs() < 2e-3,
        "{timing}: {t}"
    );
    assert!(
        dur("server") >= t["server"].as_f64().unwrap() - 1e-3,
        "{timing}: {t}"
    );

    // GET /search: the same search from a query string.
    let g = get(addr, "/search?q=velvet+sofa&k=3&beam=4").await;
    assert_eq!(g.status, 200, "{}", g.text());
    let g = g.json();
    assert_eq!((codes(&g), ids(&g)), (codes(&s), ids(&s)));
    // Defaults: k 300, beam 10 (the same answer as asked for explicitly, at the end: the
    // counts below are of these requests).
    let d = get(addr, "/search?q=oak%20desk").await.json();
    assert!(d["codes"].as_array().unwrap().len() <= 10 && !ids(&d).is_empty());

    // POST /v1/codes: the same codes, no products.
    let c = post(
        addr,
        "/v1/codes",
        json!({"query": "velvet sofa", "beam": 4}),
    )
    .await;
    assert_eq!(c.status, 200, "{}", c.text());
    let c = c.json();
    assert_eq!(codes(&c), codes(&s));
    assert!(c.get("products").is_none(), "{c}");

    let m = metrics(addr).await;
    let count = |k: &str| m.get(k).copied().unwrap_or(0.0);
    assert_eq!(
        count(r#"gram_requests_total{endpoint="/v1/search",status="200"}"#),
        1.0
    );
    assert_eq!(
        count(r#"gram_requests_total{endpoint="/search",status="200"}"#),
        2.0
    );
    assert_eq!(
        count(r#"gram_requests_total{endpoint="/v1/codes",status="200"}"#),
        1.0
    );
    assert_eq!(
        count(r#"gram_requests_total{endpoint="/ready",status="200"}"#),
        1.0
    );
    assert_eq!(
        count(r#"gram_request_duration_seconds_count{endpoint="/v1/search"}"#),
        1.0
    );
    // Four requests, one of them codes only (`/v1/codes`: no postings, no scoring, and no
    // zeros in their histograms).
    for (stage, n) in [
        ("queue", 4.0),
        ("tokenize", 4.0),
        ("prefill", 4.0),
        ("decode", 4.0),
        ("postings", 3.0),
        ("scoring", 3.0),
    ] {
        assert_eq!(
            count(&format!("gram_stage_seconds_count{{stage=\"{stage}\"}}")),
            n,
            "{stage}"
        );
    }
    assert!(count("gram_step_seconds_count") >= 4.0);
    assert!(count("gram_step_rows_sum") > 0.0);
    // (The queue's depth at each step: `the_queue_depth_is_sampled_at_each_step`.)
    assert_eq!(count("gram_http_errors_total"), 0.0);
    assert_eq!(count(r#"gram_backend_info{backend="cpu",device=""}"#), 1.0);
    assert_eq!(count("gram_queue_depth"), 0.0);
    assert!(count("gram_kv_arena_entries") > 0.0);
    // The scrape's own connection at least; the cap as configured (the default).
    assert!(count("gram_connections_open") >= 1.0);
    assert_eq!(count("gram_connections_max"), 1024.0);
    // The defaults' answer is k 300's and beam 10's, and differs from beam 2's and k 1's (the
    // fixture has codes and products enough for both to show).
    let explicit = get(addr, "/search?q=oak%20desk&k=300&beam=10").await.json();
    assert_eq!((codes(&d), ids(&d)), (codes(&explicit), ids(&explicit)));
    let narrow = get(addr, "/search?q=oak%20desk&k=1&beam=2").await.json();
    assert!(codes(&narrow).len() < codes(&d).len() && ids(&narrow).len() < ids(&d).len());
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_clear_4xx() {
    let long_k_says = format!("k: {}… is out of range (1..=50)", "9".repeat(40));
    let server = start(&[
        "--max-query-bytes",
        "200",
        "--max-query-tokens",
        "16",
        "--max-k",
        "50",
        "--max-beam",
        "8",
        "--max-body-bytes",
        "4096",
    ])
    .await;
    let addr = server.addr();
    let json_ct = Some("application/json");
    let cases: Vec<(&str, Answer, u16, &str, &str)> = vec![
        (
            "invalid JSON",
            call(addr, "POST", "/v1/search", json_ct, r#"{"query": "sofa""#).await,
            400,
            "invalid_json",
            "JSON",
        ),
        (
            "an empty body",
            call(addr, "POST", "/v1/search", json_ct, "").await,
            400,
            "invalid_json",
            "EOF",
        ),
        (
            "JSON with trailing data",
            call(
                addr,
                "POST",
                "/v1/codes",
                json_ct,
                r#"{"query": "sofa"} {}"#,
            )
            .await,
            400,
            "invalid_json",
            "trailing",
        ),
        (
            "not JSON at all",
            call(addr, "POST", "/v1/search", json_ct, "query=sofa").await,
            400,
            "invalid_json",
            "JSON",
        ),
        (
            "query of the wrong type",
            post(addr, "/v1/search", json!({"query": 5})).await,
            400,
            "invalid_request",
            "invalid type",
        ),
        (
            "k of the wrong type",
            post(addr, "/v1/search", json!({"query": "sofa", "k": "ten"})).await,
            400,
            "invalid_request",
            "invalid type",
        ),
        (
            "k in exponent notation",
            call(
                addr,
                "POST",
                "/v1/search",
                json_ct,
                r#"{"query":"sofa","k":1e2}"#,
            )
            .await,
            400,
            "invalid_request",
            "expected a non-negative integer, not 100.0",
        ),
        (
            "k with a fraction part",
            call(
                addr,
                "POST",
                "/v1/search",
                json_ct,
                r#"{"query":"sofa","k":300.0}"#,
            )
            .await,
            400,
            "invalid_request",
            "expected a non-negative integer, not 300.0",
        ),
        (
            "a repeated key",
            call(
                addr,
                "POST",
                "/v1/search",
                json_ct,
                r#"{"query":"a","query":"b"}"#,
            )
            .await,
            400,
            "invalid_request",
            "duplicate field",
        ),
        (
            "negative k",
            post(addr, "/v1/search", json!({"query": "sofa", "k": -1})).await,
            400,
            "invalid_request",
            "-1",
        ),
        (
            "fractional beam",
            post(addr, "/v1/search", json!({"query": "sofa", "beam": 2.5})).await,
            400,
            "invalid_request",
            "2.5",
        ),
        (
            "k too large for an integer (JSON)",
            call(
                addr,
                "POST",
                "/v1/search",
                json_ct,
                r#"{"query":"sofa","k":18446744073709551616}"#,
            )
            .await,
            422,
            "input",
            "k: 18446744073709551616 is out of range (1..=50)",
        ),
        (
            "beam as a huge float (JSON)",
            post(addr, "/v1/codes", json!({"query": "sofa", "beam": 1e30})).await,
            422,
            "input",
            "beam: 1e30 is out of range (1..=8)",
        ),
        (
            "null query",
            post(addr, "/v1/search", json!({"query": null})).await,
            400,
            "invalid_request",
            "null",
        ),
        (
            "a JSON array",
            post(addr, "/v1/search", json!(["sofa"])).await,
            400,
            "invalid_request",
            "not an array",
        ),
        (
            "a JSON array of every field",
            post(addr, "/v1/search", json!(["sofa", 10, 4])).await,
            400,
            "invalid_request",
            "not an array",
        ),
        (
            "missing query",
            post(addr, "/v1/search", json!({"k": 3})).await,
            400,
            "invalid_request",
            "missing field `query`",
        ),
        (
            "unknown field",
            post(
                addr,
                "/v1/search",
                json!({"query": "sofa", "colour": "red"}),
            )
            .await,
            400,
            "invalid_request",
            "unknown field `colour`",
        ),
        (
            "k on the codes endpoint",
            post(addr, "/v1/codes", json!({"query": "sofa", "k": 3})).await,
            400,
            "invalid_request",
            "unknown field `k`",
        ),
        (
            "empty query",
            post(addr, "/v1/search", json!({"query": ""})).await,
            422,
            "input",
            "empty",
        ),
        (
            "blank query",
            post(addr, "/v1/codes", json!({"query": " \t "})).await,
            422,
            "input",
            "empty",
        ),
        (
            "query over the byte limit",
            post(addr, "/v1/search", json!({"query": "sofa ".repeat(50)})).await,
            422,
            "input",
            "bytes",
        ),
        (
            "query over the token limit",
            post(addr, "/v1/search", json!({"query": "sofa ".repeat(30)})).await,
            422,
            "input",
            "tokens",
        ),
        (
            "k of 0",
            post(addr, "/v1/search", json!({"query": "sofa", "k": 0})).await,
            422,
            "input",
            "k: 0",
        ),
        (
            "k over the limit",
            post(addr, "/v1/search", json!({"query": "sofa", "k": 51})).await,
            422,
            "input",
            "k: 51",
        ),
        (
            "k beyond u64",
            post(addr, "/v1/search", json!({"query": "sofa", "k": 1e30})).await,
            422,
            "input",
            "k: 1e30 is out of range (1..=50)",
        ),
        (
            "beam of 0",
            post(addr, "/v1/codes", json!({"query": "sofa", "beam": 0})).await,
            422,
            "input",
            "beam: 0",
        ),
        (
            "beam over the limit",
            post(addr, "/v1/search", json!({"query": "sofa", "beam": 9})).await,
            422,
            "input",
            "beam: 9",
        ),
        (
            "invalid UTF-8 body",
            call(
                addr,
                "POST",
                "/v1/search",
                json_ct,
                &b"{\"query\": \"sof\xff\"}"[..],
            )
            .await,
            400,
            "invalid_utf8",
            "UTF-8",
        ),
        (
            "lone surrogate escape",
            call(
                addr,
                "POST",
                "/v1/search",
                json_ct,
                r#"{"query": "\ud800"}"#,
            )
            .await,
            400,
            "invalid_json",
            "escape",
        ),
        (
            "text/plain body",
            call(
                addr,
                "POST",
                "/v1/search",
                Some("text/plain"),
                r#"{"query":"sofa"}"#,
            )
            .await,
            415,
            "unsupported_media_type",
            "text/plain",
        ),
        (
            "no content type",
            call(addr, "POST", "/v1/codes", None, r#"{"query":"sofa"}"#).await,
            415,
            "unsupported_media_type",
            "none",
        ),
        (
            "a content type that is not ASCII",
            call_with(
                addr,
                "POST",
                "/v1/codes",
                &[("content-type", "application/json\u{ff}")],
                r#"{"query":"sofa"}"#,
            )
            .await,
            415,
            "unsupported_media_type",
            "got (not ASCII)",
        ),
        (
            "a gzip-encoded body",
            call_with(
                addr,
                "POST",
                "/v1/search",
                &[
                    ("content-type", "application/json"),
                    ("content-encoding", "gzip"),
                ],
                &b"\x1f\x8b\x08\x00\x00\x00\x00\x00"[..],
            )
            .await,
            415,
            "unsupported_media_type",
            "Content-Encoding gzip",
        ),
        (
            "body over the size limit",
            post(addr, "/v1/search", json!({"query": "x".repeat(5000)})).await,
            413,
            "payload_too_large",
            "too large",
        ),
        (
            "GET without q",
            get(addr, "/search?k=3").await,
            400,
            "invalid_request",
            "missing parameter `q`",
        ),
        (
            "GET with invalid UTF-8",
            get(addr, "/search?q=sof%FF").await,
            400,
            "invalid_utf8",
            "UTF-8",
        ),
        (
            "GET with a bad escape",
            get(addr, "/search?q=sof%G0").await,
            400,
            "invalid_request",
            "percent-escape",
        ),
        (
            "GET with a non-numeric k",
            get(addr, "/search?q=sofa&k=ten").await,
            400,
            "invalid_request",
            "k: `ten`",
        ),
        (
            "GET with a signed k (`+5` decoded: Rust's integer parser takes it)",
            get(addr, "/search?q=sofa&k=%2B5").await,
            400,
            "invalid_request",
            "k: `+5`",
        ),
        (
            "GET with an unknown parameter",
            get(addr, "/search?q=sofa&colour=red").await,
            400,
            "invalid_request",
            "unknown parameter `colour`",
        ),
        (
            "GET with q twice",
            get(addr, "/search?q=sofa&q=rug").await,
            400,
            "invalid_request",
            "twice",
        ),
        (
            "GET with an empty q",
            get(addr, "/search?q=").await,
            422,
            "input",
            "empty",
        ),
        (
            "GET with k over the limit",
            get(addr, "/search?q=sofa&k=1000").await,
            422,
            "input",
            "k: 1000",
        ),
        (
            "GET with k too large to parse",
            get(addr, "/search?q=sofa&k=99999999999999999999999").await,
            422,
            "input",
            "k: 99999999999999999999999 is out of range (1..=50)",
        ),
        (
            "GET with beam too large to parse",
            get(addr, "/search?q=sofa&beam=99999999999999999999999").await,
            422,
            "input",
            "beam: 99999999999999999999999 is out of range (1..=8)",
        ),
        (
            "GET with a k of 5,000 digits: named by its first 40",
            get(addr, &format!("/search?q=sofa&k={}", "9".repeat(5000))).await,
            422,
            "input",
            &long_k_says,
        ),
        (
            "GET with an empty k",
            get(addr, "/search?q=sofa&k=").await,
            400,
            "invalid_request",
            "k: ``",
        ),
        (
            "GET with a negative beam",
            get(addr, "/search?q=sofa&beam=-3").await,
            400,
            "invalid_request",
            "beam: `-3`",
        ),
        (
            "unknown endpoint",
            get(addr, "/v2/search").await,
            404,
            "not_found",
            "",
        ),
        (
            "GET on a POST endpoint",
            get(addr, "/v1/search").await,
            405,
            "method_not_allowed",
            "POST",
        ),
        (
            "POST on a GET endpoint",
            post(addr, "/health", json!({})).await,
            405,
            "method_not_allowed",
            "GET",
        ),
    ];
    let n = cases.len();
    for (case, answer, status, kind, needle) in &cases {
        let msg = error_of(answer, *status, kind, case);
        assert!(msg.contains(needle), "{case}: `{msg}` lacks `{needle}`");
    }
    // A 405 says which methods the endpoint takes (RFC 9110).
    let allow = |case: &str| {
        let (_, a, ..) = cases.iter().find(|c| c.0 == case).unwrap();
        a.headers
            .get("allow")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(allow("GET on a POST endpoint").as_deref(), Some("POST"));
    assert_eq!(
        allow("POST on a GET endpoint").as_deref(),
        Some("GET, HEAD")
    );
    // The server is still well, and counted every failure by kind.
    let ok = post(
        addr,
        "/v1/search",
        json!({"query": "sofa", "k": 50, "beam": 8}),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    // `null` for `k` or `beam` is the default (docs/SERVER.md).
    let a = post(
        addr,
        "/v1/search",
        json!({"query": "sofa", "k": null, "beam": null}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    // The byte limit is the trimmed query's: 4 bytes inside 300 of spaces is taken.
    let padded = format!("{0}sofa{0}", " ".repeat(150));
    let a = post(addr, "/v1/codes", json!({ "query": padded })).await;
    assert_eq!(a.status, 200, "{}", a.text());
    // Media types with parameters, and `+json` ones, are JSON.
    for ct in [
        "application/json; charset=utf-8",
        "application/vnd.search+json",
    ] {
        let a = call(addr, "POST", "/v1/codes", Some(ct), r#"{"query":"sofa"}"#).await;
        assert_eq!(a.status, 200, "{ct}: {}", a.text());
    }
    let m = metrics(addr).await;
    let failures: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("gram_request_failures_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(failures as usize, n);
    assert_eq!(m[r#"gram_request_failures_total{kind="input"}"#], 16.0);
    assert_eq!(
        m[r#"gram_requests_total{endpoint="other",status="404"}"#],
        1.0
    );
    // No request but the good ones (two searches, three codes requests) reached the batch.
    assert_eq!(m[r#"gram_stage_seconds_count{stage="queue"}"#], 5.0);
    server.shutdown().await.unwrap();
}

/// Eight requests of mixed `k`, beam and endpoint.
fn mixed_requests() -> Vec<Request> {
    let queries = [
        "green velvet sofa",
        "oak desk",
        "cheap rug",
        "lamp for kids",
        "chair",
        "wool",
        "velvet oak lamp",
        "desk sofa",
    ];
    queries
        .iter()
        .enumerate()
        .map(|(i, q)| Request {
            k: 1 + 2 * i,
            beam: 1 + (i * 3) % 7,
            codes_only: i % 4 == 3,
            ..Request::new(*q)
        })
        .collect()
}

/// Sends `requests` at once, each on a connection of its own, and checks every answer against
/// the in-process engine's answer to it alone.
async fn answers_as_single_ones(
    addr: SocketAddr,
    requests: &[Request],
    alone: &[gram::search::Response],
) {
    let sent = requests.iter().map(|r| {
        let (path, body) = if r.codes_only {
            ("/v1/codes", json!({"query": r.query, "beam": r.beam}))
        } else {
            (
                "/v1/search",
                json!({"query": r.query, "k": r.k, "beam": r.beam}),
            )
        };
        tokio::spawn(post(addr, path, body))
    });
    let answers: Vec<Answer> = futures_join(sent.collect()).await;
    for ((r, a), want) in requests.iter().zip(&answers).zip(alone) {
        assert_eq!(a.status, 200, "{}", a.text());
        let got = a.json();
        assert_eq!(got["query"], want.query);
        let want_codes: Vec<String> = want.codes.iter().map(|c| c.code.clone()).collect();
        assert_eq!(codes(&got), want_codes, "{}", r.query);
        if r.codes_only {
            assert!(got.get("products").is_none());
            continue;
        }
        let want_ids: Vec<String> = want.products.iter().map(|p| p.id.clone()).collect();
        assert_eq!(ids(&got), want_ids, "{}", r.query);
        for (g, w) in got["products"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&want.products)
        {
            assert!((g["score"].as_f64().unwrap() - w.score as f64).abs() < 1e-4);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_steps_and_answer_as_single_ones() {
    let requests = mixed_requests();
    // The in-process engine, one request at a time.
    let engine = Engine::open(index(), None, &gram::LoadOptions::default()).unwrap();
    let alone = search_alone(&engine, &requests);
    // The server holds them in its gathering window until all 8 are queued.
    let server = start(&["--max-batch", "8", "--batch-wait-us", "30000000"]).await;
    let addr = server.addr();
    answers_as_single_ones(addr, &requests, &alone).await;
    // They shared decoder steps: the first one ran all 8.
    let m = metrics(addr).await;
    let steps_over_4 =
        m["gram_step_requests_bucket{le=\"8\"}"] - m["gram_step_requests_bucket{le=\"4\"}"];
    assert!(steps_over_4 >= 1.0, "{m:?}");
    assert_eq!(m["gram_stage_seconds_count{stage=\"queue\"}"], 8.0);
    server.shutdown().await.unwrap();
}

/// `--max-batch-rows`: the same eight requests, gathered the same way, join in several steps
/// so that no step runs more rows than the bound; they still share steps and answer the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_bound_splits_the_batch_and_keeps_the_answers() {
    let requests = mixed_requests();
    let engine = Engine::open(index(), None, &gram::LoadOptions::default()).unwrap();
    let alone = search_alone(&engine, &requests);
    let rows = |r: &Request| {
        let p = engine.prepare(r.clone()).unwrap();
        (p.prompt_tokens(), r.beam)
    };
    let sizes: Vec<(usize, usize)> = requests.iter().map(rows).collect();
    // A bound that two of the largest requests fit under, on a bucket edge of the histogram.
    let largest = sizes.iter().map(|&(p, b)| p.max(b)).max().unwrap();
    let bound = (2 * largest).next_power_of_two();
    let prompts: usize = sizes.iter().map(|&(p, _)| p).sum();
    assert!(
        prompts > bound,
        "the fixture's prompts ({prompts} tokens) must overflow {bound} rows for this test"
    );
    let step_rows = |m: &HashMap<String, f64>| {
        let over =
            m["gram_step_rows_count"] - m[&format!("gram_step_rows_bucket{{le=\"{bound}\"}}")];
        let shared = m["gram_step_requests_count"] - m["gram_step_requests_bucket{le=\"1\"}"];
        (over, shared)
    };
    // A window that gathers all 8 (sent at once) but ends well inside their 10 s deadline: under
    // the bound the batch can empty before the last requests arrive (a loaded machine spreads
    // them out), and the next one then opens a window of its own, which ends at 8 queued or at
    // its length.
    let gather = ["--max-batch", "8", "--batch-wait-us", "2000000"];
    // Without the bound the first step prefills all 8 prompts: over `bound`.
    let server = start(&gather).await;
    answers_as_single_ones(server.addr(), &requests, &alone).await;
    let (over, _) = step_rows(&metrics(server.addr()).await);
    assert!(over >= 1.0, "no step over {bound} rows without the bound");
    server.shutdown().await.unwrap();
    // With it, none is, and steps are still shared.
    let b = bound.to_string();
    let server = start(&[&gather[..], &["--max-batch-rows", &b]].concat()).await;
    answers_as_single_ones(server.addr(), &requests, &alone).await;
    let m = metrics(server.addr()).await;
    let (over, shared) = step_rows(&m);
    assert_eq!(over, 0.0, "a step over {bound} rows: {m:?}");
    assert!(shared >= 1.0, "no step shared: {m:?}");
    assert_eq!(m["gram_stage_seconds_count{stage=\"queue\"}"], 8.0);
    server.shutdown().await.unwrap();
    // A bound below every request: each runs alone, in turn, and none waits for ever.
    let server = start(&[&gather[..], &["--max-batch-rows", "1"]].concat()).await;
    answers_as_single_ones(server.addr(), &requests, &alone).await;
    let m = metrics(server.addr()).await;
    let (_, shared) = step_rows(&m);
    assert_eq!(
        shared, 0.0,
        "a step ran two requests under a bound of 1 row: {m:?}"
    );
    assert_eq!(m["gram_stage_seconds_count{stage=\"queue\"}"], 8.0);
    server.shutdown().await.unwrap();
}

/// Awaits spawned tasks in order.
async fn futures_join<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Every answer names its request: the client's `x-request-id` echoed when it is 1–128 bytes of
/// visible ASCII, else one the server makes (unique, process start and a sequence number).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_its_request_id() {
    let server = start(&[]).await;
    let addr = server.addr();
    let body = json!({"query": "velvet sofa", "k": 3}).to_string();
    let with = |id: &'static str| {
        let body = body.clone();
        async move {
            call_with(
                addr,
                "POST",
                "/v1/search",
                &[("content-type", "application/json"), ("x-request-id", id)],
                body,
            )
            .await
        }
    };
    let a = with("client-7f3a.9").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["x-request-id"], "client-7f3a.9");
    let longest: &'static str = Box::leak("x".repeat(128).into_boxed_str());
    assert_eq!(with(longest).await.headers["x-request-id"], longest);
    // Errors too, the same way.
    let e = call_with(
        addr,
        "POST",
        "/v1/search",
        &[
            ("content-type", "application/json"),
            ("x-request-id", "bad-json-1"),
        ],
        "{",
    )
    .await;
    error_of(&e, 400, "invalid_json", "request id");
    assert_eq!(e.headers["x-request-id"], "bad-json-1");
    assert!(get(addr, "/nope")
        .await
        .headers
        .contains_key("x-request-id"));
    // None, too long, a space or a byte past ASCII: the server's own, all different.
    let too_long: &'static str = Box::leak("x".repeat(129).into_boxed_str());
    let mut made = std::collections::HashSet::new();
    for a in [
        get(addr, "/health").await,
        get(addr, "/health").await,
        with(too_long).await,
        with("a b").await,
        with("caf\u{e9}").await,
    ] {
        let id = a.headers["x-request-id"].to_str().unwrap().to_string();
        let (start, seq) = id.split_once('-').expect("start-seq");
        assert!(
            u128::from_str_radix(start, 16).is_ok() && seq.parse::<u64>().is_ok(),
            "{id}"
        );
        assert!(made.insert(id.clone()), "{id} given twice");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_at_once_with_retry_after() {
    // Queue of 1; the batch (of up to 2) waits 2 s for a second request that the queue can
    // never hold, so every request that comes meanwhile is refused.
    let server = start(&[
        "--max-queue",
        "1",
        "--max-batch",
        "2",
        "--batch-wait-us",
        "2000000",
        "--retry-after-s",
        "3",
    ])
    .await;
    let addr = server.addr();
    let sent: Vec<_> = (0..12)
        .map(|i| {
            tokio::spawn(post(
                addr,
                "/v1/search",
                json!({"query": format!("sofa {i}")}),
            ))
        })
        .collect();
    // A query over the token limit, sent while the queue is full: refused before it is
    // tokenized (so 503, not the 422 it gets from an idle server).
    let long = "sofa ".repeat(100);
    let late = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        post(addr, "/v1/search", json!({ "query": long })).await
    });
    let answers = futures_join(sent).await;
    let late = late.await.unwrap();
    error_of(&late, 503, "overloaded", "full queue");
    let answers: Vec<Answer> = answers.into_iter().chain([late]).collect();
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status == 503).collect();
    assert_eq!(ok + refused.len(), answers.len());
    assert!(
        ok >= 1 && !refused.is_empty(),
        "{ok} answered, {} refused",
        refused.len()
    );
    for a in &refused {
        error_of(a, 503, "overloaded", "full queue");
        assert_eq!(a.headers["retry-after"], "3");
    }
    // Refusals carry request ids too, each its own.
    let ids: std::collections::HashSet<_> = refused
        .iter()
        .map(|a| a.headers["x-request-id"].clone())
        .collect();
    assert_eq!(ids.len(), refused.len());
    let m = metrics(addr).await;
    assert_eq!(
        m[r#"gram_requests_total{endpoint="/v1/search",status="503"}"#] as usize,
        answers.len() - ok
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_gets_504_and_leaves_the_queue() {
    // The gathering window (1 s) outlasts the deadline (100 ms).
    let server = start(&[
        "--timeout-ms",
        "100",
        "--max-batch",
        "4",
        "--batch-wait-us",
        "1000000",
    ])
    .await;
    let addr = server.addr();
    let a = post(addr, "/v1/search", json!({"query": "oak desk"})).await;
    let msg = error_of(&a, 504, "timeout", "deadline");
    assert!(msg.contains("100 ms"), "{msg}");
    // Once the window has passed, the batcher has dropped it unadmitted: no step ran. Its
    // wait is in the queue histogram (it was left out: the waits that end in a 504 are the
    // longest).
    assert_eq!(metric_reaches(addr, "gram_queue_depth", 0.0).await, 0.0);
    let queued = r#"gram_stage_seconds_count{stage="queue"}"#;
    assert_eq!(metric_reaches(addr, queued, 1.0).await, 1.0);
    let m = metrics(addr).await;
    // Timed to its deadline (100 ms from arrival), not to when the batcher noticed (the 1 s
    // window's end).
    let waited = m[r#"gram_stage_seconds_sum{stage="queue"}"#];
    assert!((0.05..=0.1).contains(&waited), "waited {waited} s");
    assert_eq!(m["gram_step_seconds_count"], 0.0);
    server.shutdown().await.unwrap();
}

/// A client that leaves before its answer is counted, as status 499 and failure kind
/// `client_closed` with its time so far: hyper drops the handler, and the request was in no
/// counter or latency histogram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_is_counted() {
    // The request waits in a long gathering window (the batch holds 4) while its client leaves.
    let server = start(&["--max-batch", "4", "--batch-wait-us", "30000000"]).await;
    let addr = server.addr();
    let body = r#"{"query": "oak desk"}"#;
    let leaving = raw(
        addr,
        format!(
            "POST /v1/search HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(metric_reaches(addr, "gram_queue_depth", 1.0).await, 1.0);
    // In flight over HTTP: it and the scrape reading the gauge.
    assert_eq!(metrics(addr).await["gram_http_requests_in_flight"], 2.0);
    drop(leaving);
    let left = r#"gram_requests_total{endpoint="/v1/search",status="499"}"#;
    assert_eq!(metric_reaches(addr, left, 1.0).await, 1.0);
    let m = metrics(addr).await;
    assert_eq!(
        m[r#"gram_request_failures_total{kind="client_closed"}"#],
        1.0
    );
    // The handler dropped with its client: out of flight, the scrape alone left.
    assert_eq!(m["gram_http_requests_in_flight"], 1.0);
    assert_eq!(
        m[r#"gram_request_duration_seconds_count{endpoint="/v1/search"}"#],
        1.0
    );
    server.shutdown().await.unwrap();
}

/// `gram_step_queue_depth` samples the requests still queued at each step: four requests
/// gathered in a long window (it ends when the batch's four are queued), steps of one row at
/// most, so each runs alone while the others wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_depth_is_sampled_at_each_step() {
    let server = start(&[
        "--max-batch",
        "4",
        "--batch-wait-us",
        "30000000",
        "--max-batch-rows",
        "1",
    ])
    .await;
    let addr = server.addr();
    let sent: Vec<_> = ["sofa", "rug", "lamp", "desk"]
        .iter()
        .map(|q| tokio::spawn(post(addr, "/v1/search", json!({"query": q, "k": 2}))))
        .collect();
    for a in futures_join(sent).await {
        assert_eq!(a.status, 200, "{}", a.text());
    }
    let m = metrics(addr).await;
    assert_eq!(
        m["gram_step_queue_depth_count"],
        m["gram_step_seconds_count"]
    );
    // The first step ran one request with three queued, at least.
    assert!(m["gram_step_queue_depth_sum"] >= 3.0, "{m:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_every_request_in_flight() {
    // The 4 requests wait in a long gathering window (the batch holds 8) until shutdown ends it.
    let server = start(&["--max-batch", "8", "--batch-wait-us", "30000000"]).await;
    let addr = server.addr();
    let sent: Vec<_> = ["sofa", "rug", "lamp", "desk"]
        .iter()
        .map(|q| tokio::spawn(post(addr, "/v1/search", json!({"query": q, "k": 2}))))
        .collect();
    assert_eq!(metric_reaches(addr, "gram_queue_depth", 4.0).await, 4.0);
    server.shutdown().await.unwrap();
    for a in futures_join(sent).await {
        assert_eq!(a.status, 200, "{}", a.text());
        assert!(!ids(&a.json()).is_empty());
    }
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_does_not_hold_the_shutdown() {
    use std::io::Write;
    let server = start(&[
        "--timeout-ms",
        "300",
        "--header-timeout-ms",
        "300",
        "--body-timeout-ms",
        "1000",
        "--write-timeout-ms",
        "300",
    ])
    .await;
    // A request whose body never comes (with its content type: without one it was refused
    // with 415 before any body was read, and the test proved nothing about a stalled body).
    let mut stalled = std::net::TcpStream::connect(server.addr()).unwrap();
    stalled
        .write_all(
            b"POST /v1/search HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"qu",
        )
        .unwrap();
    // Within the grace (the four timeouts and 1 s: 2.9 s; a second more for the batcher), not held by the client; the body
    // timeout closes its connection first (408). (Shut down once the server has read the
    // headers, the request in flight beside the scrape: a connection it has not read from yet
    // is closed unanswered.)
    let addr = server.addr();
    assert_eq!(
        metric_reaches(addr, "gram_http_requests_in_flight", 2.0).await,
        2.0
    );
    let t = std::time::Instant::now();
    server.shutdown().await.unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_millis(3_900),
        "{:?}",
        t.elapsed()
    );
    let answer = read_until_closed(stalled, "the stalled client").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

/// A raw connection to `addr` that has sent `bytes`.
fn raw(addr: SocketAddr, bytes: &[u8]) -> std::net::TcpStream {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(bytes).unwrap();
    stream
}

/// Reads `stream` to its end, or panics after 60 s (the server never closed it).
async fn read_until_closed(mut stream: std::net::TcpStream, what: &'static str) -> String {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        let mut got = Vec::new();
        match stream.read_to_end(&mut got) {
            Ok(_) => {}
            // A reset (the server closed with bytes unread) is closed too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!(
                "{what}: still open after 60 s ({e}; {:?} read)",
                String::from_utf8_lossy(&got)
            ),
        }
        String::from_utf8_lossy(&got).into_owned()
    })
    .await
    .unwrap()
}

/// A client that sends part of its headers and stalls is disconnected after
/// `--header-timeout-ms`; one that sends its headers and part of its body is answered 408 and
/// disconnected after `--body-timeout-ms`; requests on other connections are answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_in_its_headers_or_body_is_cut_off() {
    let server = start(&["--header-timeout-ms", "300", "--body-timeout-ms", "300"]).await;
    let addr = server.addr();
    let in_headers = raw(addr, b"GET /health HTTP/1.1\r\nhost: x\r\n");
    let in_body = raw(
        addr,
        b"POST /v1/search HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{\"query\": \"oak",
    );
    // Both stall; other clients are served.
    let a = post(addr, "/v1/search", json!({"query": "oak desk", "k": 2})).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(get(addr, "/health").await.status, 200);
    read_until_closed(in_headers, "stalled in its headers").await;
    let answer = read_until_closed(in_body, "stalled in its body").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert!(answer.contains("300 ms"), "{answer}");
    let m = metrics(addr).await;
    assert_eq!(
        m[r#"gram_request_failures_total{kind="request_timeout"}"#],
        1.0
    );
    // A kept-alive connection left idle is closed the same way.
    let idle = raw(addr, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n");
    let answer = read_until_closed(idle, "idle after its request").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Both closes by the header timeout are counted (the 408 is a request failure instead).
    assert_eq!(
        metric_reaches(addr, "gram_connections_timed_out_total", 2.0).await,
        2.0
    );
    server.shutdown().await.unwrap();
}

/// A JSON endpoint's body of another type or encoding is refused 415 before it is read: at
/// once (it waited for the whole body, up to the body timeout), with no `100 Continue`, and the
/// connection closed (the body is unread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_the_wrong_type_is_refused_before_it_is_read() {
    let server = start(&["--body-timeout-ms", "60000"]).await;
    let addr = server.addr();
    for (path, headers) in [
        ("/v1/codes", "content-type: text/plain\r\n"),
        (
            "/v1/search",
            "content-type: text/plain\r\nexpect: 100-continue\r\n",
        ),
        (
            "/v1/search",
            "content-type: application/json\r\ncontent-encoding: gzip\r\n",
        ),
    ] {
        let t = std::time::Instant::now();
        let stream = raw(
            addr,
            format!("POST {path} HTTP/1.1\r\nhost: x\r\n{headers}content-length: 100\r\n\r\n")
                .as_bytes(),
        );
        let answer = read_until_closed(stream, "a body of the wrong type").await;
        assert!(
            answer.starts_with("HTTP/1.1 415"),
            "{path} {headers:?}: {answer}"
        );
        assert!(answer.contains("unsupported_media_type"), "{answer}");
        assert!(!answer.contains("100 Continue"), "{answer}");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "{path} {headers:?}: waited for the body"
        );
    }
    // A transfer coding before `chunked` (hyper passes it through, the body as if plain): 501
    // from the headers, whether in one header or two; `chunked` alone is read.
    let body = r#"{"query":"mouse","k":2}"#;
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    for (te, status) in [
        ("transfer-encoding: gzip, chunked\r\n", "501"),
        (
            "transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n",
            "501",
        ),
        ("transfer-encoding: chunked\r\n", "200"),
    ] {
        let stream = raw(
            addr,
            format!(
                "POST /v1/search HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                 connection: close\r\n{te}\r\n{chunked}"
            )
            .as_bytes(),
        );
        let answer = read_until_closed(stream, "a transfer coding").await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{te:?}: {answer}"
        );
        if status == "501" {
            assert!(answer.contains("unsupported_transfer_encoding"), "{answer}");
        }
    }
    // Another route's body is not judged by the JSON endpoints' rule.
    let stream = raw(
        addr,
        b"POST /nowhere HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nhi",
    );
    let answer = read_until_closed(stream, "an unknown route").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    server.shutdown().await.unwrap();
}

/// A declared body over `--max-body-bytes` is refused 413 at once, before any of it is sent (no
/// `100 Continue`, no wait for the body); an answer given without reading the whole body says
/// `Connection: close` and the server closes, while an answer whose body was read keeps the
/// connection open for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_bodies_close_the_connection_and_oversize_ones_are_refused_at_once() {
    let server = start(&["--max-body-bytes", "4096", "--body-timeout-ms", "30000"]).await;
    let addr = server.addr();
    // Declares 100 MB, sends 17 bytes, asks for 100 Continue: answered at once (the body timeout
    // is 30 s), 413, closed.
    let t = std::time::Instant::now();
    let big = raw(
        addr,
        b"POST /v1/search HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 100000000\r\nexpect: 100-continue\r\n\r\n{\"query\":\"mouse\"}",
    );
    let answer = read_until_closed(big, "a declared 100 MB body").await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert!(answer.contains("\"payload_too_large\""), "{answer}");
    assert!(answer.contains("Content-Length 100000000"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t.elapsed()
    );
    // A chunked body declares no length: it is read up to the limit, then refused the same way
    // (5 chunks of 1,000 bytes against 4,096).
    let mut req = b"POST /v1/search HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          transfer-encoding: chunked\r\n\r\n"
        .to_vec();
    for _ in 0..5 {
        req.extend_from_slice(format!("3e8\r\n{}\r\n", " ".repeat(1000)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let answer = read_until_closed(raw(addr, &req), "a chunked 5,000-byte body").await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"payload_too_large\""), "{answer}");
    server.shutdown().await.unwrap();
    // A 404, a 405 and a route that takes no body, each with a 60 KB body (under the limit)
    // that nothing reads, then a request on the same connection: the first answer closes the
    // connection and says so.
    let server = start(&["--max-body-bytes", "100000"]).await;
    let addr = server.addr();
    let body = "x".repeat(60_000);
    for head in ["POST /nope", "PUT /v1/search", "GET /health"] {
        let mut req = format!(
            "{head} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n");
        let answer = read_until_closed(raw(addr, &req), "an unread body").await;
        let first = answer
            .split("\r\n\r\n")
            .next()
            .unwrap()
            .to_ascii_lowercase();
        assert!(!first.contains(" 413 "), "{head}: {answer}");
        assert!(first.contains("connection: close"), "{head}: {answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{head}: {answer}");
    }
    // A body that was read (a search) keeps the connection: both requests are answered.
    let search = r#"{"query":"oak desk","k":2}"#;
    let req = format!(
        "POST /v1/search HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{search}GET /health HTTP/1.1\r\nhost: x\r\n\
         connection: close\r\n\r\n",
        search.len()
    );
    let answer = read_until_closed(raw(addr, req.as_bytes()), "two requests").await;
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    let first = answer
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(!first.contains("connection: close"), "{answer}");
    // Requests hyper refuses before any handler (a byte that no URI may hold, a URI over its
    // limit): its own 400 / 414, counted in gram_http_errors_total.
    let bad = read_until_closed(
        raw(addr, b"GET /search?q=\xff HTTP/1.1\r\nhost: x\r\n\r\n"),
        "a bad URI",
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let long = format!(
        "GET /search?q={} HTTP/1.1\r\nhost: x\r\n\r\n",
        "a".repeat(100_000)
    );
    let long = read_until_closed(raw(addr, long.as_bytes()), "a long URI").await;
    assert!(long.starts_with("HTTP/1.1 414"), "{long}");
    // Counted once each connection's task has ended.
    assert_eq!(
        metric_reaches(addr, "gram_http_errors_total", 2.0).await,
        2.0
    );
    server.shutdown().await.unwrap();
}

/// A kept-alive client connection that reads `/metrics` (it holds a connection slot of its own).
struct Probe(
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    SocketAddr,
);

impl Probe {
    async fn connect(addr: SocketAddr) -> Probe {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Probe(send, addr)
    }

    async fn metrics(&mut self) -> HashMap<String, f64> {
        self.0
            .ready()
            .await
            .expect("the probe's connection stays open");
        let req = hyper::Request::get("/metrics")
            .header("host", self.1.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = self.0.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        parse_prometheus(&String::from_utf8_lossy(&body))
    }
}

/// Connections that the kernel has completed and that wait, not yet accepted, in the accept
/// queue of the IPv4 socket listening on `addr`'s port (`/proc/net/tcp`: a listening socket's
/// `rx_queue`); `None` where that file cannot be read (not Linux).
fn accept_queue(addr: SocketAddr) -> Option<usize> {
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = format!(":{:04X}", addr.port());
    let queued = text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // local address, remote address, state (0A: listening), tx_queue:rx_queue.
        (f.len() > 4 && f[1].ends_with(&port) && f[3] == "0A").then(|| {
            let rx = f[4].split(':').nth(1).unwrap();
            usize::from_str_radix(rx, 16).unwrap()
        })
    });
    Some(queued.expect("the server's listening socket is in /proc/net/tcp"))
}

/// With `--max-connections 2`, a third connection is not accepted while two are open, and is
/// served as soon as one closes. No timing: the third is seen waiting (the kernel holds it in
/// the listener's accept queue while the server's `gram_connections_open` reads 2 and no
/// `/health` has been answered), and then seen served once the first closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_for_one_to_close() {
    let server = start(&["--max-connections", "2", "--header-timeout-ms", "600000"]).await;
    let addr = server.addr();
    let health = r#"gram_requests_total{endpoint="/health",status="200"}"#;
    // Two slots taken: a client stalled in its headers, and the probe (accepted after it: the
    // accept queue is first in, first out).
    let first = raw(addr, b"GET /health HTTP/1.1\r\nhost: x\r\n");
    let mut probe = Probe::connect(addr).await;
    assert_eq!(probe.metrics().await["gram_connections_open"], 2.0);
    // A third client connects and sends its request...
    let mut third = tokio::spawn(get(addr, "/health"));
    // ...and waits in the listen backlog: the kernel holds it, the server has not taken it.
    if accept_queue(addr).is_some() {
        let t = std::time::Instant::now();
        while accept_queue(addr) != Some(1) {
            assert!(!third.is_finished(), "answered past the cap");
            assert!(
                t.elapsed() < std::time::Duration::from_secs(60),
                "the third connection never waited in the accept queue (accepted past the cap?)"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    } else {
        eprintln!("no /proc/net/tcp: the accept queue is not checked");
    }
    // Still so after a round trip through the server: two open, no /health answered.
    let m = probe.metrics().await;
    assert_eq!(m["gram_connections_open"], 2.0, "accepted past the cap");
    assert_eq!(m.get(health), None, "answered past the cap");
    assert!(!third.is_finished(), "answered past the cap");
    assert!(matches!(accept_queue(addr), None | Some(1)));
    // The first closes: the third is accepted and answered.
    drop(first);
    let a = tokio::time::timeout(std::time::Duration::from_secs(60), &mut third)
        .await
        .expect("the third connection is served once the first closes")
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(accept_queue(addr).unwrap_or(0), 0);
    assert_eq!(probe.metrics().await[health], 1.0);
    drop(probe);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_and_a_missing_index_are_refused_at_startup() {
    let parse = |flags: &[&str]| {
        let mut argv = vec!["serve", "--index", "/nonexistent"];
        argv.extend_from_slice(flags);
        Cli::parse_from(argv).serve.config()
    };
    for (flags, want) in [
        (&["--max-batch", "0"][..], "--max-batch"),
        (&["--max-queue", "0"][..], "--max-queue"),
        (&["--timeout-ms", "0"][..], "--timeout-ms"),
        (&["--header-timeout-ms", "0"][..], "--header-timeout-ms"),
        (&["--body-timeout-ms", "0"][..], "--body-timeout-ms"),
        (&["--write-timeout-ms", "0"][..], "--write-timeout-ms"),
        (&["--max-connections", "0"][..], "--max-connections"),
        (
            &["--retry-after-s", "0"][..],
            "--retry-after-s must be at least 1",
        ),
        (
            &["--max-connections", "18446744073709551615"][..],
            "--max-connections must be at most",
        ),
        (&["--score-threads", "0"][..], "--score-threads"),
        (&["--score-threads", "100000"][..], "--score-threads 100000"),
        (
            &["--http-threads", "1000000000"][..],
            "--http-threads 1000000000",
        ),
        (&["--addr", "localhost"][..], "--addr"),
        (&["--max-beam", "100000"][..], "--max-beam"),
        (&["--idle-spin-us", "1000001"][..], "--idle-spin-us 1000001"),
    ] {
        let e = parse(flags).err().unwrap().to_string();
        assert!(e.contains(want), "{flags:?}: {e}");
    }
    let config = parse(&["--addr", "127.0.0.1:0"]).unwrap();
    assert_eq!(
        config.idle_spin,
        gram::backend::cpu::team::DEFAULT_SPIN,
        "the default idle spin"
    );
    let spin = parse(&["--idle-spin-us", "0"]).unwrap().idle_spin;
    assert_eq!(spin, std::time::Duration::ZERO);
    let e = Server::start(config).await.err().unwrap().to_string();
    assert!(e.contains("/nonexistent"), "{e}");
    // An arena over --max-kv-mib is refused before it is allocated.
    let ix = index().to_str().unwrap().to_string();
    let argv = [
        "serve",
        "--index",
        &ix,
        "--addr",
        "127.0.0.1:0",
        "--max-batch",
        "1000",
    ];
    let mut config = Cli::parse_from(argv).serve.config().unwrap();
    config.max_kv_mib = 1;
    let e = Server::start(config).await.err().unwrap().to_string();
    assert!(e.contains("--max-kv-mib"), "{e}");
    // A --max-query-tokens past any model's positions is refused by name (its sums used to wrap
    // around in release builds and size a tiny arena).
    let mut config = Cli::parse_from(&argv[..5]).serve.config().unwrap();
    config.limits.max_query_tokens = usize::MAX;
    let e = Server::start(config).await.err().unwrap().to_string();
    assert!(e.contains("--max-query-tokens"), "{e}");
}

/// `--device cuda` where no GPU can run the model (none here; tiny-llama's head dim on a GPU
/// box) fails the startup with a device error; `auto` serves on whatever it chose and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_is_chosen_at_startup_and_reported() {
    let config = |device: &str| config_on(device, &[]);
    let e = Server::start(config("cuda"))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("device: "), "{e}");
    let server = Server::start(config("auto")).await.unwrap();
    let health = get(server.addr(), "/health").await.json();
    let backend = health["backend"]["backend"].as_str().unwrap().to_string();
    assert!(["cpu", "cuda"].contains(&backend.as_str()), "{health}");
    let m = metrics(server.addr()).await;
    let info: Vec<_> = m
        .iter()
        .filter(|(k, _)| k.starts_with("gram_backend_info{"))
        .collect();
    assert_eq!(info.len(), 1, "{info:?}");
    assert!(info[0].0.contains(&format!("backend=\"{backend}\"")));
    assert_eq!(*info[0].1, 1.0);
    server.shutdown().await.unwrap();
}

/// The queue's wait bound (`--max-queue-wait-ms`), deterministically: with no service rate yet
/// only the depth bound applies; once the batch has answered requests, a job that would wait
/// longer than the bound for a place in the batch (the jobs that cannot enter at the next step
/// / answers per second of stepping) is refused with that estimate, and a job that finds a free
/// place never is. The push side of "only while jobs come faster than answers": no assertion
/// here depends on how fast this machine pushes (the rates are set far from what any machine
/// does, or bounded by sleeps, which never end early); the arrival-rate arithmetic itself (bursts,
/// the window of 128, the rate falling once traffic stops) is `batcher`'s unit tests', on
/// injected clocks.
#[test]
fn the_queue_refuses_a_job_that_would_wait_past_the_bound() {
    use gram::server::batcher::{Job, Queue, Refusal};
    use std::time::{Duration, Instant};
    let engine = Engine::open(index(), None, &gram::LoadOptions::default()).unwrap();
    // Every job's handler stays (a job whose handler has gone is dropped from the queue).
    let handlers = std::cell::RefCell::new(Vec::new());
    let job = || {
        let (reply, answer) = tokio::sync::oneshot::channel();
        handlers.borrow_mut().push(answer);
        Job {
            prepared: engine.prepare(Request::new("oak desk")).unwrap(),
            reply,
            enqueued: Instant::now(),
            deadline: Instant::now() + Duration::from_secs(10),
        }
    };
    let metrics = || std::sync::Arc::new(gram::server::metrics::Metrics::default());
    // --max-batch 2, an empty batch: the first 2 queued enter at the next step. A slow batch (a
    // 100 s bound, 0.2 answers a second): the jobs below come faster than it answers on any
    // machine.
    let q = Queue::new(64, metrics()).with_wait_bound(Duration::from_secs(100));
    q.set_max_batch(2);
    // No rate yet: 10 queued.
    for i in 0..10 {
        assert_eq!(q.push(job()), Ok(i + 1));
    }
    // A step of 50 s answered 10: 0.2 answers per second of stepping. A job behind 21 is the
    // 20th that must wait for a place: 100 s (taken); behind 22, 105 s (refused).
    q.stepped(10, 50.0);
    let mut depth = 10;
    let refusal = loop {
        match q.push(job()) {
            Ok(d) => depth = d,
            Err(r) => break r,
        }
    };
    assert_eq!(depth, 22);
    assert_eq!(refusal, Refusal::TooLong { wait_ms: 105_000 });
    // A 1 ms bound at the same rate (any push comes faster than 0.2/s): the free places take
    // a job each, the next waits 5 s for an answer.
    let q = Queue::new(64, metrics()).with_wait_bound(Duration::from_millis(1));
    q.set_max_batch(2);
    q.stepped(10, 50.0);
    assert_eq!(q.push(job()), Ok(1));
    assert_eq!(q.push(job()), Ok(2));
    assert_eq!(q.push(job()), Err(Refusal::TooLong { wait_ms: 5_000 }));
    // A full batch has no free place: the first job queued already waits for an answer.
    let q = Queue::new(64, metrics()).with_wait_bound(Duration::from_millis(1));
    q.set_max_batch(2);
    q.stepped(10, 50.0);
    q.set_in_flight(2);
    assert_eq!(q.push(job()), Err(Refusal::TooLong { wait_ms: 5_000 }));
    // One place free again: one job enters without waiting.
    q.set_in_flight(1);
    assert_eq!(q.push(job()), Ok(1));
    assert!(matches!(q.push(job()), Err(Refusal::TooLong { .. })));
    // Jobs that come slower than the batch answers are not refused by the bound, only by the
    // cap, from the first on (fewer than 16 in the last second count as that many a second).
    // One every 6 ms or more (a sleep never ends early, and a slower machine only spaces them
    // further) is at most 167/s, against 200/s: all 24 are taken, although each would wait
    // 5 ms for an answer.
    let q = Queue::new(64, metrics()).with_wait_bound(Duration::from_millis(1));
    q.set_max_batch(2);
    q.stepped(10, 0.05);
    q.set_in_flight(2);
    for i in 0..24 {
        assert_eq!(q.push(job()), Ok(i + 1), "job {i}");
        std::thread::sleep(Duration::from_millis(6));
    }
    // The same jobs, once they come faster than the batch answers, are refused again: its
    // newest 64 answers took 6400 s of stepping (0.01/s), so the next job, 25th to wait for a
    // place, would wait 2500 s.
    q.stepped(64, 6400.0);
    assert_eq!(q.push(job()), Err(Refusal::TooLong { wait_ms: 2_500_000 }));
}

/// A job whose handler has gone (its deadline passed, its client left) does not count against
/// `--max-queue`: `push` drops such jobs before it compares the depth with the cap, so that
/// during a long step abandoned jobs do not turn live requests away.
#[test]
fn abandoned_jobs_do_not_count_against_the_queue_cap() {
    use gram::server::batcher::{Job, Queue, Refusal};
    use std::time::{Duration, Instant};
    let engine = Engine::open(index(), None, &gram::LoadOptions::default()).unwrap();
    let job = || {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            prepared: engine.prepare(Request::new("oak desk")).unwrap(),
            reply,
            enqueued: Instant::now(),
            deadline: Instant::now() + Duration::from_secs(10),
        };
        (job, answer)
    };
    let metrics = std::sync::Arc::new(gram::server::metrics::Metrics::default());
    let q = Queue::new(2, metrics.clone());
    let (a, a_handler) = job();
    let (b, b_handler) = job();
    assert_eq!(q.push(a), Ok(1));
    assert_eq!(q.push(b), Ok(2));
    let (c, _c_handler) = job();
    assert_eq!(q.push(c), Err(Refusal::Full));
    // The first handler gives up: its place is free for the next job.
    drop(a_handler);
    let (d, _d_handler) = job();
    assert_eq!(q.push(d), Ok(2));
    // Both of the others give up too: the next job finds the queue empty.
    drop(b_handler);
    drop(_d_handler);
    let (e, _e_handler) = job();
    assert_eq!(q.push(e), Ok(1));
    assert!(metrics.render().contains("gram_queue_depth 1\n"));
}

/// The batcher tests' configuration: two places, no row bound or gathering window, an arena
/// for two default-beam requests, `score_threads` scoring threads.
fn two_places(engine: &Engine, score_threads: usize) -> gram::server::batcher::BatcherConfig {
    gram::server::batcher::BatcherConfig {
        max_batch: 2,
        max_rows: 0,
        batch_wait: std::time::Duration::ZERO,
        arena_entries: gram::server::batcher::arena_entries(engine, 2, 10).unwrap(),
        score_threads,
    }
}

/// Queues `r` for a batcher test (a 600 s deadline: the test, not the clock, ends it); its
/// answer arrives on the returned channel.
fn push_for_batcher(
    engine: &Engine,
    queue: &gram::server::batcher::Queue,
    r: &Request,
) -> tokio::sync::oneshot::Receiver<gram::server::batcher::Reply> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job = gram::server::batcher::Job {
        prepared: engine.prepare(r.clone()).unwrap(),
        reply,
        enqueued: std::time::Instant::now(),
        deadline: std::time::Instant::now() + std::time::Duration::from_secs(600),
    };
    queue.push(job).unwrap();
    answer
}

/// Should a batcher test fail, releases every held scoring and closes the queue, so that the
/// batcher stops and the scope's join does not hang.
struct Guard<'a>(
    Option<std::sync::mpsc::Sender<()>>,
    &'a gram::server::batcher::Queue,
);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0.take();
        self.1.close();
    }
}

/// Scoring does not hold up the decoder: with the scoring of a first request held (its scoring
/// thread blocked), a second request admitted after it still gets every decoder step it needs
/// (its codes are done and handed to the other scoring thread). Scoring inline on the batcher
/// thread, the second would never step. Both answers are then the engine's own.
#[test]
fn the_batcher_steps_on_while_a_request_is_scored() {
    use gram::server::batcher::{self, Queue};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let engine = Engine::open(index(), None, &gram::LoadOptions::default()).unwrap();
    let requests = [
        Request {
            k: 3,
            ..Request::new("oak desk")
        },
        Request {
            k: 5,
            beam: 4,
            ..Request::new("green velvet sofa")
        },
    ];
    let alone = search_alone(&engine, &requests);
    let metrics = Arc::new(gram::server::metrics::Metrics::default());
    let queue = Queue::new(8, metrics.clone());
    queue.set_max_batch(2);
    let config = two_places(&engine, 2);
    // Each scoring waits for a release of its own.
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Mutex::new(released);
    let entered = AtomicUsize::new(0);
    let score = |done| {
        entered.fetch_add(1, Ordering::SeqCst);
        // Released, or the test failed (its guard hung up).
        let _ = released.lock().unwrap().recv();
        engine.score(done)
    };
    // Polls `entered` until it reaches `n` (or 60 s pass: the batcher is stuck).
    let wait_entered = |n: usize| {
        let t = Instant::now();
        while entered.load(Ordering::SeqCst) < n {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{} of {n} requests reached scoring",
                entered.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let push = |r: &Request| push_for_batcher(&engine, &queue, r);
    std::thread::scope(|s| {
        let batcher = s.spawn(|| batcher::run(&engine, &queue, config, &metrics, || {}, &score));
        let guard = Guard(Some(release), &queue);
        let release = guard.0.as_ref().unwrap();
        let first = push(&requests[0]);
        wait_entered(1);
        // The first is held in scoring; the second runs all its steps meanwhile.
        let second = push(&requests[1]);
        wait_entered(2);
        release.send(()).unwrap();
        release.send(()).unwrap();
        for (answer, want) in [first, second].into_iter().zip(&alone) {
            let done = answer.blocking_recv().unwrap().unwrap();
            assert_eq!(&done.response.codes, &want.codes);
            assert_eq!(&done.response.products, &want.products);
        }
        drop(guard);
        batcher.join().unwrap().unwrap();
    });
    // Scoring is still timed.
    let text = metrics.render();
    assert!(
        text.contains("gram_stage_seconds_count{stage=\"scoring\"} 2\n"),
        "{text}"
    );
}

/// The hand-off to scoring is bounded: with the one scoring thread held, at most `--max-batch`
/// finished requests wait for it (plus the one being handed over, `gram_scoring_backlog` 3 at
/// `--max-batch 2`) and the batcher waits rather than finishing the rest into an unbounded
/// channel no limit or gauge saw (it went to 5 of these 6). Released, every answer is the
/// engine's own.
#[test]
fn finished_requests_wait_for_scoring_in_a_bounded_hand_off() {
    use gram::server::batcher::{self, Queue};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let engine = Engine::open(index(), None, &gram::LoadOptions::default()).unwrap();
    let queries = [
        "oak desk",
        "green velvet sofa",
        "hp toner",
        "usb cable",
        "red chair",
        "lamp",
    ];
    let requests: Vec<Request> = queries
        .iter()
        .map(|q| Request {
            k: 3,
            ..Request::new(*q)
        })
        .collect();
    let alone = search_alone(&engine, &requests);
    let metrics = Arc::new(gram::server::metrics::Metrics::default());
    let queue = Queue::new(8, metrics.clone());
    queue.set_max_batch(2);
    let config = two_places(&engine, 1);
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Mutex::new(released);
    let score = |done| {
        let _ = released.lock().unwrap().recv();
        engine.score(done)
    };
    let backlog = |m: &gram::server::metrics::Metrics| -> u64 {
        let text = m.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("gram_scoring_backlog "))
            .expect("gram_scoring_backlog in /metrics");
        line["gram_scoring_backlog ".len()..].parse().unwrap()
    };
    std::thread::scope(|s| {
        let batcher = s.spawn(|| batcher::run(&engine, &queue, config, &metrics, || {}, &score));
        let guard = Guard(Some(release), &queue);
        let answers: Vec<_> = requests
            .iter()
            .map(|r| push_for_batcher(&engine, &queue, r))
            .collect();
        let t = Instant::now();
        while backlog(&metrics) < 3 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "backlog {}",
                backlog(&metrics)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Time for the other two to finish their codes, were the hand-off unbounded.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(backlog(&metrics), 3);
        for _ in &requests {
            guard.0.as_ref().unwrap().send(()).unwrap();
        }
        for (answer, want) in answers.into_iter().zip(&alone) {
            let done = answer.blocking_recv().unwrap().unwrap();
            assert_eq!(&done.response.codes, &want.codes);
            assert_eq!(&done.response.products, &want.products);
        }
        drop(guard);
        batcher.join().unwrap().unwrap();
    });
    assert_eq!(backlog(&metrics), 0);
}

/// `gram bench`'s closed loop against a port nobody listens on (a server stopped mid-run):
/// every request is a `connect` failure, each client pausing 10 ms after one instead of
/// spinning (~90,000 attempts a second filled the report), and the run ends in an error.
#[test]
fn a_closed_loop_against_no_server_pauses_between_connects() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("gram-bench-noserver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let queries = dir.join("q.txt");
    std::fs::write(&queries, "oak desk\n").unwrap();
    let out = dir.join("out");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_gram"))
        .args([
            "bench",
            "--url",
            &format!("http://127.0.0.1:{port}"),
            "--queries",
        ])
        .arg(&queries)
        .args(["--concurrency", "2", "--duration", "1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let csv = std::fs::read_to_string(out.join("latencies.csv")).unwrap();
    let statuses: Vec<String> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap().to_string())
        .collect();
    // 2 clients × (1 s / 10 ms) at most, with room for a slow host; thousands without a pause.
    assert!(
        !statuses.is_empty() && statuses.len() <= 250,
        "{} attempts",
        statuses.len()
    );
    assert!(statuses.iter().all(|s| s == "connect"), "{statuses:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server and what a `gram bench` against it needs: a scratch directory `gram-NAME-PID`
/// holding a query file of `queries`, the `--out` directory in it, and the arguments
/// (`bench --url … --queries … FLAGS --out …`).
async fn bench_fixture(
    name: &str,
    queries: &str,
    flags: &[&str],
) -> (Server, PathBuf, PathBuf, Vec<String>) {
    let server = start(&[]).await;
    let url = format!("http://{}", server.addr());
    let dir = std::env::temp_dir().join(format!("gram-{name}-{}", std::process::id()));
    let file = dir.join("q.txt");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&file, queries).unwrap();
    let out = dir.join("out");
    let mut args: Vec<String> = ["bench", "--url", &url, "--queries", file.to_str().unwrap()]
        .map(String::from)
        .to_vec();
    args.extend(flags.iter().map(|f| f.to_string()));
    args.extend(["--out".to_string(), out.to_str().unwrap().to_string()]);
    (server, dir, out, args)
}

/// `gram bench`'s open loop against a real server: every scheduled request is sent and
/// answered, each at its place in the schedule (`sent_s` is the scheduled time, i / rate; the
/// schedule now sleeps on a thread of its own, not on tokio's millisecond timer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_open_loop_sends_its_schedule() {
    let (server, dir, out, args) = bench_fixture(
        "openloop",
        "oak desk\ngreen velvet sofa\nhp toner\n",
        &["--rate", "100", "--count", "20", "--k", "3"],
    )
    .await;
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_gram"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["mode"], "open");
    assert_eq!(report["requests"], 20);
    assert_eq!(report["ok"], 20, "{report}");
    let csv = std::fs::read_to_string(out.join("latencies.csv")).unwrap();
    let sent: Vec<f64> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(sent.len(), 20);
    for (i, s) in sent.iter().enumerate() {
        assert!(
            (s - i as f64 / 100.0).abs() < 1e-6,
            "request {i} scheduled at {s}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
    server.shutdown().await.unwrap();
}

/// An open loop against a server that answers one connection at a time, each after 50 ms:
/// request i (scheduled at 10·i ms) cannot be answered before 50·(i + 1) ms, so its latency,
/// counted from its scheduled time, is at least 50 + 40·i ms. A generator that waited for an
/// answer before sending the next request, timing each from its actual send, measured a flat
/// ~50 ms: the queue it built would be missing from its latencies (coordinated omission).
/// The bound is a floor the server's sleeps make, whatever the machine's load.
#[test]
fn the_load_generator_open_loop_counts_the_queue_it_meets() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let n = 10;
    let server = std::thread::spawn(move || {
        for _ in 0..n {
            let (mut conn, _) = listener.accept().unwrap();
            // The request: its head, then as many body bytes as it says.
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let body_len = loop {
                let k = conn.read(&mut buf).unwrap();
                assert!(k > 0, "the client closed mid-request");
                got.extend_from_slice(&buf[..k]);
                if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    break end + 4 + len;
                }
            };
            while got.len() < body_len {
                let k = conn.read(&mut buf).unwrap();
                assert!(k > 0, "the client closed mid-body");
                got.extend_from_slice(&buf[..k]);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            let body = "{}";
            write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
    });
    let dir = std::env::temp_dir().join(format!("gram-stub-openloop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let queries = dir.join("q.txt");
    std::fs::write(&queries, "oak desk\n").unwrap();
    let out = dir.join("out");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_gram"))
        .args(["bench", "--url", &format!("http://{addr}"), "--queries"])
        .arg(&queries)
        .args([
            "--rate",
            "100",
            "--count",
            &n.to_string(),
            "--timeout-s",
            "30",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    server.join().unwrap();
    let csv = std::fs::read_to_string(out.join("latencies.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), n);
    for (i, row) in rows.iter().enumerate() {
        let (sent_s, latency_ms, lag_ms): (f64, f64, f64) = (
            row[0].parse().unwrap(),
            row[1].parse().unwrap(),
            row[6].parse().unwrap(),
        );
        assert_eq!(row[2], "200", "request {i}: {row:?}");
        assert!(
            (sent_s - i as f64 / 100.0).abs() < 1e-6,
            "request {i}: {row:?}"
        );
        assert!(lag_ms.is_finite() && lag_ms >= 0.0, "request {i}: {row:?}");
        // 0.5 ms of slack for the printed rounding and the timers' granularity.
        let floor = 50.0 + 40.0 * i as f64 - 0.5;
        assert!(
            latency_ms >= floor,
            "request {i}: {latency_ms} ms, under the {floor} ms its place in the queue takes"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An open loop shorter than one interval sends one request and reports it over its interval
/// (it reported 100/s for one request at `--rate 1 --duration 0.01`), and a reader that left
/// its standard output costs the printed copy only: the report was printed first, the
/// broken pipe panicked, and `--out` was never written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_reports_short_windows_and_survives_a_closed_stdout() {
    let (server, dir, out, args) = bench_fixture(
        "benchpipe",
        "oak desk\n",
        &["--rate", "5", "--duration", "0.01", "--warmup", "0"],
    )
    .await;
    let status = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gram"))
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["requests"], 1, "{report}");
    assert_eq!(report["window_s"], 0.2, "{report}");
    assert_eq!(report["sent_qps"], 5.0, "{report}");
    assert!(out.join("latencies.csv").exists() && out.join("latency.svg").exists());
    std::fs::remove_dir_all(&dir).unwrap();
    server.shutdown().await.unwrap();
}

/// A request whose headers came before the shutdown and whose body comes after it is still
/// answered: the grace covers the body timeout, then the deadline, then the write (it used to be
/// the deadline alone, and the connection was closed unanswered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_a_request_whose_body_is_still_arriving() {
    use std::io::Write;
    let server = start(&["--timeout-ms", "300", "--body-timeout-ms", "5000"]).await;
    let addr = server.addr();
    let body = br#"{"query": "oak desk", "k": 2}"#;
    let head = format!(
        "POST /v1/search HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let mut s = raw(addr, head.as_bytes());
    s.write_all(&body[..5]).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let stopping = tokio::spawn(server.shutdown());
    // Past the old grace (timeout + 1 s), within the body timeout.
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    s.write_all(&body[5..]).unwrap();
    let answer = read_until_closed(s, "the body sent after the shutdown began").await;
    stopping.await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// When the batcher is gone (`fail_all`), the queue-depth and in-flight gauges read zero, not
/// the load it held.
#[test]
fn the_gauges_read_zero_once_the_batcher_is_gone() {
    use gram::server::batcher::{fail_all, Job, Queue};
    use std::time::{Duration, Instant};
    let engine = Engine::open(index(), None, &gram::LoadOptions::default()).unwrap();
    let metrics = std::sync::Arc::new(gram::server::metrics::Metrics::default());
    let q = Queue::new(8, metrics.clone());
    let mut answers = Vec::new();
    for _ in 0..3 {
        let (reply, answer) = tokio::sync::oneshot::channel();
        answers.push(answer);
        let job = Job {
            prepared: engine.prepare(Request::new("oak desk")).unwrap(),
            reply,
            enqueued: Instant::now(),
            deadline: Instant::now() + Duration::from_secs(10),
        };
        q.push(job).unwrap();
    }
    metrics.set_in_flight(2);
    let gauge = |name: &str| -> f64 {
        let text = metrics.render();
        parse_prometheus(&text)[name]
    };
    assert_eq!(
        (gauge("gram_queue_depth"), gauge("gram_in_flight")),
        (3.0, 2.0)
    );
    fail_all(&q);
    assert_eq!(
        (gauge("gram_queue_depth"), gauge("gram_in_flight")),
        (0.0, 0.0)
    );
    for mut a in answers {
        assert!(
            matches!(a.try_recv(), Ok(Err(_))),
            "every queued job is answered"
        );
    }
}

/// A model whose tokenizer fails on some text (a regex pre-tokenizer past oniguruma's
/// backtracking limit; found by fuzzing: the connection was dropped with no answer): such a
/// query is a JSON 500 of kind `tokenizer`, and the server goes on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_the_tokenizer_fails_on_is_a_json_error() {
    let model = copy_model(&model_dir("tiny-llama"), "server-backtracking-model");
    let path = model.join("tokenizer.json");
    let mut tok: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tok["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
    ]});
    std::fs::write(&path, tok.to_string()).unwrap();
    let lines: Vec<String> = ["sofa", "chair", "lamp"]
        .iter()
        .enumerate()
        .map(|(i, k)| json!({"id": format!("p{i}"), "title": k, "codes": [k]}).to_string())
        .collect();
    let ix = build_index_with(&fresh_dir("server-backtracking-index"), &model, &lines);
    let i = ix.to_str().unwrap();
    let argv = [
        "serve",
        "--index",
        i,
        "--addr",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--device",
        "cpu",
    ];
    let server = Server::start(Cli::parse_from(argv).serve.config().unwrap())
        .await
        .unwrap();
    let addr = server.addr();
    let bad = format!("{}b", "a".repeat(40));
    let a = post(addr, "/v1/search", json!({"query": bad})).await;
    assert_eq!(a.status, 500, "{}", a.text());
    assert_eq!(a.json()["error"]["kind"], "tokenizer", "{}", a.text());
    let a = post(addr, "/v1/search", json!({"query": "green sofa"})).await;
    assert_eq!(a.status, 200, "{}", a.text());
    server.shutdown().await.unwrap();
}
