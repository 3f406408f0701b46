//! An HTTP client for the coordinator (docs/protocol.md), used by the agent and the CLI.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::wire::{
    AcquireRequest, ErrorBody, ErrorKind, GateRequest, Granted, Heartbeat, HeartbeatReply, History,
    PROTOCOL, PROTOCOL_HEADER, ReleaseRequest, Renewed, RollbackRequest, RolloutReply, Status, Tip,
    TrafficRequest,
};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer (connection refused, timeout, DNS…).
    #[error("coordinator {url} unreachable: {message}")]
    Unreachable {
        /// The coordinator's URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The coordinator answered with an error.
    #[error("{}", body.message)]
    Api {
        /// HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
    },
    /// The answer could not be understood.
    #[error("coordinator answered HTTP {status} with an unexpected body: {message}")]
    Protocol {
        /// HTTP status.
        status: u16,
        /// What was wrong with it.
        message: String,
    },
}

impl ClientError {
    /// A bounded name for the error, for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Unreachable { .. } => "unreachable",
            ClientError::Protocol { .. } => "protocol",
            ClientError::Api { body, .. } => body.kind.as_str(),
        }
    }

    /// Whether the coordinator answered with an error of this kind.
    pub fn is(&self, kind: ErrorKind) -> bool {
        matches!(self, ClientError::Api { body, .. } if body.kind == kind)
    }

    /// For an answer that says to come back later — `wait`, and the coordinator's
    /// `rate_limited` (429), `unavailable` and `timeout` (503) — (reason, retry after).
    pub fn wait(&self) -> Option<(&str, Duration)> {
        match self {
            ClientError::Api { body, .. } if body.kind.is_wait() => Some((
                body.reason.as_deref().unwrap_or(body.kind.as_str()),
                // Bounded: a retry time from the server never overflows a clock nor waits forever.
                Duration::from_millis(body.retry_after_ms.unwrap_or(2000).clamp(100, 300_000)),
            )),
            _ => None,
        }
    }

    /// For a `rejected` answer: the reason.
    pub fn rejected(&self) -> Option<&str> {
        match self {
            ClientError::Api { body, .. } if body.kind == ErrorKind::Rejected => {
                Some(body.reason.as_deref().unwrap_or("rejected"))
            }
            _ => None,
        }
    }
}

/// A coordinator client.
#[derive(Clone, Debug)]
pub struct Client {
    /// The coordinators' URLs (one, or several of which one leads).
    bases: std::sync::Arc<[String]>,
    /// The one that answered last.
    at: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    token: String,
    http: reqwest::Client,
}

fn path_part(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'+' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// How the client reaches the coordinator.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// PEM file of the CA certificates to trust (instead of the system roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// Allow plain `http://` to a non-loopback address (the token crosses the network
    /// readable).
    pub insecure: bool,
}

/// Why `url` may not be used: plain HTTP to a host that is not loopback, unless `insecure`.
/// `None` when it may.
pub fn plain_http_problem(url: &str, insecure: bool) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    if insecure {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| {
        format!(
            "{url} is plain HTTP to a host that is not loopback: the token would cross the network readable; \
             use https:// (the coordinator's `tls:`), or set insecure: true (--insecure) if something else encrypts the traffic"
        )
    })
}

impl Client {
    /// A client for the coordinator at `base` (e.g. `https://coordinator:7070`) with
    /// `token`, trusting the system roots.
    pub fn new(base: &str, token: &str) -> Result<Client, ClientError> {
        Client::with_options(base, token, &Options::default())
    }

    /// A client with `options` (a CA file, plain HTTP beyond loopback). `base` is one URL,
    /// or several separated by commas: coordinators sharing an etcd store, tried in turn
    /// while one is unreachable.
    pub fn with_options(base: &str, token: &str, options: &Options) -> Result<Client, ClientError> {
        let fail = |message: String| ClientError::Unreachable {
            url: base.to_string(),
            message,
        };
        for b in base.split(',') {
            if let Some(p) = plain_http_problem(b.trim(), options.insecure) {
                return Err(fail(p));
            }
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            // Below the coordinator's idle-connection timeout, so a pooled connection is not
            // reused just as the server closes it.
            .pool_idle_timeout(Duration::from_secs(4))
            .user_agent(concat!("drover/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &options.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| fail(format!("cannot read CA file {}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| fail(format!("CA file {}: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(fail(format!(
                    "CA file {} holds no PEM certificate",
                    ca.display()
                )));
            }
            builder = builder.tls_certs_only(certs);
        }
        let http = builder.build().map_err(|e| fail(e.to_string()))?;
        Ok(Client {
            bases: base
                .split(',')
                .map(|b| b.trim().trim_end_matches('/').to_string())
                .filter(|b| !b.is_empty())
                .collect(),
            at: std::sync::Arc::default(),
            token: token.trim().to_string(),
            http,
        })
    }

