//! The HTTP handlers and their request and response types. A handler parses and validates its
//! input, prepares the request with the engine (tokenization: bad input stops here, as a 4xx,
//! before the batcher sees it), queues it and awaits its answer until the deadline.
//!
//! Every error is a JSON body `{"error": {"kind": K, "message": M}}` with a stable `kind`:
//!
//! | status | kind | when |
//! |---|---|---|
//! | 400 | `invalid_json` | the body is not JSON |
//! | 400 | `invalid_utf8` | the body or a query-string value is not UTF-8 |
//! | 400 | `invalid_request` | a field is missing, unknown, or of the wrong type (`null` for `k` or `beam` means the default); the body is an array |
//! | 400 | `invalid_body` | the body could not be read |
//! | 404 | `not_found` | no such endpoint |
//! | 405 | `method_not_allowed` | wrong method for the endpoint (`Allow` set) |
//! | 408 | `request_timeout` | the body did not arrive within `--body-timeout-ms` (see [`super::conn`]) |
//! | 413 | `payload_too_large` | the body is over `--max-body-bytes` |
//! | 415 | `unsupported_media_type` | a body that is not `application/json`, or is compressed (`Content-Encoding`) |
//! | 501 | `unsupported_transfer_encoding` | a `Transfer-Encoding` coding other than `chunked` (`gzip, chunked`) |
//! | 422 | `input` | the engine refuses a value: empty or oversize query (bytes, tokens), `k` or `beam` out of range (in a query string, also one too large to parse) |
//! | 503 | `overloaded` | the queue is full, or too long to wait in (`Retry-After` set) |
//! | 503 | `not_ready` | the engine is still loading (`Retry-After` set) |
//! | 503 | `shutting_down` | the server is stopping |
//! | 503 | `stalled` | `/ready` only: requests are waiting and the engine has made no progress for longer than `--timeout-ms` plus the gathering window (a step or scoring that does not return) |
//! | 504 | `timeout` | the deadline (`--timeout-ms`) passed |
//! | 500 | the engine's `Error::kind` (`tokenizer`, `io`, ...) or `internal` | the engine failed |

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, RawQuery, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response as HttpResponse};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::search::{CodeHit, ProductHit, Request, Timings};

use super::batcher::{Failed, Job, Refusal};
use super::metrics::Endpoint;
use super::AppState;

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

/// The error kind of a response, left in its extensions for the metrics middleware.
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind(pub &'static str);

impl ApiError {
    pub(super) fn new(
        status: StatusCode,
        kind: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    fn retry(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }

    fn bad(kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, kind, message)
    }

    /// An engine error: the caller's input (422), or the engine's failure (500).
    fn engine(kind: &'static str, message: String) -> ApiError {
        let status = if kind == "input" {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            tracing::error!(kind, %message, "engine error");
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError::new(status, kind, message)
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> ApiError {
        ApiError::engine(e.kind(), e.client_message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> HttpResponse {
        let body = serde_json::json!({"error": {"kind": self.kind, "message": self.message}});
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r.extensions_mut().insert(ErrorKind(self.kind));
        r
    }
}

/// `POST /v1/search`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchBody {
    query: String,
    k: Option<Count>,
    beam: Option<Count>,
}

/// `POST /v1/codes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CodesBody {
    query: String,
    beam: Option<Count>,
}

/// A JSON count (`k`, `beam`): a non-negative integer, or one too large for `usize` (kept as
/// written), which is out of range (422, as `GET /search` and the engine say of one over the
/// limit), not malformed. A negative or fractional number is malformed (400).
#[derive(Debug)]
enum Count {
    Is(usize),
    TooLarge(String),
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        let n = serde_json::Number::deserialize(d)?;
        if let Some(u) = n.as_u64() {
            return Ok(
                usize::try_from(u).map_or_else(|_| Count::TooLarge(n.to_string()), Count::Is)
            );
        }
        // serde_json reads an integer past u64 as a float (to the nearest f64): 2^64 and up
        // is such an integer, named in digits (in powers of ten past 1e21).
        match n.as_f64() {
            Some(f) if f >= 18_446_744_073_709_551_616.0 => Ok(Count::TooLarge(if f < 1e21 {
                format!("{f:.0}")
            } else {
                format!("{f:e}")
            })),
            _ => Err(serde::de::Error::custom(format!(
                "expected a non-negative integer, not {n}"
            ))),
        }
    }
}

impl Count {
    /// The count, or the 422 of one too large for the limit `max` of field `name`.
    fn value(self, name: &str, max: usize) -> Result<usize, ApiError> {
        match self {
            Count::Is(n) => Ok(n),
            Count::TooLarge(text) => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "input",
                format!("{name}: {text} is out of range (1..={max})"),
            )),
        }
    }
}

