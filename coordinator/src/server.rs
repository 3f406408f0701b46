//! The coordinator's own accept loop, so that bad clients cannot hurt it: at most
//! `limits.connections` connections, and `limits.connections_per_address` from one source
//! address (one noisy address cannot starve the fleet); a deadline for the TLS handshake and
//! for each request's headers (slowloris); a deadline for each whole request; small header
//! buffers. Every refusal is counted in /metrics.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::config::Limits;
use crate::core::ApiError;
use crate::tls::TlsSlot;

/// Counters of what the server refused.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections closed at once: over the overall or per-address limit.
    pub connections_refused: AtomicU64,
    /// Connections closed for a TLS handshake not done in time.
    pub handshakes_timed_out: AtomicU64,
    /// Requests answered 503 `timeout`: not done within the request timeout.
    pub requests_timed_out: AtomicU64,
    /// Connections open now.
    pub connections_open: AtomicU64,
}

impl ServerStats {
    /// Prometheus text of the counters.
    pub fn metrics(&self) -> String {
        let mut t = String::new();
        for (name, kind, v) in [
            (
                "connections_refused_total",
                "counter",
                &self.connections_refused,
            ),
            (
                "tls_handshakes_timed_out_total",
                "counter",
                &self.handshakes_timed_out,
            ),
            (
                "requests_timed_out_total",
                "counter",
                &self.requests_timed_out,
            ),
            ("connections", "gauge", &self.connections_open),
        ] {
            t.push_str(&format!(
                "# TYPE drover_coordinator_{name} {kind}\ndrover_coordinator_{name} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        t
    }
}

/// Open connections, overall and per source address.
#[derive(Debug, Default)]
struct Slots {
    total: u32,
    by_address: HashMap<IpAddr, u32>,
}

/// A connection's place; given back when dropped.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    ip: IpAddr,
    stats: Arc<ServerStats>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                s.by_address.remove(&self.ip);
            }
        }
        self.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes a slot for a connection from `ip`, if under both limits.
fn take(
    slots: &Arc<Mutex<Slots>>,
    ip: IpAddr,
    total: u32,
    per_address: u32,
    stats: &Arc<ServerStats>,
) -> Option<Slot> {
    let mut s = slots.lock().unwrap_or_else(|e| e.into_inner());
    let mine = s.by_address.get(&ip).copied().unwrap_or(0);
    if s.total >= total || mine >= per_address {
        return None;
    }
    s.total += 1;
    *s.by_address.entry(ip).or_default() += 1;
    stats.connections_open.fetch_add(1, Ordering::Relaxed);
    Some(Slot {
        slots: slots.clone(),
        ip,
        stats: stats.clone(),
    })
}

/// The answer to a request not done within the request timeout.
fn timed_out() -> axum::response::Response {
    use axum::response::IntoResponse;
    ApiError::new(
        503,
        crate::wire::ErrorKind::Timeout,
        "the request took longer than the coordinator's request timeout; retry",
    )
    .into_response()
}

/// Serves `router` on `listener` until `stop` resolves, then stops accepting and lets the
/// connections finish their requests (for at most the request timeout).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsSlot>,
    limits: Limits,
    stats: Arc<ServerStats>,
    stop: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let (done_tx, _) = tokio::sync::watch::channel(false);
    let tracker = Tracker::default();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, mostly: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = take(
            &slots,
            peer.ip(),
            limits.connections,
            limits.connections_per_address,
            &stats,
        ) else {
            stats.connections_refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let tls = tls.clone();
        let stats = stats.clone();
        let limits = limits.clone();
        let mut done = done_tx.subscribe();
        let guard = tracker.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _guard = guard;
            match tls {
                None => {
                    connection(
                        TokioIo::new(stream),
                        peer,
                        router,
                        &limits,
                        &stats,
                        &mut done,
                    )
                    .await
                }
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(s)) => {
                            connection(TokioIo::new(s), peer, router, &limits, &stats, &mut done)
                                .await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => {
                            stats.handshakes_timed_out.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = done_tx.send(true);
    // Connections finish their requests; none waits longer than a request may take.
    let _ = tokio::time::timeout(limits.request_timeout, tracker.closed()).await;
}

/// Counts the connection tasks still running: every task holds a clone.
#[derive(Clone, Default)]
struct Tracker(Arc<()>);

impl Tracker {
    /// Resolves once no task holds a clone any more.
    async fn closed(self) {
        while Arc::strong_count(&self.0) > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Serves one connection.
async fn connection<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    limits: &Limits,
    stats: &Arc<ServerStats>,
    done: &mut tokio::sync::watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let request_timeout = limits.request_timeout;
    let stats2 = stats.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let router = router.clone();
        let stats = stats2.clone();
        async move {
            let resp =
                match tokio::time::timeout(request_timeout, router.oneshot(req.map(Body::new)))
                    .await
                {
                    Ok(Ok(r)) => r,
                    Ok(Err(never)) => match never {},
                    Err(_) => {
                        stats.requests_timed_out.fetch_add(1, Ordering::Relaxed);
                        timed_out()
                    }
                };
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 << 10)
        .max_headers(64)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        }
        _ = done.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_limit_overall_and_per_address() {
        let slots = Arc::new(Mutex::new(Slots::default()));
        let stats = Arc::new(ServerStats::default());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let a1 = take(&slots, a, 3, 2, &stats).unwrap();
        let _a2 = take(&slots, a, 3, 2, &stats).unwrap();
        assert!(take(&slots, a, 3, 2, &stats).is_none(), "per address");
        let _b1 = take(&slots, b, 3, 2, &stats).unwrap();
        assert!(take(&slots, b, 3, 2, &stats).is_none(), "overall");
        assert_eq!(stats.connections_open.load(Ordering::Relaxed), 3);
        drop(a1);
        assert!(take(&slots, b, 3, 2, &stats).is_some());
        assert!(
            stats
                .metrics()
                .contains("drover_coordinator_connections_refused_total 0")
        );
    }
}
