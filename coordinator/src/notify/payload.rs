//! Each service's request, as its API documents it. Pure: a delivery and its channel in, an
//! HTTP request out.
//!
//! - Slack: Block Kit blocks with a `text` fallback (incoming webhooks, or `chat.postMessage`
//!   with a bot token and `channel`); an approval request carries Approve and Reject buttons
//!   (`action_id` `drover_approve` / `drover_reject`, `value` `env/service/version`) when the
//!   channel has a signing secret to verify the clicks with.
//! - PagerDuty Events API v2: `POST /v2/enqueue` with `routing_key`, `event_action`
//!   (`trigger` / `resolve`), `dedup_key`, and for a trigger `payload.summary`, `.source`,
//!   `.severity`, `.custom_details`, and `links`.
//! - Jira REST API v2: `POST /rest/api/2/issue` with `fields.project.key`, `.summary`,
//!   `.issuetype.name`, `.description`, `.labels`; `POST /rest/api/2/issue/{key}/comment` with
//!   `body`.
//! - Webhook: the notice as JSON with its delivery id, signed like GitHub's webhooks:
//!   `X-Drover-Signature-256: sha256=<hex HMAC-SHA256 of the body>`.
//!
//! Every request carries `X-Drover-Delivery: <id>` (receivers dedupe by it). Text from hosts
//! and Git is escaped where the service reads markup (Slack's `&`, `<`, `>`).

use base64::Engine;
use serde_json::{Value, json};

use super::{Action, Channel, Delivery, Event, JiraAuth, Notice, SlackPost, Target};
use crate::auth::cap;

/// An HTTP POST to make.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    /// URL.
    pub url: String,
    /// Headers (besides `Content-Type: application/json`).
    pub headers: Vec<(&'static str, String)>,
    /// JSON body.
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs and headers may be secrets (Slack's webhook URL, tokens): never printed.
        f.debug_struct("Request")
            .field("body_bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// The header every request carries: the delivery id.
pub const DELIVERY_HEADER: &str = "X-Drover-Delivery";
/// The webhook signature header.
pub const SIGNATURE_HEADER: &str = "X-Drover-Signature-256";

/// The request that makes delivery `d` on `channel`. `public_url` is where the coordinator is
/// reached (links).
pub fn build(channel: &Channel, d: &Delivery, public_url: &str) -> Request {
    let n = &d.notice;
    let link = n.link(public_url);
    let mut headers = vec![(DELIVERY_HEADER, d.id.clone())];
    let (url, body) = match &channel.target {
        Target::Slack {
            post,
            signing_secret,
            ..
        } => {
            let mut msg = slack_message(n, &link, signing_secret.is_some());
            let url = match post {
                SlackPost::Webhook(url) => url.clone(),
                SlackPost::Bot {
                    base_url,
                    token,
                    channel,
                } => {
                    msg["channel"] = channel.clone().into();
                    headers.push(("Authorization", format!("Bearer {token}")));
                    format!("{}/chat.postMessage", base_url.trim_end_matches('/'))
                }
            };
            (url, msg)
        }
        Target::Pagerduty {
            base_url,
            routing_key,
        } => (
            format!("{}/v2/enqueue", base_url.trim_end_matches('/')),
            pagerduty_event(n, &d.action, routing_key, &link),
        ),
        Target::Jira {
            base_url,
            project,
            issue_type,
            auth,
        } => {
            headers.push((
                "Authorization",
                match auth {
                    JiraAuth::Basic { email, token } => format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD
                            .encode(format!("{email}:{token}"))
                    ),
                    JiraAuth::Bearer(t) => format!("Bearer {t}"),
                },
            ));
            let base = base_url.trim_end_matches('/');
            match &d.action {
                Action::Comment { issue, .. } => (
                    format!(
                        "{base}/rest/api/2/issue/{}/comment",
                        issue.as_deref().unwrap_or("")
                    ),
                    json!({ "body": jira_text(n, &link) }),
                ),
                _ => (
                    format!("{base}/rest/api/2/issue"),
                    jira_issue(n, project, issue_type, &link),
                ),
            }
        }
        Target::Webhook { url, secret } => {
            let body = serde_json::to_vec(&webhook_event(d, &link)).expect("JSON");
            headers.push((
                SIGNATURE_HEADER,
                format!("sha256={}", crate::webhook::hmac_hex(secret, &body)),
            ));
            headers.push(("X-Drover-Event", n.event.name().to_string()));
            return Request {
                url: url.clone(),
                headers,
                body,
            };
        }
    };
    Request {
        url,
        headers,
        body: serde_json::to_vec(&body).expect("JSON"),
    }
}

/// Escapes text for Slack's mrkdwn (`&`, `<`, `>`; the only markup Slack reads in text).
pub fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The rollout's facts, as (label, value) lines.
fn facts(n: &Notice) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("Environment", n.environment.clone()),
        ("Service", n.service.clone()),
        ("Version", n.version.clone()),
        ("Commit", n.commit.chars().take(12).collect()),
        ("Hosts", n.hosts_text()),
    ];
    if let Some(a) = &n.approvers {
        f.push(("Approvers", a.clone()));
    }
    f
}