impl AppState {
    /// A request for `query` with the default `k` (300) and `beam` (10), lowered to the
    /// server's limits.
    fn request(&self, query: String) -> Request {
        let l = &self.config.limits;
        let d = Request::new(query);
        Request {
            k: d.k.min(l.max_k),
            beam: d.beam.min(l.max_beam),
            ..d
        }
    }
}

/// What a search answers: the engine's response, with the server's own timings added.
#[derive(Serialize)]
struct Reply<'a> {
    query: &'a str,
    codes: &'a [CodeHit],
    #[serde(skip_serializing_if = "Option::is_none")]
    products: Option<&'a [ProductHit]>,
    timings_ms: ReplyTimings<'a>,
    /// Decoder steps the request took part in.
    steps: usize,
}

#[derive(Serialize)]
struct ReplyTimings<'a> {
    #[serde(flatten)]
    engine: &'a Timings,
    /// Waiting in the queue for the batch.
    queue: f64,
    /// In the server, from the request's arrival to its answer (serialization excluded).
    server: f64,
}

pub async fn search_post(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<HttpResponse, ApiError> {
    let t0 = Instant::now();
    let b: SearchBody = json_body(&headers, body)?;
    let l = &state.config.limits;
    let mut request = state.request(b.query);
    if let Some(k) = b.k {
        request.k = k.value("k", l.max_k)?;
    }
    if let Some(beam) = b.beam {
        request.beam = beam.value("beam", l.max_beam)?;
    }
    run(&state, request, t0).await
}

pub async fn codes_post(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<HttpResponse, ApiError> {
    let t0 = Instant::now();
    let b: CodesBody = json_body(&headers, body)?;
    let mut request = state.request(b.query);
    if let Some(beam) = b.beam {
        request.beam = beam.value("beam", state.config.limits.max_beam)?;
    }
    request.codes_only = true;
    run(&state, request, t0).await
}

/// `GET /search?q=TEXT[&k=K][&beam=B]`.
pub async fn search_get(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<HttpResponse, ApiError> {
    let t0 = Instant::now();
    let mut request = state.request(String::new());
    let mut q = None;
    let mut seen: Vec<String> = Vec::new();
    for pair in query.as_deref().unwrap_or("").split('&') {
        if pair.is_empty() {
            continue;
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name)?;
        let value = percent_decode(value)?;
        if seen.contains(&name) {
            return Err(ApiError::bad(
                "invalid_request",
                format!("parameter `{name}` given twice"),
            ));
        }
        // A number too large for `usize` is out of range, as the engine says of one over the
        // limit (422), not malformed.
        // Digits only: Rust's parser also takes a sign (`k=%2B5` read as 5), which JSON does not.
        let number = |v: &str, max: usize| {
            v.parse::<usize>()
                .ok()
                .filter(|_| !v.starts_with('+'))
                .ok_or(())
                .map_err(|_| {
                    // Named clipped: a 5,000-digit value was echoed whole.
                    let shown = crate::tokenizer::clip(v);
                    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
                        ApiError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "input",
                            format!("{name}: {shown} is out of range (1..={max})"),
                        )
                    } else {
                        ApiError::bad(
                            "invalid_request",
                            format!("{name}: `{shown}` is not a non-negative integer"),
                        )
                    }
                })
        };
        let l = &state.config.limits;
        match name.as_str() {
            "q" => q = Some(value),
            "k" => request.k = number(&value, l.max_k)?,
            "beam" => request.beam = number(&value, l.max_beam)?,
            other => {
                return Err(ApiError::bad(
                    "invalid_request",
                    format!("unknown parameter `{other}`, expected one of `q`, `k`, `beam`"),
                ))
            }
        }
        seen.push(name);
    }
    request.query = q.ok_or_else(|| ApiError::bad("invalid_request", "missing parameter `q`"))?;
    run(&state, request, t0).await
}

/// `{"status":"ok"}` while the process is up, with the backend (`"backend": {"backend":
/// "cpu"}` or `{"backend": "cuda", "device": <GPU name>}`) once the engine has opened.
pub async fn health(State(state): State<Arc<AppState>>) -> HttpResponse {
    let mut body = serde_json::json!({"status": "ok"});
    if let Some(info) = state.backend.get() {
        body["backend"] = serde_json::to_value(info).unwrap_or_default();
    }
    axum::Json(body).into_response()
}

pub async fn ready(State(state): State<Arc<AppState>>) -> Result<HttpResponse, ApiError> {
    if state.shutting_down.load(Ordering::Relaxed) || state.queue.is_closed() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is stopping",
        ));
    }
    state.engine()?;
    // A wedged engine (a step that never returns, a device that hangs instead of failing)
    // answers nothing, but the process is up: a load balancer must stop sending it traffic.
    // Past the request deadline (and the gathering window) every request waiting has timed out.
    let limit = state.config.timeout + state.config.batch_wait;
    if let Some(since) = state.queue.stalled(limit) {
        // Once a stall, not at every probe.
        if !state.stall_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                no_progress_ms = since.as_millis() as u64,
                "the engine has made no progress with requests waiting"
            );
        }
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stalled",
            format!(
                "no progress of the engine for {} ms with requests waiting (a decoder step or \
                 scoring that does not return)",
                since.as_millis()
            ),
        ));
    }
    if state.stall_logged.swap(false, Ordering::Relaxed) {
        tracing::info!("the engine moves on again: ready");
    }
    Ok(axum::Json(serde_json::json!({"status": "ready"})).into_response())
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> HttpResponse {
    let ct = "text/plain; version=0.0.4; charset=utf-8";
    ([(header::CONTENT_TYPE, ct)], state.metrics.render()).into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// 405 for an endpoint that takes only POST, with the `Allow` header HTTP asks for.
pub async fn post_only() -> HttpResponse {
    not_allowed("POST")
}

/// 405 for an endpoint that takes only GET (and so HEAD).
pub async fn get_only() -> HttpResponse {
    not_allowed("GET, HEAD")
}

fn not_allowed(allow: &'static str) -> HttpResponse {
    let mut r = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this endpoint takes {allow}"),
    )
    .into_response();
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// The status a request whose client left before its answer is counted under (nginx's
/// "client closed request"; never sent).
pub const CLIENT_CLOSED: u16 = 499;

/// Counts a request whose handler is dropped unfinished (hyper drops it when its client closes
/// the connection) as [`CLIENT_CLOSED`], with its time so far: under overload the clients that
/// gave up are the slow tail, and the latency histograms would otherwise leave them out.
struct Abandoned<'a> {
    state: &'a AppState,
    endpoint: Endpoint,
    t: Instant,
    id: &'a HeaderValue,
    method: &'a axum::http::Method,
    answered: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if !self.answered {
            let m = &self.state.metrics;
            // Dropped by a shutdown that closed the connections past its grace: the server
            // gave up on it, not its client.
            let (status, kind) = if self.state.closing_connections.load(Ordering::SeqCst) {
                (503, "shutdown_closed")
            } else {
                (CLIENT_CLOSED, "client_closed")
            };
            let seconds = self.t.elapsed().as_secs_f64();
            m.record_request(self.endpoint, status, seconds);
            m.record_failure(kind);
            tracing::debug!(
                target: "gram::server::access",
                id = self.id.to_str().unwrap_or_default(),
                method = %self.method,
                endpoint = self.endpoint.label(),
                status,
                kind,
                ms = seconds * 1e3,
            );
        }
    }
}

