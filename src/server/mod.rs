//! `gram serve`: the whole GRAM path over HTTP (axum on tokio), batched, observable, and safe
//! under load. Three actors, their queue and one metrics file:
//!
//! - [`api`]: the handlers. They parse and validate, prepare the request with the engine
//!   (tokenization; bad input ends here as a 4xx) and queue it; a full queue answers 503 with
//!   `Retry-After` at once; each awaits its answer until its deadline (504 past it).
//! - [`queue`]: the bounded queue in front of the batch (by depth, and by how long a job would
//!   wait for a place at the batch's recent service rate).
//! - [`batcher`]: one dedicated thread that owns the engine's continuous batch and admits
//!   queued requests between decoder steps; the requests whose codes are done go to a few
//!   scoring threads (postings, S_rele, top K), which send each answer back while the batch
//!   steps on.
//! - [`conn`]: the tokio side's accept loop: hyper's HTTP/1 connections with a header-read
//!   (and idle) timeout, a deadline on the request body, and a cap on open connections. On
//!   SIGINT/SIGTERM it stops accepting and lets every request in flight finish; then the batcher
//!   stops.
//! - [`metrics`]: every metric name, label and bucket, rendered for `GET /metrics`.
//!
//! Endpoints: `POST /v1/search`, `GET /search?q=`, `POST /v1/codes`, `GET /health`,
//! `GET /ready`, `GET /metrics` (see `docs/SERVER.md`).
//!
//! The model runs on the backend `--device` picks (the CPU, or CUDA: [`AnyEngine`]); the
//! batcher thread runs the engine's typed batch, everything else is the same on both.

pub mod api;
pub mod batcher;
pub mod conn;
pub mod metrics;
pub mod priority;
pub mod queue;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::oneshot;

use crate::backend::{Backend, Device};
use crate::model::LoadOptions;
use crate::search::{AnyEngine, BackendInfo, Engine, Limits, Request};

use self::api::ApiError;
use self::batcher::{BatcherConfig, Queue};
use self::conn::HttpOptions;
use self::metrics::Metrics;

