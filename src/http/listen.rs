//! Accepting connections (SPEC §9) so that slow or silent clients cannot hold the daemon's
//! sockets: request headers must arrive within `header_read_timeout` (counted again from the end
//! of each response, so it is also the keep-alive idle time), a connection with no bytes moving
//! and no request being handled is closed after `http_idle_timeout`, and one client address may
//! hold at most `connections_per_address` connections that have not upgraded to WebSocket.
//! Upgraded connections leave all three to the page's own handshake, ping and dead-peer limits.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service as _;

use super::client::{ClientKey, ConnectionCounts, ConnectionSlot};
use crate::config::Limits;

/// Longest a stop waits for connections that have not upgraded to finish their request.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `stop` completes; then accepts no more, lets requests in
/// progress finish (keep-alive connections close) and returns. Upgraded sockets are not waited
/// for: their page tasks are tracked elsewhere.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &Limits,
    trusted_proxies: &[std::net::IpAddr],
    stop: impl Future<Output = ()>,
) {
    let counts = Arc::new(ConnectionCounts::default());
    let connections = TaskTracker::new();
    let closing = CancellationToken::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors (or a connection reset before accept): pause rather
                    // than spin, so the connections being closed can free some.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let slot = if trusted_proxies.contains(&peer.ip()) {
            None
        } else {
            match counts.enter(
                ClientKey::of_addr(peer.ip()),
                limits.connections_per_address,
            ) {
                Some(slot) => Some(slot),
                None => {
                    tracing::debug!(%peer, "connection refused: too many from this address");
                    continue;
                }
            }
        };
        // Small frames go out at once: without this, Nagle holds the second frame of a reply
        // (e.g. `<open/>` then features) for the peer's delayed ACK, ~40 ms per handshake step.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        connections.spawn(connection(
            tcp,
            peer,
            app.clone(),
            limits.clone(),
            closing.clone(),
            slot,
        ));
    }
    drop(listener);
    closing.cancel();
    connections.close();
    if tokio::time::timeout(STOP_LIMIT, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = connections.len(),
            "connections still busy after the stop limit"
        );
    }
}

/// Serves one connection until it ends, upgrades, idles out or is told to close.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    closing: CancellationToken,
    slot: Option<ConnectionSlot>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: tcp,
        activity: activity.clone(),
    });
    let act = activity.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let busy = Busy::new(act.clone());
        let mut app = app.clone();
        async move {
            let resp = app.call(req).await;
            drop(busy);
            resp.map_err(|e: Infallible| match e {})
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let mut conn = std::pin::pin!(builder.serve_connection(io, service).with_upgrades());
    let idle = limits.http_idle_timeout;
    let mut draining = false;
    loop {
        let now = Instant::now();
        let deadline = if activity.busy() {
            now + idle
        } else {
            activity.last() + idle
        };
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
                break;
            }
            () = tokio::time::sleep_until(deadline) => {
                if !activity.busy() && activity.last() + idle <= Instant::now() {
                    tracing::debug!(%peer, "idle connection closed");
                    break;
                }
            }
            () = closing.cancelled(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
    // The slot is freed here: the connection is closed, or upgraded and now a page's.
    drop(slot);
}

/// When a connection last moved bytes, and how many of its requests are being handled.
struct Activity {
    start: Instant,
    /// Milliseconds since `start`.
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
    }
}

/// A request being handled: the connection is not idle, however long the handler takes (a
/// login may take seconds with no bytes moving).
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: Arc<Activity>) -> Busy {
        activity.busy.fetch_add(1, Ordering::Relaxed);
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket that records when bytes last moved.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
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