/// The header that names a request in logs, echoed on its answer.
pub const REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// Longest client-given request id kept.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// The request's id: the client's `x-request-id` when it is 1–[`MAX_REQUEST_ID_BYTES`] bytes
/// of visible ASCII (no spaces or controls, so it logs and echoes as given), else one of ours:
/// this process's start (microseconds since the epoch, hex) and a sequence number, unique
/// across restarts.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    use std::sync::atomic::AtomicU64;
    use std::sync::OnceLock;
    static START: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let given = headers.get(&REQUEST_ID).filter(|v| {
        let b = v.as_bytes();
        (1..=MAX_REQUEST_ID_BYTES).contains(&b.len()) && b.iter().all(|c| c.is_ascii_graphic())
    });
    if let Some(v) = given {
        return v.clone();
    }
    let start = START.get_or_init(|| {
        let us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        format!("{us:x}")
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    HeaderValue::from_str(&format!("{start}-{n}"))
        .expect("hex digits and a dash are a header value")
}

/// Counts and times every request by endpoint and status (those whose client left first as
/// [`CLIENT_CLOSED`]), and error responses by kind; gives every answer its request's id
/// ([`request_id`]) and logs one line a request at debug level (`RUST_LOG=info,
/// gram::server::access=debug`).
pub async fn track(
    State(state): State<Arc<AppState>>,
    request: HttpRequest,
    next: Next,
) -> HttpResponse {
    let t = Instant::now();
    let id = request_id(request.headers());
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>();
    let endpoint = Endpoint::of_route(route.map(|m| m.as_str()));
    let mut abandoned = Abandoned {
        state: &state,
        endpoint,
        t,
        id: &id,
        method: &method,
        answered: false,
    };
    let in_flight = state.metrics.http_request_started();
    let mut response = next.run(request).await;
    drop(in_flight);
    abandoned.answered = true;
    drop(abandoned);
    let status = response.status().as_u16();
    let seconds = t.elapsed().as_secs_f64();
    state.metrics.record_request(endpoint, status, seconds);
    let kind = response.extensions().get::<ErrorKind>().map(|k| k.0);
    if let Some(kind) = kind {
        state.metrics.record_failure(kind);
    }
    tracing::debug!(
        target: "gram::server::access",
        id = id.to_str().unwrap_or_default(),
        %method,
        endpoint = endpoint.label(),
        status,
        kind = kind.unwrap_or(""),
        ms = seconds * 1e3,
    );
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

/// Most seconds a refused client is told to stay away for a wait the queue estimated: the
/// estimate divides by the measured rate, which one stalled step can make tiny.
const MAX_RETRY_AFTER_S: u64 = 60;

/// `Retry-After` of a refusal for a wait of `wait_ms`: that wait in whole seconds when it is
/// longer than the configured `retry_after_s`, at most [`MAX_RETRY_AFTER_S`] (never below the
/// configured value).
fn retry_after(retry_after_s: u64, wait_ms: u64) -> u64 {
    retry_after_s.max(wait_ms.div_ceil(1000).min(MAX_RETRY_AFTER_S))
}

/// The 503 a queue's refusal answers.
fn refused(state: &AppState, refusal: Refusal) -> ApiError {
    match refusal {
        Refusal::Full => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "the queue is full ({} requests waiting): retry later",
                state.config.max_queue
            ),
        )
        .retry(state.config.retry_after_s),
        Refusal::TooLong { wait_ms } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "the queue is too long: a request now would wait about {wait_ms} ms (over \
                 --max-queue-wait-ms {}): retry later",
                state.config.max_queue_wait.as_millis()
            ),
        )
        .retry(retry_after(state.config.retry_after_s, wait_ms)),
        Refusal::Closed => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is stopping",
        ),
    }
}