/// `gram serve` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Index directory (`gram index build --out`).
    #[arg(long)]
    pub index: PathBuf,
    /// Model directory (default: the one that built the index; another one is refused).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Address to listen on (port 0: any free port, printed at startup).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Most requests in flight in one continuous batch (sharing decoder steps); the KV arena is
    /// sized for this many requests of the default beam. Default: 16 on the CPU (a step of 16
    /// queries already fills its cores), 64 on CUDA (a step of 64 costs about what a step of
    /// 16 does there).
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Most decoder rows (tokens) in one step: the prompt tokens of the requests joining it
    /// plus the beams of those running. A queued request waits until it fits (passed by later
    /// ones that fit for its first 50 ms, then by none); one that does not fit even alone runs
    /// alone. 0: no bound but `--max-batch`.
    #[arg(long, default_value_t = 0)]
    pub max_batch_rows: usize,
    /// Most requests waiting for the batch; past it, 503 with Retry-After at once.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Longest wait for a place in the batch a request may be queued for, in milliseconds: one
    /// that would wait longer (the queued requests that cannot enter at the next step / the
    /// batch's service rate: answers per second of stepping over the last 64 answers) gets 503
    /// with Retry-After at once, so that under overload admitted requests keep their latency;
    /// one that finds a free place in the batch is always taken (unless the queue's head has
    /// waited 50 ms for rows or arena: then no place counts as free), and while requests come
    /// slower than the batch answers them (the last 128) none is refused this way: a queue
    /// that builds up then drains by itself. 0: only --max-queue bounds the queue. The default,
    /// 1, admits no request past the free places on a model answering fewer than 1,000 a
    /// second, so under overload an admitted request waits only for the step in progress, as
    /// in a closed loop (docs/SERVER.md, "Sizing the queue").
    #[arg(long, default_value_t = 1)]
    pub max_queue_wait_ms: u64,
    /// Per-request deadline in milliseconds, from the end of its body (the body has its own
    /// --body-timeout-ms); past it, 504 (a request not yet admitted is dropped from the queue).
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Gathering window in microseconds: an idle batch waits this long (or until --max-batch
    /// requests are queued) before its first step. Requests that come while steps run join the
    /// next step anyway.
    #[arg(long, default_value_t = 0)]
    pub batch_wait_us: u64,
    /// Backend of the model: `cpu`, `cuda` (GPU 0; startup fails where there is none) or `auto`
    /// (CUDA when a GPU can run the model, else the CPU). The log, `/health` and
    /// `gram_backend_info` say which.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Compute threads of the model on the CPU (default: all cores; on the GPU it uses one).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Threads of the HTTP runtime.
    #[arg(long, default_value_t = 2)]
    pub http_threads: usize,
    /// Threads that score the requests whose codes are done (postings, S_rele, top K), beside
    /// the decoder steps.
    #[arg(long, default_value_t = 2)]
    pub score_threads: usize,
    /// Microseconds the model's idle worker threads keep spinning for the next step before
    /// they sleep (CPU). Longer keeps cores awake for the next request (a sleeping core of a
    /// virtual machine takes 50–80 us to wake); while requests come closer together than this,
    /// the workers never sleep and keep `--threads` - 1 cores busy. 0: sleep at once.
    #[arg(long, default_value_t = crate::backend::cpu::team::DEFAULT_SPIN.as_micros() as u64)]
    pub idle_spin_us: u64,
    /// Longest query, in bytes.
    #[arg(long, default_value_t = Limits::default().max_query_bytes)]
    pub max_query_bytes: usize,
    /// Most tokens a query may take.
    #[arg(long, default_value_t = Limits::default().max_query_tokens)]
    pub max_query_tokens: usize,
    /// Most products a request may ask for.
    #[arg(long, default_value_t = Limits::default().max_k)]
    pub max_k: usize,
    /// Widest beam a request may ask for.
    #[arg(long, default_value_t = Limits::default().max_beam)]
    pub max_beam: usize,
    /// Largest request body, in bytes (413 past it).
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// The Retry-After of a 503, in seconds.
    #[arg(long, default_value_t = 1)]
    pub retry_after_s: u64,
    /// Largest KV arena (MiB) the batch may allocate; a larger one (too many requests of too
    /// wide a beam) is refused at startup.
    #[arg(long, default_value_t = 8192)]
    pub max_kv_mib: usize,
    /// Longest wait for a request's line and headers, in milliseconds, and longest a kept-alive
    /// connection may sit idle between requests; past it the connection is closed.
    #[arg(long, default_value_t = 5_000)]
    pub header_timeout_ms: u64,
    /// Longest time a request's body may take to arrive once its headers are in, in
    /// milliseconds; past it, 408 and the connection is closed.
    #[arg(long, default_value_t = 5_000)]
    pub body_timeout_ms: u64,
    /// Longest an answer's write may stall (the client not reading it), in milliseconds; past
    /// it the connection is closed, and its slot of --max-connections freed.
    #[arg(long, default_value_t = 10_000)]
    pub write_timeout_ms: u64,
    /// Most connections open at once; at the cap no more are accepted until one closes (the
    /// others wait in the listen backlog). Keep it under the process's descriptor limit
    /// (`ulimit -n`).
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
}

/// Validated serving options.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub index: PathBuf,
    pub model: Option<PathBuf>,
    pub addr: SocketAddr,
    /// `None`: the backend's default ([`default_max_batch`]).
    pub max_batch: Option<usize>,
    /// Zero: no bound on a step's rows.
    pub max_batch_rows: usize,
    pub max_queue: usize,
    /// Zero: no wait bound.
    pub max_queue_wait: Duration,
    pub timeout: Duration,
    pub batch_wait: Duration,
    pub device: Device,
    pub threads: Option<usize>,
    pub http_threads: usize,
    pub score_threads: usize,
    /// How long the model's idle workers spin before they park: process-wide, set by [`run`]
    /// before the model loads (`backend::cpu::team::set_idle_spin`; an embedder calls it, and
    /// `set_yield_after_region(true)`, as `run` does).
    pub idle_spin: Duration,
    pub limits: Limits,
    pub max_body_bytes: usize,
    pub retry_after_s: u64,
    pub max_kv_mib: usize,
    /// Header, body and connection bounds of the HTTP side.
    pub http: HttpOptions,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Engine(#[from] crate::Error),
    #[error("the batcher thread panicked")]
    Panicked,
    #[error("the engine did not stop within {0:?} of shutdown")]
    Stuck(Duration),
}

