//! Health checks (polled until they pass or time out) and smoke tests (run once).

use std::time::{Duration, Instant};

use crate::artifact::error_chain;
use crate::hooks::{self, Exec};
use crate::redact::Redactor;
use crate::spec::{ResolvedHealth, ResolvedSmoke};

/// The most of a health or smoke response body read (what `expect_body` is looked for in).
const MAX_BODY: usize = 1 << 20;

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs, reason = "variant fields are named for what they hold")]
pub enum CheckError {
    /// The health check did not pass in time.
    #[error("health check {url} did not pass within {after:?}; last result: {last}")]
    Timeout {
        url: String,
        after: Duration,
        /// What the last probe saw.
        last: String,
    },
    /// The service's process exited while it was being checked.
    #[error("the service exited ({status}) before its health check passed; last probe: {last}")]
    Exited {
        /// How it exited.
        status: String,
        /// What the last probe saw.
        last: String,
    },
    /// The checks passed, but the service's own process had exited meanwhile: whatever
    /// answered was another program.
    #[error(
        "the checks passed, but the service's process had exited ({status}): another program answers on its URLs (is its port taken?)"
    )]
    NotItself {
        /// How it exited.
        status: String,
    },
    /// A smoke test failed.
    #[error("smoke test {what} failed: {why}")]
    Smoke {
        /// The URL or command.
        what: String,
        /// What it saw.
        why: String,
    },
}

/// Runs health checks and smoke tests.
#[derive(Clone, Debug)]
pub struct Checker {
    client: reqwest::Client,
}

/// The outcome of one probe.
async fn probe(
    client: &reqwest::Client,
    url: &str,
    status: u16,
    body: Option<&str>,
    timeout: Duration,
    redact: &Redactor,
) -> Result<(), String> {
    let mut resp = client
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| error_chain(&e))?;
    let got = resp.status().as_u16();
    if got != status {
        return Err(format!("HTTP {got}, expected {status}"));
    }
    if let Some(want) = body {
        // The app is not trusted with the agent's memory: at most MAX_BODY bytes are read.
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
            let room = MAX_BODY - bytes.len();
            bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if bytes.len() == MAX_BODY {
                break;
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        if !text.contains(want) {
            // Redacted whole, then cut: a cut never leaves part of a secret unmasked.
            let redacted = redact.apply(&text);
            let shown: String = redacted.chars().take(200).collect();
            return Err(format!("body does not contain `{want}` (body: `{shown}`)"));
        }
    }
    Ok(())
}

impl Checker {
    /// A checker using `client`.
    pub fn new(client: reqwest::Client) -> Checker {
        Checker { client }
    }

    /// The HTTP client (shared with metric queries).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Polls the health URL until it passes, `exited` reports the process gone, or the
    /// timeout expires. Returns how long it took.
    pub async fn wait_healthy(
        &self,
        h: &ResolvedHealth,
        exited: impl Fn() -> Option<String>,
        redact: &Redactor,
    ) -> Result<Duration, CheckError> {
        let start = Instant::now();
        let deadline = start + h.timeout.0;
        let mut interval = Duration::from_millis(10);
        loop {
            let now = Instant::now();
            let per_probe = (deadline.saturating_duration_since(now)).min(Duration::from_secs(2));
            let result = probe(
                &self.client,
                &h.url,
                h.expect_status,
                h.expect_body.as_deref(),
                per_probe.max(Duration::from_millis(50)),
                redact,
            )
            .await;
            let last = match result {
                Ok(()) => return Ok(start.elapsed()),
                Err(e) => e,
            };
            if let Some(status) = exited() {
                return Err(CheckError::Exited { status, last });
            }
            if Instant::now() + interval >= deadline {
                return Err(CheckError::Timeout {
                    url: h.url.clone(),
                    after: h.timeout.0,
                    last,
                });
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 3 / 2).min(Duration::from_millis(500));
        }
    }

    /// Runs one smoke test.
    pub async fn smoke(&self, s: &ResolvedSmoke, exec: &Exec<'_>) -> Result<(), CheckError> {
        if let Some(url) = &s.url {
            probe(
                &self.client,
                url,
                s.expect_status,
                s.expect_body.as_deref(),
                s.timeout.0,
                exec.redact,
            )
            .await
            .map_err(|why| CheckError::Smoke {
                what: url.clone(),
                why,
            })
        } else {
            let command = s.command.clone().unwrap_or_default();
            hooks::run("smoke", &command, exec, s.timeout.0)
                .await
                .map(|_| ())
                .map_err(|e| CheckError::Smoke {
                    what: command.join(" "),
                    why: e.to_string(),
                })
        }
    }
}