/// Prepares `request`, queues it, and awaits its answer until the deadline.
async fn run(state: &AppState, request: Request, t0: Instant) -> Result<HttpResponse, ApiError> {
    let engine = state.engine()?;
    // Under overload most requests are refused: before tokenizing them, so that the refusals
    // take as little of the cores the batch runs on as they can.
    if let Some(refusal) = state.queue.refuses_now() {
        return Err(refused(state, refusal));
    }
    let codes_only = request.codes_only;
    // Tokenization runs here, on the handler's thread: a bug there answers 500 `internal`
    // (with a body) instead of dropping the connection.
    let prepared =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.prepare(request)))
            .map_err(|_| {
                tracing::error!("preparing a request panicked: this is a bug");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "preparing the request failed",
                )
            })??;
    let deadline = t0 + state.config.timeout;
    let (reply, answer) = oneshot::channel();
    let job = Job {
        prepared,
        reply,
        enqueued: Instant::now(),
        deadline,
    };
    if let Err(refusal) = state.queue.push(job) {
        return Err(refused(state, refusal));
    }
    let timeout = || {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("no answer within {} ms", state.config.timeout.as_millis()),
        )
    };
    let done = match tokio::time::timeout_at(deadline.into(), answer).await {
        Err(_) => return Err(timeout()),
        Ok(Err(_)) => {
            return Err(ApiError::engine(
                "internal",
                "the batcher dropped the request".into(),
            ))
        }
        Ok(Ok(Err(Failed::Timeout))) => return Err(timeout()),
        Ok(Ok(Err(Failed::Engine { kind, message }))) => {
            return Err(ApiError::engine(kind, message))
        }
        Ok(Ok(Ok(done))) => done,
    };
    let r = &done.response;
    let reply = Reply {
        query: &r.query,
        codes: &r.codes,
        products: (!codes_only).then_some(&r.products[..]),
        timings_ms: ReplyTimings {
            engine: &r.timings_ms,
            queue: done.queue_s * 1e3,
            server: t0.elapsed().as_secs_f64() * 1e3,
        },
        steps: r.steps,
    };
    let body = serde_json::to_vec(&reply)
        .map_err(|e| ApiError::engine("internal", format!("serializing the answer: {e}")))?;
    // The body's `timings_ms.server` stops before the body is written; the header's `server`
    // includes writing it (W3C Server-Timing, milliseconds).
    let t = &r.timings_ms;
    let engine_ms = t.tokenize + t.prefill + t.decode + t.postings + t.scoring;
    let timing = format!(
        "queue;dur={:.3}, engine;dur={engine_ms:.3}, server;dur={:.3}",
        done.queue_s * 1e3,
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (header::HeaderName::from_static("server-timing"), timing),
        ],
        body,
    )
        .into_response())
}