impl ServeArgs {
    /// Checks every flag; the index and model are checked when the engine opens.
    pub fn config(&self) -> Result<ServeConfig, ServeError> {
        let bad = |m: String| Err(ServeError::Config(m));
        let addr: SocketAddr = match self.addr.parse() {
            Ok(a) => a,
            Err(e) => return bad(format!("--addr `{}`: {e} (expected IP:PORT)", self.addr)),
        };
        for (flag, v) in [
            ("--max-batch", self.max_batch.unwrap_or(1)),
            ("--max-queue", self.max_queue),
            ("--http-threads", self.http_threads),
            ("--score-threads", self.score_threads),
            ("--max-query-bytes", self.max_query_bytes),
            ("--max-query-tokens", self.max_query_tokens),
            ("--max-k", self.max_k),
            ("--max-beam", self.max_beam),
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-kv-mib", self.max_kv_mib),
            ("--threads", self.threads.unwrap_or(1)),
            ("--max-connections", self.max_connections),
            // 0 would tell refused clients to come back at once, into the same overload.
            ("--retry-after-s", self.retry_after_s as usize),
        ] {
            if v == 0 {
                return bad(format!("{flag} must be at least 1"));
            }
        }
        let most = tokio::sync::Semaphore::MAX_PERMITS;
        if self.max_connections > most {
            return bad(format!("--max-connections must be at most {most}"));
        }
        // Threads are made at start: an absurd count is an error, not an attempt.
        for (flag, v) in [
            ("--http-threads", self.http_threads),
            ("--score-threads", self.score_threads),
        ] {
            if v > 1024 {
                return bad(format!("{flag} {v} is out of range (1..=1024)"));
            }
        }
        for (flag, v) in [
            ("--timeout-ms", self.timeout_ms),
            ("--header-timeout-ms", self.header_timeout_ms),
            ("--body-timeout-ms", self.body_timeout_ms),
            ("--write-timeout-ms", self.write_timeout_ms),
        ] {
            if v == 0 {
                return bad(format!("{flag} must be at least 1"));
            }
        }
        if self.idle_spin_us > 1_000_000 {
            return bad(format!(
                "--idle-spin-us {} is out of range (0..=1000000)",
                self.idle_spin_us
            ));
        }
        if self.max_beam > crate::beam::MAX_BEAM {
            return bad(format!(
                "--max-beam {} is over the engine's {}",
                self.max_beam,
                crate::beam::MAX_BEAM
            ));
        }
        Ok(ServeConfig {
            index: self.index.clone(),
            model: self.model.clone(),
            addr,
            max_batch: self.max_batch,
            max_batch_rows: self.max_batch_rows,
            max_queue: self.max_queue,
            max_queue_wait: Duration::from_millis(self.max_queue_wait_ms),
            timeout: Duration::from_millis(self.timeout_ms),
            batch_wait: Duration::from_micros(self.batch_wait_us),
            device: self.device,
            threads: self.threads,
            http_threads: self.http_threads,
            score_threads: self.score_threads,
            idle_spin: Duration::from_micros(self.idle_spin_us),
            limits: Limits {
                max_query_bytes: self.max_query_bytes,
                max_query_tokens: self.max_query_tokens,
                max_k: self.max_k,
                max_beam: self.max_beam,
            },
            max_body_bytes: self.max_body_bytes,
            retry_after_s: self.retry_after_s,
            max_kv_mib: self.max_kv_mib,
            http: HttpOptions {
                header_timeout: Duration::from_millis(self.header_timeout_ms),
                body_timeout: Duration::from_millis(self.body_timeout_ms),
                write_timeout: Duration::from_millis(self.write_timeout_ms),
                max_connections: self.max_connections,
            },
        })
    }
}

