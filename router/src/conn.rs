//! Guards on client connections, in front of pingora's HTTP handling (which offers no hook
//! before it reads a request header):
//!
//! - **A cap on open connections** (`--max-connections`): one over it gets a 503 with
//!   `Retry-After` and is closed, instead of holding a file descriptor and a task.
//! - **A deadline on each request header** (`--header-timeout-ms`, nginx's
//!   `client_header_timeout`): pingora bounds each *read* of a header (60 s), so a client
//!   dripping one byte every 50 s held its connection forever. Here the whole header must
//!   arrive within the deadline, counted from the connection's start for the first request
//!   and from the first byte of each later one; past it the client gets 408 and is closed.
//!
//! [`Guarded`] wraps the proxy's [`ServerApp`]; [`HeaderDeadline`] wraps each connection's
//! stream and watches the bytes going by: a header ends at the first blank line (`\r\n\r\n`),
//! and a response header going out (`HTTP/1.x` other than 1xx) ends the request, so the next
//! bytes begin the next one. Bodies are not inspected beyond that (the body has its own
//! deadline, `--body-timeout-ms`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;

use crate::metrics::Metrics;

/// The connection limits, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open client connections at most; the next one is refused (503) and closed.
    pub max_connections: usize,
    /// A request header must arrive whole within this.
    pub header_timeout: Duration,
}

/// The proxy's [`ServerApp`] with [`ConnLimits`] applied to every connection.
pub struct Guarded<A> {
    inner: Arc<A>,
    limits: ConnLimits,
    open: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl<A> Guarded<A> {
    pub fn new(inner: A, limits: ConnLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(inner),
            limits,
            open: Arc::new(AtomicUsize::new(0)),
            metrics,
        }
    }
}

/// One open connection, counted while it lives.
struct Slot {
    open: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Slot {
    fn take(open: &Arc<AtomicUsize>, max: usize, metrics: &Arc<Metrics>) -> Option<Self> {
        let mut now = open.load(Ordering::Relaxed);
        loop {
            if now >= max {
                return None;
            }
            match open.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(seen) => now = seen,
            }
        }
        metrics.connections_open.inc();
        Some(Self {
            open: Arc::clone(open),
            metrics: Arc::clone(metrics),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connections_open.dec();
    }
}

/// The whole answer to a connection over the cap: it is never read from.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 134\r\n\r\n\
{\"error\":{\"message\":\"the router has too many open connections; retry shortly\",\"type\":\"server_error\",\"param\":null,\"code\":\"overloaded\"}}";

/// The answer to a client whose header did not arrive in time.
const HEADER_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
content-type: application/json\r\n\
connection: close\r\n\
content-length: 135\r\n\r\n\
{\"error\":{\"message\":\"the request header did not arrive in time\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"request_timeout\"}}\n";

#[async_trait]
impl<A> ServerApp for Guarded<A>
where
    A: ServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(_slot) = Slot::take(&self.open, self.limits.max_connections, &self.metrics) else {
            self.metrics
                .connections_refused
                .with_label_values(&["max_connections"])
                .inc();
            // Best effort, bounded: a client that does not read its refusal loses it.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                stream.write_all(REFUSED).await?;
                stream.flush().await
            })
            .await;
            Shutdown::shutdown(stream.as_mut()).await;
            return None;
        };
        let guarded = HeaderDeadline::new(stream, self.limits.header_timeout, &self.metrics);
        self.inner.process_new(Box::new(guarded), shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// Where a connection is in its request/response cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request header, which must end by the deadline (`armed`: the timer runs;
    /// not yet when no byte of a later request has come).
    Header { armed: bool },
    /// The header is in; the request is being served.
    Serving,
    /// The deadline passed: every further read fails.
    Expired,
}

/// A client stream whose request headers must each arrive within a deadline.
pub struct HeaderDeadline {
    inner: Stream,
    timeout: Duration,
    phase: Phase,
    /// The deadline: one timer per connection, reset for each request (not a new one).
    timer: Pin<Box<Sleep>>,
    /// How much of `\r\n\r\n` the bytes read so far end with.
    matched: usize,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for HeaderDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderDeadline")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl HeaderDeadline {
    /// The first request's deadline starts now (a connection that never sends a byte is cut
    /// off at it too).
    pub fn new(inner: Stream, timeout: Duration, metrics: &Arc<Metrics>) -> Self {
        Self {
            inner,
            timeout,
            phase: Phase::Header { armed: true },
            timer: Box::pin(tokio::time::sleep(timeout)),
            matched: 0,
            metrics: Arc::clone(metrics),
        }
    }
}

/// Advances `matched` (how much of `\r\n\r\n` the bytes so far end with) over `bytes`;
/// true once a header's blank line is complete. Every request's first read passes through
/// here (header and often the body): the bytes are searched with `memmem`, and only the
/// seams with the previous and next read go byte by byte.
fn header_ends_in(matched: &mut usize, bytes: &[u8]) -> bool {
    static END: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
    // a blank line begun in the previous read ends within the first three bytes
    let seam = bytes.len().min(3);
    if step_header_end(matched, &bytes[..seam]) {
        return true;
    }
    if bytes.len() == seam {
        return false;
    }
    if END.find(bytes).is_some() {
        *matched = 0;
        return true;
    }
    // no blank line: what of one the last three bytes begin
    *matched = 0;
    step_header_end(matched, &bytes[bytes.len() - 3..])
}

/// [`header_ends_in`] byte by byte.
fn step_header_end(matched: &mut usize, bytes: &[u8]) -> bool {
    const END: &[u8; 4] = b"\r\n\r\n";
    for &b in bytes {
        *matched = if b == END[*matched] {
            *matched + 1
        } else if b == b'\r' {
            1
        } else {
            0
        };
        if *matched == END.len() {
            *matched = 0;
            return true;
        }
    }
    false
}

/// Whether `buf`, written to the client, begins a final response header (`HTTP/1.x NNN`,
/// NNN not 1xx): the request it answers is over.
fn is_final_response_header(buf: &[u8]) -> bool {
    buf.len() >= 10 && buf.starts_with(b"HTTP/1.") && buf[9] != b'1'
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if matches!(this.phase, Phase::Expired) {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before
                    && let Phase::Header { armed } = this.phase
                {
                    if !armed {
                        this.timer
                            .as_mut()
                            .reset(tokio::time::Instant::now() + this.timeout);
                        this.phase = Phase::Header { armed: true };
                    }
                    if header_ends_in(&mut this.matched, &buf.filled()[before..]) {
                        this.phase = Phase::Serving;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.phase != (Phase::Header { armed: true })
                    || this.timer.as_mut().poll(cx).is_pending()
                {
                    return Poll::Pending;
                }
                this.phase = Phase::Expired;
                this.metrics
                    .connections_refused
                    .with_label_values(&["header_timeout"])
                    .inc();
                // Best effort: tell the client why, if its socket takes it now.
                let _ = Pin::new(&mut this.inner).poll_write(cx, HEADER_TIMEOUT);
                let _ = Pin::new(&mut this.inner).poll_flush(cx);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request header deadline passed",
                )))
            }
        }
    }
}