    /// The URL of the coordinator that answered last.
    pub fn url(&self) -> &str {
        let n = self.bases.len().max(1);
        self.bases
            .get(self.at.load(std::sync::atomic::Ordering::Relaxed) % n)
            .map_or("", String::as_str)
    }

    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        self.call_within(method, path, body, None).await
    }

    /// A call given `timeout` instead of the client's (a long-poll).
    async fn call_within<B: Serialize, R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        timeout: Option<Duration>,
    ) -> Result<R, ClientError> {
        // Several coordinators (one leads; the others do not listen): the one that answered
        // last first, then the next on an unreachable one. Every call of the protocol may be
        // sent twice (docs/protocol.md).
        let n = self.bases.len().max(1);
        let first = self.at.load(std::sync::atomic::Ordering::Relaxed);
        let mut i = 0;
        loop {
            let at = (first + i) % n;
            let r = self.call_at(at, method.clone(), path, body, timeout).await;
            match r {
                Err(ClientError::Unreachable { .. }) if i + 1 < n => i += 1,
                r => {
                    if !matches!(r, Err(ClientError::Unreachable { .. })) {
                        self.at.store(at, std::sync::atomic::Ordering::Relaxed);
                    }
                    return r;
                }
            }
        }
    }

    async fn call_at<B: Serialize, R: DeserializeOwned>(
        &self,
        at: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        timeout: Option<Duration>,
    ) -> Result<R, ClientError> {
        let base = self.bases.get(at).map_or("", String::as_str);
        let url = format!("{base}{path}");
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(&self.token)
            .header(PROTOCOL_HEADER, PROTOCOL);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            url: base.to_string(),
            message: chain(&e),
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            url: base.to_string(),
            message: chain(&e),
        })?;
        if (200..300).contains(&status) {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
                status,
                message: e.to_string(),
            })
        } else {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => Err(ClientError::Api { status, body }),
                Err(_) => Err(ClientError::Protocol {
                    status,
                    message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
                }),
            }
        }
    }

    /// `POST /v1/hosts/{host}/heartbeat`.
    pub async fn heartbeat(
        &self,
        host: &str,
        hb: &Heartbeat,
    ) -> Result<HeartbeatReply, ClientError> {
        let path = format!("/v1/hosts/{}/heartbeat", path_part(host));
        self.call(reqwest::Method::POST, &path, Some(hb)).await
    }

    /// `GET /v1/tip`: the branch tip the coordinator fetched, as soon as it is not `after`,
    /// or after `wait` (a long-poll; the coordinator may answer sooner, with the same tip).
    pub async fn tip(
        &self,
        host: &str,
        after: Option<&str>,
        wait: Duration,
    ) -> Result<Option<String>, ClientError> {
        let mut path = format!(
            "/v1/tip?host={}&wait_ms={}",
            path_part(host),
            wait.as_millis()
        );
        if let Some(a) = after {
            path.push_str(&format!("&after={}", path_part(a)));
        }
        let tip: Tip = self
            .call_within::<(), _>(
                reqwest::Method::GET,
                &path,
                None,
                Some(wait + Duration::from_secs(10)),
            )
            .await?;
        Ok(tip.commit)
    }

    /// `POST /v1/leases`.
    pub async fn acquire(&self, req: &AcquireRequest) -> Result<Granted, ClientError> {
        self.call(reqwest::Method::POST, "/v1/leases", Some(req))
            .await
    }

    /// `POST /v1/leases/{id}/renew`.
    pub async fn renew(&self, id: &str) -> Result<Renewed, ClientError> {
        let path = format!("/v1/leases/{}/renew", path_part(id));
        self.call::<(), _>(reqwest::Method::POST, &path, None).await
    }

    /// `POST /v1/leases/{id}/release`.
    pub async fn release(
        &self,
        id: &str,
        req: &ReleaseRequest,
    ) -> Result<RolloutReply, ClientError> {
        let path = format!("/v1/leases/{}/release", path_part(id));
        self.call(reqwest::Method::POST, &path, Some(req)).await
    }

    /// `POST /v1/leases/{id}/gate`: `Ok` to go on past `step`; a `409 wait` while it waits for
    /// an approval; `422 rejected` when traffic must go back.
    pub async fn gate(&self, id: &str, step: &str) -> Result<RolloutReply, ClientError> {
        let path = format!("/v1/leases/{}/gate", path_part(id));
        let req = GateRequest {
            step: step.to_string(),
        };
        self.call(reqwest::Method::POST, &path, Some(&req)).await
    }

    /// `POST /v1/leases/{id}/traffic`: the new side's weight is now `percent`.
    pub async fn traffic(&self, id: &str, percent: u8) -> Result<RolloutReply, ClientError> {
        let path = format!("/v1/leases/{}/traffic", path_part(id));
        let req = TrafficRequest { percent };
        self.call(reqwest::Method::POST, &path, Some(&req)).await
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.call::<(), _>(reqwest::Method::GET, "/v1/status", None)
            .await
    }

    /// `GET path`, read as `R` (for answers whose types live with the server).
    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.call::<(), _>(reqwest::Method::GET, path, None).await
    }

    /// `GET /v1/history?limit=N`.
    pub async fn history(&self, limit: u32) -> Result<History, ClientError> {
        let path = format!("/v1/history?limit={limit}");
        self.call::<(), _>(reqwest::Method::GET, &path, None).await
    }

    /// Approves or rejects (environment, service, version); `during_freeze` (admins) also
    /// lets it start during a freeze of its environment.
    pub async fn decide(
        &self,
        env: &str,
        service: &str,
        version: &str,
        approve: bool,
        during_freeze: bool,
    ) -> Result<RolloutReply, ClientError> {
        let verb = if approve { "approve" } else { "reject" };
        let path = format!(
            "/v1/rollouts/{}/{}/{}/{verb}{}",
            path_part(env),
            path_part(service),
            path_part(version),
            if during_freeze {
                "?during_freeze=true"
            } else {
                ""
            }
        );
        self.call::<(), _>(reqwest::Method::POST, &path, None).await
    }

    /// Starts the failed or aborted rollout of (environment, service)'s desired version again.
    pub async fn retry(&self, env: &str, service: &str) -> Result<RolloutReply, ClientError> {
        self.operate(env, service, "retry").await
    }

    /// Rolls (environment, service) back to `to`, or to the newest other version that
    /// succeeded there.
    pub async fn rollback(
        &self,
        env: &str,
        service: &str,
        to: Option<&str>,
    ) -> Result<RolloutReply, ClientError> {
        let path = format!(
            "/v1/rollouts/{}/{}/rollback",
            path_part(env),
            path_part(service)
        );
        let req = RollbackRequest {
            to: to.map(str::to_string),
        };
        self.call(reqwest::Method::POST, &path, Some(&req)).await
    }

    /// `pause`, `resume` or `abort` the newest unfinished rollout of (environment, service).
    pub async fn operate(
        &self,
        env: &str,
        service: &str,
        verb: &str,
    ) -> Result<RolloutReply, ClientError> {
        let path = format!(
            "/v1/rollouts/{}/{}/{verb}",
            path_part(env),
            path_part(service)
        );
        self.call::<(), _>(reqwest::Method::POST, &path, None).await
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback_unless_insecure() {
        for ok in [
            "http://127.0.0.1:7070",
            "http://localhost:7070/",
            "http://[::1]:7070",
            "http://127.0.0.2",
            "https://coordinator.example:7070",
        ] {
            assert_eq!(plain_http_problem(ok, false), None, "{ok}");
        }
        for bad in [
            "http://coordinator:7070",
            "http://10.0.0.5:7070",
            "http://[fe80::1]:7070",
            "http://127.0.0.1.evil.example:7070",
        ] {
            let p = plain_http_problem(bad, false).expect(bad);
            assert!(p.contains("insecure"), "{p}");
            assert_eq!(plain_http_problem(bad, true), None);
        }
        let e = Client::new("http://coordinator:7070", "t").unwrap_err();
        assert!(e.to_string().contains("not loopback"), "{e}");
    }
}