/// What the handlers share.
pub struct AppState {
    /// Set once the engine is loaded (`/ready`).
    engine: OnceLock<Arc<AnyEngine>>,
    /// The backend the engine opened on (`/health`), set before its batch is made.
    backend: OnceLock<BackendInfo>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    config: ServeConfig,
    shutting_down: AtomicBool,
    /// Shutdown's grace ran out and it closed the connections still open: a request dropped
    /// then is the server's doing, not its client's (counted 503 `shutdown_closed`, not 499).
    closing_connections: AtomicBool,
    /// `/ready` has logged the stall it reports (a warning once a stall, not once a probe).
    stall_logged: AtomicBool,
}

impl AppState {
    fn engine(&self) -> Result<&AnyEngine, ApiError> {
        self.engine.get().map(|e| &**e).ok_or_else(|| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "not_ready",
            message: "the model and index are still loading".into(),
            retry_after: Some(self.config.retry_after_s),
        })
    }
}

/// The routes, with the body limit, the body deadline and the metrics middleware.
fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/v1/search",
            post(api::search_post).fallback(api::post_only),
        )
        .route("/v1/codes", post(api::codes_post).fallback(api::post_only))
        .route("/search", get(api::search_get).fallback(api::get_only))
        .route("/health", get(api::health).fallback(api::get_only))
        .route("/ready", get(api::ready).fallback(api::get_only))
        .route("/metrics", get(api::metrics).fallback(api::get_only))
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            conn::body_deadline,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::track,
        ))
        .with_state(state)
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Taken by [`Server::shutdown`].
    batcher: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
    /// Resolves when the batcher thread ends, however it ends (its sender goes with it).
    engine_gone: Option<oneshot::Receiver<()>>,
}

/// A server dropped without [`Server::shutdown`] (a test that failed half way, an embedder)
/// stops its engine too: dropping `stop` ends the HTTP side, and closing the queue lets the
/// batcher thread, its scorers, the model and the KV arena go once the queued work is done
/// (they waited on the queue for the rest of the process).
impl Drop for Server {
    fn drop(&mut self) {
        self.state.queue.close();
    }
}

