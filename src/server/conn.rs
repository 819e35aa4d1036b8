//! Connections: the accept loop, and the time a client may take to send its request.
//!
//! `axum::serve` builds hyper's connection without a timer, so hyper's header-read timeout is
//! off, and nothing bounds the time a body takes to arrive: a client that opens connections and
//! dribbles its headers (or a 64 KiB body at a byte a second) would hold a task and a file
//! descriptor each for ever, and enough of them lock everyone out. Here:
//!
//! - **Headers** ([`HttpOptions::header_timeout`]): hyper's HTTP/1 connection with a tokio timer
//!   and an explicit header-read timeout. The timer runs whenever the connection waits for a
//!   request head, so it bounds a request line and headers sent slowly, and the time a kept-alive
//!   connection may sit idle between requests; past it the connection is closed.
//! - **Bodies** ([`HttpOptions::body_timeout`], [`body_deadline`]): from the moment the head is
//!   read, the body must arrive within the limit; past it the request is answered 408
//!   (`request_timeout`) and the connection closed. The request's own deadline (`--timeout-ms`)
//!   starts once the body is read.
//! - **Connections** ([`HttpOptions::max_connections`]): at most this many are open at once.
//!   At the cap the loop stops accepting until one closes: further clients wait in the kernel's
//!   listen backlog (no descriptor, no task of ours) and are served in turn as connections close,
//!   rather than being accepted only to be closed. With the timeouts above, a slot held by a
//!   client that sends nothing frees within the header timeout.
//!
//! Shutdown: the listener closes at once, each connection finishes the request it is serving and
//! closes (an idle one at once, one that has sent nothing yet included: a request it sends
//! after the signal is not read), and [`serve`] returns when every connection has closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::body::{Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::api::ApiError;
use super::metrics::Metrics;
use super::AppState;

/// How long a client may take to send a request, and how many connections may be open.
#[derive(Debug, Clone, Copy)]
pub struct HttpOptions {
    /// Longest wait for a request's line and headers (and longest idle time of a kept-alive
    /// connection between requests).
    pub header_timeout: Duration,
    /// Longest time from the end of a request's headers to the end of its body.
    pub body_timeout: Duration,
    /// Longest a write to the client may stall (a client that does not read its answer).
    pub write_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// A connection's byte stream whose writes fail with `TimedOut` once one has made no progress
/// for `timeout` (the client stopped reading and the socket buffers are full): hyper then
/// closes the connection. The clock restarts at every write that moves bytes.
pub struct WriteDeadline<T> {
    io: T,
    timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    pub fn new(io: T, timeout: Duration) -> Self {
        WriteDeadline {
            io,
            timeout,
            stalled: None,
        }
    }

    /// `poll`'s answer, with the stall clock: `Pending` arms it (once), `Ready` disarms it,
    /// and a clock run out turns `Pending` into `TimedOut`.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        match poll {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let clock = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match clock.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client has not read its answer for the write timeout",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for WriteDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for WriteDeadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, poll)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_shutdown(cx);
        this.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, poll)
    }
}

/// Serves `app` on `listener` until `stop` completes (or its sender is dropped), then closes the
/// listener, lets every connection finish the request it is serving, and returns once all have
/// closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: HttpOptions,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    metrics.set_connections_max(options.max_connections);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout);
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let (closing, closing_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        // A slot first, then a connection: at the cap, clients wait in the listen backlog.
        let next = async {
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            (slot, listener.accept().await)
        };
        let (slot, accepted) = tokio::select! {
            biased;
            _ = &mut stop => break,
            Some(_) = connections.join_next() => continue,
            next = next => next,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // The pause after an error watches the stop too: a shutdown waits for no
                // pause (it did, up to 1 s an error, at the descriptor limit).
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    _ = accept_error(e) => continue,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(
            WriteDeadline::new(TokioIo::new(stream), options.write_timeout),
            TowerToHyperService::new(app.clone()),
        );
        let mut closing = closing_rx.clone();
        let open = metrics.connection_opened();
        let metrics = metrics.clone();
        connections.spawn(async move {
            let (_slot, _open) = (slot, open);
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                biased;
                r = connection.as_mut() => r,
                _ = async { closing.wait_for(|c| *c).await.is_ok() } => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                // A malformed request (bad request line or headers, a URI or headers over
                // hyper's limits) is answered by hyper itself, 400 / 414 / 431 with an empty
                // body, before any handler or metric of ours sees it: counted and logged here.
                if e.is_parse() || e.is_parse_too_large() {
                    metrics.record_http_error();
                    tracing::info!(error = %e, "malformed HTTP request refused");
                } else if e.is_timeout() {
                    metrics.record_timed_out_connection();
                    tracing::debug!(error = %e, "connection closed by the header timeout");
                } else {
                    tracing::debug!(error = %e, "connection closed on an error");
                }
            }
        });
    }
    drop(listener);
    let _ = closing.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// An error from `accept`: one about that connection (the client gave up) is skipped; any other