/// The POST endpoints whose bodies are JSON (their headers are checked before the body is read:
/// [`json_headers`]).
pub const JSON_ROUTES: [&str; 2] = ["/v1/search", "/v1/codes"];

/// A JSON body's headers: `Content-Type` JSON, no `Content-Encoding` but `identity` (415
/// otherwise). Checked before the body is read (`conn::body_deadline`), so that a wrong type is
/// refused at once, with no `100 Continue` and no wait for a body that will be refused anyway.
pub fn json_headers(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = match headers.get(header::CONTENT_TYPE) {
        None => "",
        Some(v) => v.to_str().unwrap_or("(not ASCII)"),
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime != "application/json" && !(mime.starts_with("application/") && mime.ends_with("+json"))
    {
        let got = if ct.is_empty() { "none" } else { ct };
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("expected Content-Type: application/json, got {got}"),
        ));
    }
    // A transfer coding before `chunked` (hyper reads `chunked` and refuses one after it, but
    // passes `gzip, chunked` through as if it were plain): RFC 9112's 501 for a coding the
    // server does not implement, not a body misread.
    for te in headers.get_all(header::TRANSFER_ENCODING) {
        let te = te.to_str().unwrap_or("(not ASCII)");
        if let Some(coding) = te
            .split(',')
            .map(str::trim)
            .find(|c| !c.eq_ignore_ascii_case("chunked"))
        {
            return Err(ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "unsupported_transfer_encoding",
                format!("Transfer-Encoding {coding} is not supported: send the body chunked or with a Content-Length"),
            ));
        }
    }
    // A compressed body would otherwise fail as "not UTF-8" or "not JSON".
    if let Some(enc) = headers.get(header::CONTENT_ENCODING) {
        let enc = enc.to_str().unwrap_or("(not ASCII)").trim();
        if !enc.eq_ignore_ascii_case("identity") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("Content-Encoding {enc} is not supported: send the body uncompressed"),
            ));
        }
    }
    Ok(())
}