impl Server {
    /// Binds `config.addr`, starts answering (`/health` at once, searches once the engine is
    /// loaded), opens the engine and its batch on the batcher thread, and returns when it is
    /// ready. An index or model that does not open is an error here.
    pub async fn start(config: ServeConfig) -> Result<Server, ServeError> {
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: config.addr,
                source,
            })?;
        let addr = listener.local_addr()?;
        let metrics = Arc::new(Metrics::default());
        let state = Arc::new(AppState {
            engine: OnceLock::new(),
            backend: OnceLock::new(),
            queue: Arc::new({
                let q = Queue::new(config.max_queue, metrics.clone());
                if config.max_queue_wait.is_zero() {
                    q
                } else {
                    q.with_wait_bound(config.max_queue_wait)
                }
            }),
            metrics,
            config: config.clone(),
            shutting_down: AtomicBool::new(false),
            closing_connections: AtomicBool::new(false),
            stall_logged: AtomicBool::new(false),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(state.clone());
        let http = tokio::spawn(conn::serve(
            listener,
            app,
            config.http,
            state.metrics.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        let (ready, loaded) = oneshot::channel();
        let (gone, engine_gone) = oneshot::channel::<()>();
        let batcher = {
            let state = state.clone();
            std::thread::Builder::new()
                .name("gram-batcher".into())
                .spawn(move || {
                    // Dropped when the thread ends, returning or unwinding.
                    let _gone = gone;
                    batcher_thread(state, ready)
                })?
        };
        let server = Server {
            addr,
            state,
            stop: Some(stop),
            http,
            batcher: Some(batcher),
            engine_gone: Some(engine_gone),
        };
        match loaded.await {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => {
                let _ = server.shutdown().await;
                Err(e)
            }
            Err(_) => {
                let e = server.shutdown().await.err();
                Err(e.unwrap_or(ServeError::Panicked))
            }
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `signal` completes, then shuts down gracefully. If the engine stops first
    /// (the batcher thread ended: a bug), it shuts down too and returns that error, so that the
    /// process exits and a supervisor restarts it rather than answering 503 forever.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<(), ServeError> {
        let gone = self.engine_gone.take();
        if let Stop::EngineGone = until_stopped(signal, gone).await {
            tracing::error!("the engine stopped: shutting down");
        }
        self.shutdown().await
    }

    /// Graceful shutdown: `/ready` turns 503, the gathering window ends, the listener closes,
    /// every request in flight is answered, then the batcher (its queue drained) stops.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        self.state.shutting_down.store(true, Ordering::Relaxed);
        self.state.queue.drain();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // An idle connection closes at once (one that has sent nothing yet too). One in the
        // middle of its request's headers may take the header timeout to finish them, and a
        // request whose headers are in is answered: its body may take up to the body timeout,
        // then its deadline runs (from the end of the body), then its answer is written (each
        // stall at most the write timeout). A connection still open past all of that (a client
        // stalled mid-request) does not hold the shutdown.
        let c = &self.state.config;
        let grace = c.http.header_timeout
            + c.http.body_timeout
            + c.timeout
            + c.http.write_timeout
            + Duration::from_secs(1);
        let served = match tokio::time::timeout(grace, &mut self.http).await {
            Ok(Ok(r)) => r.map_err(ServeError::from),
            Ok(Err(_)) => Err(ServeError::Panicked),
            Err(_) => {
                tracing::warn!("connections still open after the deadline: closing them");
                self.state.closing_connections.store(true, Ordering::SeqCst);
                self.http.abort();
                Ok(())
            }
        };
        self.state.queue.close();
        // The batcher ends once the requests it holds are answered, each within its deadline.
        // One that does not (a wedged device call) must not hold the process: past the bound
        // it is left behind (joined on a thread of its own, which the exit ends) and shutdown
        // fails.
        let bound = c.timeout + Duration::from_secs(10);
        let batcher = self.batcher.take();
        let (tx, joined) = oneshot::channel();
        std::thread::spawn(move || {
            if let Some(batcher) = batcher {
                let _ = tx.send(batcher.join());
            }
        });
        let batched = match tokio::time::timeout(bound, joined).await {
            Ok(Ok(joined)) => joined.map_err(|_| ServeError::Panicked)?,
            Ok(Err(_)) => return Err(ServeError::Panicked),
            Err(_) => {
                tracing::error!(?bound, "the engine did not stop: leaving it behind");
                return Err(ServeError::Stuck(bound));
            }
        };
        served.and(batched)
    }
}

/// Why serving stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Signal,
    EngineGone,
}

/// Waits for `signal`, or for the engine's thread to end (`gone` resolves when its sender,
/// held by that thread, is dropped).
async fn until_stopped(
    signal: impl Future<Output = ()>,
    gone: Option<oneshot::Receiver<()>>,
) -> Stop {
    let gone = async {
        match gone {
            Some(g) => {
                let _ = g.await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = signal => Stop::Signal,
        _ = gone => Stop::EngineGone,
    }
}

/// The batcher thread: opens the engine on the backend `--device` picks, then serves on it
/// (see [`serve_on`]).
fn batcher_thread(
    state: Arc<AppState>,
    ready: oneshot::Sender<Result<(), ServeError>>,
) -> Result<(), ServeError> {
    let c = &state.config;
    let load = LoadOptions {
        dtype: None,
        threads: c.threads,
    };
    let (engine, info) = match AnyEngine::open(c.device, &c.index, c.model.as_deref(), &load) {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return Ok(());
        }
    };
    let engine = Arc::new(engine.with_limits(c.limits));
    tracing::info!(backend = %info, device = ?c.device, "backend chosen");
    state.metrics.set_backend(&info);
    let _ = state.backend.set(info);
    match &*engine {
        AnyEngine::Cpu(typed) => serve_on(&state, &engine, typed, ready),
        AnyEngine::Cuda(typed) => serve_on(&state, &engine, typed, ready),
    }
}

/// `--max-batch` when not given: 16 on the CPU, 64 on CUDA. On the CPU a step's time grows with
/// its rows (16 queries already keep the cores busy); on a GPU a decoder step is latency-bound
/// and 64 queries cost little more than 16 (docs/PERF.md, serving on the H100).
pub fn default_max_batch(backend: &str) -> usize {
    if backend == "cuda" {
        64
    } else {
        16
    }
}

/// Sizes and makes the batch of `typed` (the engine `shared` holds), reports readiness, then
/// runs the batch loop until the queue closes.
fn serve_on<B: Backend>(
    state: &Arc<AppState>,
    shared: &Arc<AnyEngine>,
    engine: &Engine<B>,
    ready: oneshot::Sender<Result<(), ServeError>>,
) -> Result<(), ServeError> {
    let c = &state.config;
    let max_batch = c
        .max_batch
        .unwrap_or_else(|| default_max_batch(engine.model().backend.name()));
    state.queue.set_max_batch(max_batch);
    let arena_entries = match batcher::arena_entries(engine, max_batch, Request::new("").beam) {
        Ok(n) => n,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return Ok(());
        }
    };
    let cfg = &engine.model().config;
    // f32 keys and values (on either backend): layers × (K, V) × KV heads × head dim.
    let entry_bytes = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4;
    let arena_mib = arena_entries.saturating_mul(entry_bytes) as f64 / (1 << 20) as f64;
    if arena_mib > c.max_kv_mib as f64 {
        let _ = ready.send(Err(ServeError::Config(format!(
            "the KV arena for --max-batch {} would take {arena_mib:.0} MiB, over --max-kv-mib {}: \
             lower --max-batch, --max-beam or --max-query-tokens, or raise --max-kv-mib",
            max_batch, c.max_kv_mib
        ))));
        return Ok(());
    }
    tracing::info!(
        model = %engine.model_dir().display(),
        backend = engine.model().backend.name(),
        products = engine.index().num_products(),
        codes = engine.index().num_codes(),
        arena_entries,
        arena_mib,
        max_batch,
        max_batch_rows = c.max_batch_rows,
        "engine loaded"
    );
    let config = BatcherConfig {
        max_batch,
        max_rows: c.max_batch_rows,
        batch_wait: c.batch_wait,
        arena_entries,
        score_threads: c.score_threads,
    };
    let mut ready = Some(ready);
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        batcher::run(
            engine,
            &state.queue,
            config,
            &state.metrics,
            || {
                let _ = state.engine.set(shared.clone());
                if let Some(r) = ready.take() {
                    let _ = r.send(Ok(()));
                }
            },
            &|done| engine.score(done),
        )
    }));
    match run {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            batcher::fail_all(&state.queue);
            match ready.take() {
                Some(r) => {
                    tracing::error!(error = %e, "the batch could not be made");
                    let _ = r.send(Err(e.into()));
                    Ok(())
                }
                // It was serving: decoder steps kept failing on the device. The server stops
                // (the thread's end is `engine_gone`) and the process exits with the error.
                None => {
                    tracing::error!(
                        error = %e,
                        "{} decoder steps failed in a row on the device: the engine stops",
                        batcher::FAILED_STEPS_FATAL
                    );
                    Err(e.into())
                }
            }
        }
        Err(_) => {
            tracing::error!("the batcher panicked: this is a bug");
            batcher::fail_all(&state.queue);
            Err(ServeError::Panicked)
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// `gram serve`: logs to stderr (`RUST_LOG`, default `info`), serves until SIGINT/SIGTERM.
pub fn run(args: ServeArgs) -> Result<(), ServeError> {
    let config = args.config()?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
    crate::backend::cpu::team::set_idle_spin(config.idle_spin);
    // The decoder's workers hand their cores to the HTTP and scoring threads between regions.
    crate::backend::cpu::team::set_yield_after_region(true);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.http_threads)
        .thread_name("gram-http")
        .on_thread_start(priority::give_way_to_decoder)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tracing::info!(addr = %config.addr, index = %config.index.display(), "starting");
        let server = Server::start(config).await?;
        tracing::info!(addr = %server.addr(), "ready");
        let served = server
            .run_until(async {
                signal().await;
                tracing::info!(
                    "shutting down: finishing requests in flight (a second SIGINT or SIGTERM \
                     stops at once)"
                );
                // The usual way out of a shutdown that takes too long.
                tokio::spawn(async {
                    signal().await;
                    tracing::warn!("second signal: exiting without finishing requests");
                    std::process::exit(130);
                });
            })
            .await;
        tracing::info!("stopped");
        served
    })
}

