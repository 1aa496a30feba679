//! Connections: accepting them (at most [`CONNECTIONS_MAX`] at once) and the deadlines that
//! keep any one of them from holding the server.
//!
//! - A new connection must send a complete request head within `head_timeout` of opening,
//!   whether it sends nothing or half a head.
//! - Between requests a kept-alive connection may sit idle for `idle_timeout`; from the first
//!   byte of its next head it has `head_timeout` to complete it.
//! - While a request is being served no deadline runs here: a body that stops arriving is the
//!   body reader's to abandon (`body.rs`), and the answer may take as long as the work does.
//!
//! hyper 1's own header timeout is not used: it is silently off without a timer, and its timer
//! also runs while a kept-alive connection is idle. Instead each connection's I/O is wrapped to
//! notice bytes arriving, the request handler marks when a request starts and ends (two atomic
//! stores: nothing is woken), and a watchdog beside the connection closes it when the deadline
//! of its phase passes. The watchdog wakes at the deadline it knows or after the shortest
//! limit, whichever is first, so a phase change that brings the deadline closer (the first
//! byte of a head on an idle connection) is still caught on time.
//!
//! This module knows nothing of routes or bodies; it hands each request to the handler.

use crate::config::ApiConfig;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::Instrument as _;

/// Most connections served at once; past it, accepting waits (the kernel's backlog holds the
/// rest). The node raises its open-file limit to fit these beside its storage's files.
pub const CONNECTIONS_MAX: usize = 1024;
/// The kernel send buffer of a connection that became a stream (Linux doubles it): without
/// it, autotuning lets a client that stops reading park megabytes in the kernel per stream.
pub const STREAM_SEND_BUFFER_BYTES: usize = 64 * 1024;
/// How long a graceful shutdown waits for requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// After a failed accept (out of descriptors, say), the pause before the next: a full
/// descriptor table must not spin the accept loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The phase of a connection, which decides its deadline.
const HEAD: u8 = 0;
const BUSY: u8 = 1;
const IDLE: u8 = 2;

/// What a connection's I/O, its requests and its watchdog share.
struct Watch {
    phase: AtomicU8,
    /// Milliseconds after `opened` when the phase began (for `HEAD`: the connection opened, or
    /// the first byte of the head arrived).
    since_ms: AtomicU64,
    opened: Instant,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            phase: AtomicU8::new(HEAD),
            since_ms: AtomicU64::new(0),
            opened: Instant::now(),
        }
    }

    fn enter(&self, phase: u8) {
        self.since_ms
            .store(self.opened.elapsed().as_millis() as u64, Ordering::SeqCst);
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// Bytes arrived: on an idle connection they start the next head.
    fn bytes_arrived(&self) {
        if self.phase.load(Ordering::SeqCst) == IDLE {
            self.enter(HEAD);
        }
    }

    /// When the current phase ends the connection, if it does.
    fn deadline(&self, limits: &Deadlines) -> Option<Instant> {
        let limit = match self.phase.load(Ordering::SeqCst) {
            HEAD => limits.head,
            IDLE => limits.idle,
            _ => return None,
        };
        let since = Duration::from_millis(self.since_ms.load(Ordering::SeqCst));
        Some(self.opened + since + limit)
    }
}

/// A connection's deadlines (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub head: Duration,
    pub idle: Duration,
}

impl Deadlines {
    pub fn from_config(config: &ApiConfig) -> Deadlines {
        Deadlines {
            head: Duration::from_millis(config.head_timeout_ms),
            idle: Duration::from_millis(config.idle_timeout_ms),
        }
    }
}

/// A connection's socket, noticing when bytes arrive.
struct WatchedIo {
    stream: TcpStream,
    watch: Arc<Watch>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.bytes_arrived();
        }
        poll
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Serves connections from `listener` with `handle` until `shutdown` resolves, then lets
/// requests in flight finish (up to [`SHUTDOWN_GRACE`]).
///
/// A response carrying [`Streaming`](super::segments::Streaming) is a stream: from then on its
/// connection no longer counts against [`CONNECTIONS_MAX`] (streams have their own limit) and
/// no deadline runs while the stream lasts; the stream's answer closes the connection after it.
pub async fn serve<H, F, B>(
    listener: TcpListener,
    deadlines: Deadlines,
    handle: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, or a connection reset before it was accepted.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        spawn_connection(stream, remote, permit, handle.clone(), deadlines, &graceful);
    }
    drop(listener);
    tracing::info!("stopped accepting; finishing requests in flight");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after the grace period");
    }
}

/// Serves one accepted connection in a task of its own, holding `permit` (one of
/// [`CONNECTIONS_MAX`]) until it ends or becomes a stream.
fn spawn_connection<H, F, B>(
    stream: TcpStream,
    remote: std::net::SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    handle: H,
    deadlines: Deadlines,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _ = stream.set_nodelay(true);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let watch = Arc::new(Watch::new());
    let io = WatchedIo {
        stream,
        watch: Arc::clone(&watch),
    };
    let requests = Arc::clone(&watch);
    let permit = Arc::new(std::sync::Mutex::new(Some(permit)));
    let held = Arc::clone(&permit);
    let service = service_fn(move |request| {
        let (handle, watch, held) = (handle.clone(), Arc::clone(&requests), Arc::clone(&held));
        async move {
            watch.enter(BUSY);
            let response = handle(request).await;
            if response
                .extensions()
                .get::<super::segments::Streaming>()
                .is_some()
            {
                held.lock().expect("permit lock").take();
                // SAFETY: the service runs inside its connection, which owns the socket
                // until the connection ends, so the descriptor is open here.
                let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                let _ =
                    socket2::SockRef::from(&socket).set_send_buffer_size(STREAM_SEND_BUFFER_BYTES);
            } else {
                watch.enter(IDLE);
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let connection = http1::Builder::new()
        .keep_alive(true)
        // Deadlines are this module's (see above); hyper's would need a timer.
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(io), service);
    let connection = graceful.watch(connection);
    // Every line a connection logs names its client.
    let span = tracing::info_span!("conn", %remote);
    tokio::spawn(
        async move {
            guard(connection, &watch, deadlines).await;
            drop(permit);
        }
        .instrument(span),
    );
}

/// Runs `connection` until it ends, or until its phase's deadline passes: then it is dropped,
/// which closes the socket.
async fn guard(connection: impl Future, watch: &Watch, deadlines: Deadlines) {
    tokio::pin!(connection);
    let period = deadlines.head.min(deadlines.idle);
    loop {
        let now = Instant::now();
        let wake = match watch.deadline(&deadlines) {
            Some(at) if at <= now => {
                tracing::debug!(
                    idle = watch.phase.load(Ordering::SeqCst) == IDLE,
                    "closing a connection past its deadline"
                );
                return;
            }
            Some(at) => at.min(now + period),
            None => now + period,
        };
        tokio::select! {
            _ = &mut connection => return,
            () = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}