/// (out of descriptors, most likely) is logged, and accepting resumes after a pause rather than
/// spinning.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The middleware in front of every route for the request's body:
///
/// - a declared `Content-Length` over `--max-body-bytes` is answered 413 `payload_too_large` at
///   once, before any of the body is read (so no `100 Continue` either);
/// - the body is read through a [`TimedBody`] whose deadline is `--body-timeout-ms` from now
///   (the head has just been read); a handler whose body read failed on that deadline answers
///   408 `request_timeout`;
/// - an answer given while the body was not read to its end (a 404, a 405, a 413, a route that
///   takes no body) says `Connection: close`: hyper then closes the connection rather than
///   read what is left, and a client must not send its next request on it.
pub async fn body_deadline(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let max = state.config.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        let mut response = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the body is too large: Content-Length {} over the limit of {max} bytes \
                 (--max-body-bytes)",
                declared.unwrap_or_default()
            ),
        )
        .into_response();
        close(&mut response);
        return response;
    }
    // A JSON endpoint's body of the wrong type or encoding is refused before it is read.
    let route = request.extensions().get::<axum::extract::MatchedPath>();
    if request.method() == axum::http::Method::POST
        && route.is_some_and(|r| super::api::JSON_ROUTES.contains(&r.as_str()))
    {
        if let Err(e) = super::api::json_headers(request.headers()) {
            let mut response = e.into_response();
            close(&mut response);
            return response;
        }
    }
    let limit = state.config.http.body_timeout;
    let expired = Arc::new(AtomicBool::new(false));
    let ended = Arc::new(AtomicBool::new(false));
    let request = request.map(|body| {
        // An empty body (no body, or Content-Length 0) has ended before it is read.
        ended.store(hyper::body::Body::is_end_stream(&body), Ordering::Relaxed);
        Body::new(TimedBody {
            inner: body,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
            expired: expired.clone(),
            ended: ended.clone(),
        })
    });
    let mut response = next.run(request).await;
    if expired.load(Ordering::Relaxed) {
        response = ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            kind: "request_timeout",
            message: format!(
                "the request body did not arrive within {} ms",
                limit.as_millis()
            ),
            retry_after: None,
        }
        .into_response();
        close(&mut response);
    } else if !ended.load(Ordering::Relaxed) {
        close(&mut response);
    }
    response
}

/// Marks `response` as the connection's last.
fn close(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// A request body that fails once its deadline passes before its end.
struct TimedBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    /// Set when the deadline failed the body.
    expired: Arc<AtomicBool>,
    /// Set once the body has been read to its end.
    ended: Arc<AtomicBool>,
}

/// The error of a [`TimedBody`] past its deadline.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} ms", .0.as_millis())]
struct BodyTimeout(Duration);

impl hyper::body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if frame.is_none() || this.inner.is_end_stream() {
                this.ended.store(true, Ordering::Relaxed);
            }
            return Poll::Ready(frame);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimeout(this.limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Write;

    /// A socket whose buffers are full: every write and flush waits (and never wakes).
    struct Full;

    /// A socket that takes every byte at once.
    struct Open;

    impl hyper::rt::Write for Full {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Pending
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    impl hyper::rt::Write for Open {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A write that cannot move fails with `TimedOut` once the timeout has passed (the stall
    /// clock wakes the task: the socket never does), a flush as well; a socket that takes the
    /// bytes never arms the clock.
    #[tokio::test]
    async fn a_stalled_write_times_out_and_a_moving_one_does_not() {
        let t = Duration::from_millis(50);
        let mut stuck = WriteDeadline::new(Full, t);
        let e = std::future::poll_fn(|cx| Pin::new(&mut stuck).poll_write(cx, b"answer"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        let mut stuck = WriteDeadline::new(Full, t);
        let e = std::future::poll_fn(|cx| Pin::new(&mut stuck).poll_flush(cx))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        let mut open = WriteDeadline::new(Open, t);
        for _ in 0..3 {
            let n = std::future::poll_fn(|cx| Pin::new(&mut open).poll_write(cx, b"answer"))
                .await
                .unwrap();
            assert_eq!(n, 6);
            assert!(open.stalled.is_none());
            tokio::time::sleep(t).await;
        }
    }
}