#[cfg(test)]
mod tests {
    use super::{until_stopped, Stop};
    use tokio::sync::oneshot;

    /// Serving ends when the engine's thread ends, returning or panicking, as well as on the
    /// signal.
    #[tokio::test]
    async fn serving_stops_when_the_engine_thread_ends() {
        for panics in [false, true] {
            let (gone, rx) = oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                let _gone = gone;
                if panics {
                    panic!("a bug in the batcher (this test's own panic)");
                }
            });
            let stop = until_stopped(std::future::pending(), Some(rx)).await;
            assert_eq!(stop, Stop::EngineGone);
            assert_eq!(thread.join().is_err(), panics);
        }
        let (_gone, rx) = oneshot::channel::<()>();
        assert_eq!(until_stopped(async {}, Some(rx)).await, Stop::Signal);
        assert_eq!(until_stopped(async {}, None).await, Stop::Signal);
    }

    /// A tiny index (its directory) and the configuration `gram serve` makes of it with
    /// `flags` (on the CPU, one thread, any free port).
    fn tiny_server(tag: &str, flags: &str) -> (std::path::PathBuf, super::ServeConfig) {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: super::ServeArgs,
        }
        let dir = super::batcher::tests::tiny_index(tag);
        let argv = ["serve", "--index", dir.to_str().unwrap()]
            .into_iter()
            .chain("--addr 127.0.0.1:0 --threads 1 --device cpu".split(' '))
            .chain(flags.split_whitespace());
        let config = Cli::parse_from(argv).serve.config().unwrap();
        (dir, config)
    }

    /// The whole answer to `request` sent on a new connection (blocking: on a blocking
    /// thread).
    async fn exchange(addr: std::net::SocketAddr, request: String) -> String {
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(request.as_bytes()).unwrap();
            let mut text = String::new();
            c.read_to_string(&mut text).unwrap();
            text
        })
        .await
        .unwrap()
    }

    /// Status and whole answer of `GET path`.
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let text = exchange(addr, head).await;
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
        (status, text)
    }

    /// `/ready` over HTTP: 503 `stalled` while a decoder step hangs with a request waiting for
    /// longer than `--timeout-ms` (the gathering window is 0), 200 again once the step returns;
    /// `/health` stays 200 throughout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ready_is_503_stalled_while_a_step_hangs() {
        use std::time::{Duration, Instant};
        let (dir, config) = tiny_server("ready-stalled", "--timeout-ms 200");
        let server = super::Server::start(config).await.unwrap();
        let addr = server.addr();
        assert_eq!(get(addr, "/ready").await.0, 200);
        // The next step sleeps 3 s; a search waits in it (and gets its 504 at 200 ms).
        server
            .state
            .queue
            .step_sleeps
            .lock()
            .unwrap()
            .push_back(Duration::from_secs(3));
        let body = r#"{"query": "oak desk"}"#;
        let post = format!(
            "POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let search = tokio::spawn(exchange(addr, post));
        let t = Instant::now();
        let stalled = loop {
            let (status, text) = get(addr, "/ready").await;
            if status == 503 {
                break text;
            }
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "never stalled: {text}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(stalled.contains("\"stalled\""), "{stalled}");
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(get(addr, "/health").await.0, 200, "the process is up");
        let answer = search.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
        // Once the step returns the engine moves on: ready again.
        let t = Instant::now();
        loop {
            let (status, text) = get(addr, "/ready").await;
            if status == 200 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "stalled for good: {text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.shutdown().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A server dropped without `shutdown` stops its engine: the batcher thread ends (it
    /// waited on the queue for the rest of the process).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_server_stops_its_engine() {
        let (dir, config) = tiny_server("dropped", "");
        let mut server = super::Server::start(config).await.unwrap();
        assert_eq!(get(server.addr(), "/ready").await.0, 200);
        let gone = server.engine_gone.take().unwrap();
        drop(server);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), gone).await;
        assert!(
            ended.is_ok(),
            "the batcher thread still runs 10 s after the drop"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