/// A JSON body of type `T`: content type, size, UTF-8, syntax and fields checked, each with its
/// own error.
fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    json_headers(headers)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is too large: {}", e.body_text()),
            )
        } else {
            ApiError::bad("invalid_body", e.body_text())
        }
    })?;
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::bad("invalid_utf8", format!("the body is not UTF-8: {e}")))?;
    // serde also reads a struct from an array of its fields in order (`["sofa", 10]`), which
    // is no form of this API.
    if text.trim_start().starts_with('[') {
        return Err(ApiError::bad(
            "invalid_request",
            "the body must be a JSON object, not an array",
        ));
    }
    serde_json::from_str(text).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::bad("invalid_request", e.to_string()),
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::bad("invalid_json", format!("the body is not valid JSON: {e}"))
            }
        }
    })
}

/// Decodes a query-string component: `+` is a space, `%XX` a byte; the result must be UTF-8.
fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                // Two hex digits: `from_str_radix` alone would also take `+2`.
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ApiError::bad(
                            "invalid_request",
                            format!("bad percent-escape in `{}`", crate::tokenizer::clip(s)),
                        )
                    })?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| {
        let s = crate::tokenizer::clip(s);
        ApiError::bad("invalid_utf8", format!("`{s}` does not decode to UTF-8"))
    })
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    /// The estimated wait in whole seconds, between the configured value and the cap (the
    /// estimate divides by a measured rate that one stalled step can make tiny: 33,000 s).
    #[test]
    fn retry_after_follows_the_estimated_wait_within_bounds() {
        use super::{retry_after, MAX_RETRY_AFTER_S};
        assert_eq!(retry_after(1, 200), 1);
        assert_eq!(retry_after(1, 2_300), 3);
        assert_eq!(retry_after(5, 2_300), 5);
        assert_eq!(retry_after(1, 33_000_000), MAX_RETRY_AFTER_S);
        assert_eq!(retry_after(120, 33_000_000), 120);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("green+velvet%20sofa").unwrap(),
            "green velvet sofa"
        );
        assert_eq!(percent_decode("caf%C3%A9").unwrap(), "café");
        assert_eq!(percent_decode("%FF").unwrap_err().kind, "invalid_utf8");
        assert_eq!(percent_decode("%G1").unwrap_err().kind, "invalid_request");
        assert_eq!(percent_decode("%4").unwrap_err().kind, "invalid_request");
        assert_eq!(percent_decode("%").unwrap_err().kind, "invalid_request");
        // `u8::from_str_radix` takes a sign: `%+2` is not an escape.
        assert_eq!(
            percent_decode("oak%+20").unwrap_err().kind,
            "invalid_request"
        );
        assert_eq!(percent_decode("%-1").unwrap_err().kind, "invalid_request");
    }
}