impl AsyncWrite for HeaderDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if matches!(this.phase, Phase::Serving) && is_final_response_header(buf) {
            // The answer is going out: the client's next bytes begin its next request.
            this.phase = Phase::Header { armed: false };
            this.matched = 0;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if matches!(this.phase, Phase::Serving)
            && bufs
                .iter()
                .find(|b| !b.is_empty())
                .is_some_and(|b| is_final_response_header(b))
        {
            this.phase = Phase::Header { armed: false };
            this.matched = 0;
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for HeaderDeadline {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(self.inner.as_mut()).await;
    }
}

impl UniqueID for HeaderDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderDeadline {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeaderDeadline {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeaderDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for HeaderDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for HeaderDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_response_headers_are_told_from_interim_ones() {
        assert!(is_final_response_header(b"HTTP/1.1 200 OK\r\n"));
        assert!(is_final_response_header(b"HTTP/1.0 503 x"));
        assert!(!is_final_response_header(b"HTTP/1.1 100 Continue\r\n"));
        assert!(!is_final_response_header(b"data: HTTP/1.1 200"));
        assert!(!is_final_response_header(b"HTTP/1.1"));
    }

    #[test]
    fn the_canned_answers_declare_their_true_length() {
        for answer in [REFUSED, HEADER_TIMEOUT] {
            let text = std::str::from_utf8(answer).expect("ascii");
            let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
            let declared: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|n| n.parse().ok())
                .expect("content-length");
            assert_eq!(declared, body.len(), "{head}");
            let json: serde_json::Value = serde_json::from_str(body).expect("json body");
            assert!(json["error"]["message"].is_string());
        }
    }

    #[test]
    fn a_header_split_anywhere_is_found_once_whole() {
        let header = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        for cut in 1..header.len() {
            let mut matched = 0;
            let (x, y) = header.split_at(cut);
            assert!(!header_ends_in(&mut matched, x), "cut at {cut}");
            assert!(header_ends_in(&mut matched, y), "cut at {cut}");
        }
        let mut matched = 0;
        assert!(!header_ends_in(
            &mut matched,
            b"GET / HTTP/1.1\r\nhost: x\r\n\r"
        ));
        assert!(!header_ends_in(&mut matched, b"\rX"));
        assert!(header_ends_in(&mut matched, b"\r\r\n\r\n"));
    }

    proptest::proptest! {
        /// The search over whole reads finds the blank line where the byte-by-byte scan
        /// does, however the bytes are cut into reads.
        #[test]
        fn the_header_end_is_found_as_byte_by_byte(
            bytes in proptest::collection::vec(proptest::sample::select(b"\r\nab".to_vec()), 0..64),
            cuts in proptest::collection::vec(0usize..64, 0..6),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= bytes.len()).collect();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let (mut fast, mut slow) = (0, 0);
            for w in cuts.windows(2) {
                let read = &bytes[w[0]..w[1]];
                let found = header_ends_in(&mut fast, read);
                proptest::prop_assert_eq!(found, step_header_end(&mut slow, read));
                if found {
                    break;
                }
                proptest::prop_assert_eq!(fast, slow);
            }
        }
    }
}