fn reason(n: &Notice) -> String {
    n.reason.clone().unwrap_or_else(|| "no reason given".into())
}

/// A Slack message: Block Kit, with a plain `text` fallback (notifications, screen readers).
pub fn slack_message(n: &Notice, link: &str, buttons: bool) -> Value {
    let headline = n.headline();
    let fallback = format!(
        "{} (environment {}, service {}, version {}, commit {}, hosts: {}): {} — {}",
        headline,
        n.environment,
        n.service,
        n.version,
        &n.commit[..n.commit.len().min(12)],
        n.hosts_text(),
        reason(n),
        link
    );
    let fields: Vec<Value> = facts(n)
        .into_iter()
        .map(|(k, v)| json!({ "type": "mrkdwn", "text": format!("*{k}*\n{}", slack_escape(&cap(&v, 1900))) }))
        .collect();
    let mut blocks = vec![
        json!({ "type": "header", "text": { "type": "plain_text", "text": cap(&headline, 140), "emoji": true } }),
        json!({ "type": "section", "fields": fields }),
        json!({ "type": "section", "text": { "type": "mrkdwn", "text": format!("*Reason*\n{}", slack_escape(&cap(&reason(n), 2900))) } }),
    ];
    if buttons && n.event == Event::ApprovalRequired {
        let value = n.subject();
        blocks.push(json!({
            "type": "actions",
            "block_id": "drover_approval",
            "elements": [
                { "type": "button", "action_id": "drover_approve", "style": "primary",
                  "text": { "type": "plain_text", "text": "Approve" }, "value": value },
                { "type": "button", "action_id": "drover_reject", "style": "danger",
                  "text": { "type": "plain_text", "text": "Reject" }, "value": value },
            ]
        }));
    }
    blocks.push(json!({
        "type": "context",
        "elements": [ { "type": "mrkdwn", "text": format!("<{}|rollout {}> · {}", slack_escape(link), n.rollout, n.event) } ]
    }));
    json!({ "text": cap(&slack_escape(&fallback), 3000), "blocks": blocks })
}

/// A PagerDuty Events API v2 event.
pub fn pagerduty_event(n: &Notice, action: &Action, routing_key: &str, link: &str) -> Value {
    match action {
        Action::Resolve { dedup_key } => json!({
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": dedup_key,
        }),
        Action::Trigger { dedup_key } => {
            let severity = match n.event {
                Event::Failed | Event::RolledBack => "critical",
                _ => "warning",
            };
            json!({
                "routing_key": routing_key,
                "event_action": "trigger",
                "dedup_key": dedup_key,
                "client": "drover",
                "client_url": link,
                "links": [ { "href": link, "text": format!("rollout {}", n.rollout) } ],
                "payload": {
                    "summary": cap(&format!("{}: {}", n.headline(), reason(n)), 1000),
                    "source": format!("drover/{}/{}", n.environment, n.service),
                    "severity": severity,
                    "component": n.service,
                    "group": n.environment,
                    "class": n.event.name(),
                    "custom_details": notice_details(n),
                }
            })
        }
        // The planner gives PagerDuty only triggers and resolves.
        _ => json!({ "routing_key": routing_key, "event_action": "trigger" }),
    }
}

fn notice_details(n: &Notice) -> Value {
    json!({
        "event": n.event.name(),
        "rollout": n.rollout,
        "environment": n.environment,
        "service": n.service,
        "version": n.version,
        "commit": n.commit,
        "state": n.state,
        "hosts": n.hosts,
        "host_count": n.host_count,
        "reason": n.reason,
    })
}

/// Jira's text (wiki markup is not interpreted in what drover writes: it is plain lines).
fn jira_text(n: &Notice, link: &str) -> String {
    let mut t = format!("{}\n\n", n.headline());
    for (k, v) in facts(n) {
        t.push_str(&format!("{k}: {v}\n"));
    }
    t.push_str(&format!("Reason: {}\nRollout: {link}\n", reason(n)));
    cap(&t, 30_000)
}

/// A Jira issue for a failure.
pub fn jira_issue(n: &Notice, project: &str, issue_type: &str, link: &str) -> Value {
    // Jira's summary is one line of at most 255 characters.
    let summary: String = n
        .headline()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(250)
        .collect();
    json!({
        "fields": {
            "project": { "key": project },
            "summary": summary,
            "issuetype": { "name": issue_type },
            "description": jira_text(n, link),
            "labels": ["drover"],
        }
    })
}

/// The webhook's event.
pub fn webhook_event(d: &Delivery, link: &str) -> Value {
    let n = &d.notice;
    json!({
        "delivery": d.id,
        "event": n.event.name(),
        "summary": n.headline(),
        "rollout": {
            "id": n.rollout,
            "environment": n.environment,
            "service": n.service,
            "version": n.version,
            "commit": n.commit,
            "state": n.state,
        },
        "hosts": n.hosts,
        "host_count": n.host_count,
        "reason": n.reason,
        "approvers": n.approvers,
        "link": link,
        "at_ms": n.at_ms,
    })
}
