//! The agent's `/metrics` endpoint (`metrics.listen`): GET only, one small page, bounded.
//!
//! At most [`MAX_CONNECTIONS`] at once (more are closed at once), headers within 5 s and 64
//! KiB, each connection at most 30 s. With `metrics.token_file` a scrape must carry
//! `Authorization: Bearer <token>` (Prometheus: `authorization: { credentials_file: … }`);
//! the configuration refuses a non-loopback address without one.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// How long one connection may last.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the page of one scrape (reads the state: run off the async threads).
pub type Page = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds `addr`, with an error that names the setting.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on metrics.listen {addr}: {e} (another process on that port? change metrics.listen in the agent configuration)"
        )
    })
}

/// Serves `/metrics` on `listener` until `shutdown` is set.
pub async fn serve(
    listener: TcpListener,
    token: Option<String>,
    page: Page,
    mut shutdown: watch::Receiver<bool>,
) {
    let token: Option<Arc<str>> = token.map(Arc::from);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "metrics endpoint cannot accept");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics endpoint busy; connection closed");
            continue;
        };
        let (token, page) = (token.clone(), page.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (token, page) = (token.clone(), page.clone());
                async move { Ok::<_, Infallible>(answer(&req, token.as_deref(), page).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .max_buf_size(64 << 10)
                .max_headers(64)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection ended"),
                Err(_) => tracing::debug!(%peer, "metrics connection timed out"),
                Ok(Ok(())) => {}
            }
        });
    }
}

/// The response to one request.
async fn answer(req: &Request<Incoming>, token: Option<&str>, page: Page) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "not found: the agent serves /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if let Some(token) = token
        && !authorized(req.headers().get(header::AUTHORIZATION), token)
    {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "a bearer token is needed (metrics.token_file)\n",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let body = match tokio::task::spawn_blocking(move || page()).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "building the metrics page failed");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n");
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Whether `header` is `Bearer <token>`, compared in time independent of where they differ.
fn authorized(header: Option<&HeaderValue>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| h.as_bytes().strip_prefix(b"Bearer ")) else {
        return false;
    };
    let want = token.as_bytes();
    given.len() == want.len() && given.iter().zip(want).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

/// Whether `addr` may serve without a token: only this host can reach a loopback address.
pub fn is_private(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_authorized() {
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(authorized(Some(&h("Bearer s3cret")), "s3cret"));
        for bad in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "bearer s3cret",
            "s3cret",
            "Bearer ",
        ] {
            assert!(!authorized(Some(&h(bad)), "s3cret"), "{bad}");
        }
        assert!(!authorized(None, "s3cret"));
    }

    #[test]
    fn only_loopback_is_private() {
        for (a, private) in [
            ("127.0.0.1:9469", true),
            ("[::1]:9469", true),
            ("0.0.0.0:9469", false),
            ("10.1.2.3:9469", false),
            ("[::]:9469", false),
        ] {
            assert_eq!(is_private(&a.parse().unwrap()), private, "{a}");
        }
    }
}
