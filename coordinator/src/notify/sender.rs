//! Delivers the outbox. The actor hands over each delivery once it is stored (and all pending
//! ones at start); the sender tries each when due, at most [`PER_CHANNEL`] at once per channel
//! and [`IN_FLIGHT`] in all, each attempt bounded in time ([`ATTEMPT_TIMEOUT`]) and in what it
//! reads back, and reports every outcome to the actor, which stores it. It never holds the
//! actor: a receiver that hangs costs one of its channel's slots until the timeout, nothing
//! else.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;

use super::payload::{self, Request};
use super::{Action, Attempt, Channel, Delivery, SlackPost, Target, Verdict, backoff, classify};
use crate::actor::now_ms;

/// Attempts at once per channel.
pub const PER_CHANNEL: usize = 2;
/// Attempts at once in all.
pub const IN_FLIGHT: usize = 16;
/// The longest one attempt may take (connect, send, answer).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of an answer read (Jira's created issue, Slack's `ok`).
const MAX_ANSWER: usize = 64 << 10;

/// Where outcomes go: (delivery id, outcome).
pub type Report = Arc<dyn Fn(String, Attempt) + Send + Sync>;

/// The HTTP client deliveries use: no redirects (a redirect could carry a token elsewhere),
/// bounded in time.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(ATTEMPT_TIMEOUT)
        .user_agent(concat!("drover-coordinator/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("HTTP client")
}

/// Runs until `rx` closes.
pub async fn run(
    channels: Arc<BTreeMap<String, Channel>>,
    public_url: String,
    mut rx: UnboundedReceiver<Delivery>,
    report: Report,
) {
    let client = client();
    let mut queue: HashMap<String, Delivery> = HashMap::new();
    let mut busy: HashSet<String> = HashSet::new();
    let mut per_channel: HashMap<String, usize> = HashMap::new();
    let mut tasks: JoinSet<(String, String, Attempt)> = JoinSet::new();
    loop {
        let now = now_ms();
        let mut due: Vec<&Delivery> = queue
            .values()
            .filter(|d| !busy.contains(&d.id) && d.next_at_ms <= now)
            .collect();
        due.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        let mut done: Vec<(String, Attempt)> = Vec::new();
        for d in due {
            let Some(ch) = channels.get(&d.channel) else {
                done.push((
                    d.id.clone(),
                    Attempt::GaveUp(format!(
                        "channel `{}` is no longer in coordinator.yaml's notifications",
                        d.channel
                    )),
                ));
                continue;
            };
            if !d.ready() {
                if gave_up(ch, d, now) {
                    done.push((
                        d.id.clone(),
                        Attempt::GaveUp("the Jira issue it comments on was never created".into()),
                    ));
                }
                continue;
            }
            let n = per_channel.entry(d.channel.clone()).or_default();
            if *n >= PER_CHANNEL || tasks.len() >= IN_FLIGHT {
                continue;
            }
            *n += 1;
            busy.insert(d.id.clone());
            let (client, ch, d, url) = (client.clone(), ch.clone(), d.clone(), public_url.clone());
            tasks.spawn(async move {
                let a = attempt(&client, &ch, &d, &url).await;
                (d.id, d.channel, a)
            });
        }
        for (id, a) in done {
            queue.remove(&id);
            tracing::warn!(delivery = %id, outcome = ?a, "notification given up");
            report(id, a);
        }
        // Wake for the next due delivery of a channel with a free slot (a full one wakes the
        // loop when an attempt ends); at least every 5s (a waiting comment's give-up).
        let full = |c: &str| per_channel.get(c).is_some_and(|n| *n >= PER_CHANNEL);
        let wait = queue
            .values()
            .filter(|d| !busy.contains(&d.id) && d.ready() && !full(&d.channel))
            .map(|d| d.next_at_ms.saturating_sub(now))
            .min()
            .unwrap_or(5_000)
            .clamp(20, 5_000);
        tokio::select! {
            got = rx.recv() => match got {
                None => break,
                Some(d) if d.failed_at_ms.is_some() => {
                    queue.remove(&d.id);
                }
                Some(d) => {
                    // The actor's copy is the stored one; the action may have learnt its issue.
                    match queue.get_mut(&d.id) {
                        Some(q) => {
                            q.action = d.action;
                            q.attempts = q.attempts.max(d.attempts);
                            q.next_at_ms = q.next_at_ms.max(d.next_at_ms);
                        }
                        None => {
                            queue.insert(d.id.clone(), d);
                        }
                    }
                }
            },
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok((id, channel, a)) = joined else { continue };
                busy.remove(&id);
                if let Some(n) = per_channel.get_mut(&channel) {
                    *n = n.saturating_sub(1);
                }
                match &a {
                    Attempt::Retry { error, at_ms } => {
                        if let Some(d) = queue.get_mut(&id) {
                            d.attempts += 1;
                            d.next_at_ms = *at_ms;
                            d.last_error = Some(error.clone());
                        }
                        tracing::info!(delivery = %id, %channel, %error, retry_in_ms = at_ms.saturating_sub(now_ms()), "notification not delivered; retrying");
                    }
                    Attempt::Delivered(_) => {
                        queue.remove(&id);
                        tracing::info!(delivery = %id, %channel, "notification delivered");
                    }
                    Attempt::GaveUp(error) => {
                        queue.remove(&id);
                        tracing::warn!(delivery = %id, %channel, %error, "notification given up");
                    }
                }
                report(id, a);
            }
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        }
    }
}

/// Whether `d` has been tried for longer than its channel allows.
fn gave_up(ch: &Channel, d: &Delivery, now: u64) -> bool {
    now.saturating_sub(d.created_at_ms) >= ch.give_up_after.as_millis() as u64
}

/// One attempt at `d`: its outcome, with the retry time or the give-up decided.
pub async fn attempt(
    client: &reqwest::Client,
    ch: &Channel,
    d: &Delivery,
    public_url: &str,
) -> Attempt {
    let req = payload::build(ch, d, public_url);
    let (error, retry_after) = match send(client, ch, &d.action, req).await {
        Ok(issue) => return Attempt::Delivered(issue),
        Err(Failure::Refused(e)) => {
            return Attempt::GaveUp(format!("refused, not retried: {e}"));
        }
        Err(Failure::Retry(e, after)) => (e, after),
    };
    let now = now_ms();
    let tries = d.attempts + 1;
    let at = now + backoff(tries, retry_after).as_millis() as u64;
    if gave_up(ch, d, at) {
        return Attempt::GaveUp(format!(
            "gave up after {tries} attempt(s) over {}: {error}",
            drover_desired::spec::Dur(ch.give_up_after)
        ));
    }
    Attempt::Retry { error, at_ms: at }
}

/// Why an attempt did not deliver.
enum Failure {
    /// Try again (after the receiver's `Retry-After`, if any).
    Retry(String, Option<Duration>),
    /// Do not.
    Refused(String),
}

/// Posts `req`; for a Jira issue created, its key.
async fn send(
    client: &reqwest::Client,
    ch: &Channel,
    action: &Action,
    req: Request,
) -> Result<Option<String>, Failure> {
    let mut r = client
        .post(&req.url)
        .header("Content-Type", "application/json; charset=utf-8");
    for (k, v) in &req.headers {
        r = r.header(*k, v);
    }
    // reqwest's errors name the URL, which may be a secret (Slack's webhook URL).
    let mut resp = r
        .body(req.body)
        .send()
        .await
        .map_err(|e| Failure::Retry(e.without_url().to_string(), None))?;
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        body.extend_from_slice(&chunk[..chunk.len().min(MAX_ANSWER - body.len())]);
        if body.len() >= MAX_ANSWER {
            break;
        }
    }
    let text = || crate::auth::cap(String::from_utf8_lossy(&body).trim(), 300);
    match classify(status, retry_after.as_deref()) {
        Verdict::Ok => {}
        Verdict::Retry(after) => {
            return Err(Failure::Retry(format!("HTTP {status}: {}", text()), after));
        }
        Verdict::Refused => return Err(Failure::Refused(format!("HTTP {status}: {}", text()))),
    }
    match (&ch.target, action) {
        // The Web API answers 200 with `ok: false` for its errors.
        (
            Target::Slack {
                post: SlackPost::Bot { .. },
                ..
            },
            _,
        ) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if v["ok"] == true {
                Ok(None)
            } else {
                let e = v["error"].as_str().unwrap_or("no error given").to_string();
                if e == "ratelimited" {
                    Err(Failure::Retry(format!("Slack: {e}"), None))
                } else {
                    Err(Failure::Refused(format!("Slack: {e}")))
                }
            }
        }
        (Target::Jira { .. }, Action::CreateIssue) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            match v["key"].as_str() {
                Some(k) if crate::core::valid_name(k, 64) => Ok(Some(k.to_string())),
                _ => {
                    tracing::warn!(
                        "Jira created an issue but did not name its key; comments on it will not be made"
                    );
                    Ok(None)
                }
            }
        }
        _ => Ok(None),
    }
}
