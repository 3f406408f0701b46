//! Notifications: who hears of what happens to rollouts, reliably.
//!
//! - Git routes events to channels (`notify:` in `environments/<env>.yaml`); coordinator.yaml
//!   defines the channels and holds their secrets ([`Channel`]).
//! - When a rollout changes, the core turns the event into [`Delivery`]s with [`plan`] (pure),
//!   queued in the store's outbox **in the same transaction** as the change that caused them.
//! - The [`sender`] delivers them at least once (each carries a delivery id receivers can
//!   dedupe by), with backoff, honouring 429 and `Retry-After`, across restarts, and gives up
//!   after the channel's `give_up_after` with an audit entry. It runs apart from the actor: a
//!   slow or dead receiver never slows a lease.
//! - [`payload`] builds each service's request as its API documents it (pure); [`slack`]
//!   verifies Slack's signed button clicks (approve from Slack).
//!
//! PagerDuty and Jira keep an [`Incident`] per (channel, environment, service): a failure opens
//! it (one page, one issue), later failures of the same service add nothing to PagerDuty and a
//! comment to Jira, and the service's next success resolves the page and comments the issue.

pub mod payload;
pub mod sender;
pub mod slack;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

pub use drover_desired::spec::Event;
use serde::{Deserialize, Serialize};

use crate::wire::RolloutState;

/// A route of `notify:`, as the coordinator keeps it with the desired state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The events.
    pub on: BTreeSet<Event>,
    /// The channels.
    pub to: Vec<String>,
}

/// What a channel is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Slack: an incoming webhook, or `chat.postMessage` with a bot token.
    Slack,
    /// PagerDuty Events API v2.
    Pagerduty,
    /// Jira REST API v2.
    Jira,
    /// A signed JSON POST.
    Webhook,
}

impl Kind {
    /// Its name in coordinator.yaml.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Slack => "slack",
            Kind::Pagerduty => "pagerduty",
            Kind::Jira => "jira",
            Kind::Webhook => "webhook",
        }
    }
}

/// How a Slack channel posts.
#[derive(Clone)]
pub enum SlackPost {
    /// To an incoming webhook URL (itself a secret).
    Webhook(String),
    /// `chat.postMessage` at `base_url` with a bot token, to `channel`.
    Bot {
        /// The Web API's base, e.g. `https://slack.com/api`.
        base_url: String,
        /// The bot token.
        token: String,
        /// The channel id or name.
        channel: String,
    },
}

/// How Jira is authenticated.
#[derive(Clone)]
pub enum JiraAuth {
    /// Jira Cloud: an account's email and API token (HTTP Basic).
    Basic {
        /// Email.
        email: String,
        /// API token.
        token: String,
    },
    /// A personal access token (Jira Data Center), as a bearer token.
    Bearer(String),
}

/// What a channel sends to, with its secrets read.
#[derive(Clone)]
pub enum Target {
    /// Slack.
    Slack {
        /// How it posts.
        post: SlackPost,
        /// Verifies button clicks (`POST /v1/integrations/slack/actions`); none: no buttons.
        signing_secret: Option<Vec<u8>>,
        /// Slack user id → drover identity (a token name of coordinator.yaml).
        users: BTreeMap<String, String>,
        /// Where a click's `response_url` may point (Slack's own hooks by default).
        response_url_base: String,
    },
    /// PagerDuty: `POST {base_url}/v2/enqueue`.
    Pagerduty {
        /// Base URL.
        base_url: String,
        /// The integration's routing key.
        routing_key: String,
    },
    /// Jira: issues in `project`.
    Jira {
        /// Base URL (`https://example.atlassian.net`).
        base_url: String,
        /// Project key.
        project: String,
        /// Issue type name (e.g. `Bug`, `Incident`).
        issue_type: String,
        /// Credentials.
        auth: JiraAuth,
    },
    /// A signed webhook.
    Webhook {
        /// URL.
        url: String,
        /// HMAC secret.
        secret: Vec<u8>,
    },
}

impl Target {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Target::Slack { .. } => Kind::Slack,
            Target::Pagerduty { .. } => Kind::Pagerduty,
            Target::Jira { .. } => Kind::Jira,
            Target::Webhook { .. } => Kind::Webhook,
        }
    }
}

/// A channel of coordinator.yaml's `notifications:`.
#[derive(Clone)]
pub struct Channel {
    /// Its name (what `notify:` routes name).
    pub name: String,
    /// Where it sends.
    pub target: Target,
    /// How long a delivery is retried before it is given up (and audited).
    pub give_up_after: Duration,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets (webhook URLs, keys, tokens).
        f.debug_struct("Channel")
            .field("name", &self.name)
            .field("kind", &self.target.kind())
            .field("give_up_after", &self.give_up_after)
            .finish()
    }
}

/// A channel as coordinator.yaml names it, before its secret files are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelSpec {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: Kind,
    /// Slack: incoming webhook URL file.
    pub webhook_url_file: Option<PathBuf>,
    /// Slack: bot token file (with `channel`).
    pub bot_token_file: Option<PathBuf>,
    /// Slack: channel for the bot.
    pub slack_channel: Option<String>,
    /// Slack: signing secret file (buttons).
    pub signing_secret_file: Option<PathBuf>,
    /// Slack: user id → drover identity.
    pub slack_users: BTreeMap<String, String>,
    /// Slack: where `response_url`s may point.
    pub response_url_base: String,
    /// PagerDuty, Jira, Slack's Web API: base URL.
    pub base_url: String,
    /// PagerDuty: routing key file.
    pub routing_key_file: Option<PathBuf>,
    /// Jira: project key.
    pub project: String,
    /// Jira: issue type.
    pub issue_type: String,
    /// Jira: account email (Basic with `token_file`; without, the token is a bearer token).
    pub email: Option<String>,
    /// Jira: token file.
    pub token_file: Option<PathBuf>,
    /// Webhook: URL.
    pub url: String,
    /// Webhook: HMAC secret file.
    pub secret_file: Option<PathBuf>,
    /// Give-up time.
    pub give_up_after: Duration,
}

/// Why a channel cannot be set up.
#[derive(Debug, thiserror::Error)]
#[error("notification channel `{channel}`: {problem}")]
pub struct ChannelError {
    /// The channel.
    pub channel: String,
    /// What is wrong.
    pub problem: String,
}

impl ChannelSpec {
    /// Reads the channel's secret files (each private, non-empty).
    pub fn load(&self) -> Result<Channel, ChannelError> {
        let err = |problem: String| ChannelError {
            channel: self.name.clone(),
            problem,
        };
        let read = |p: &Option<PathBuf>, what: &str| -> Result<String, ChannelError> {
            let p = p
                .as_deref()
                .ok_or_else(|| err(format!("{what} is missing")))?;
            let bytes = crate::webhook::read_secret_file(
                p,
                "anyone on this host could send as drover or read the channel's key",
            )
            .map_err(|e| err(e.to_string()))?;
            String::from_utf8(bytes).map_err(|_| err(format!("{what} is not UTF-8 text")))
        };
        let target = match self.kind {
            Kind::Slack => {
                let post = match (&self.webhook_url_file, &self.bot_token_file) {
                    (Some(_), None) => {
                        let url = read(&self.webhook_url_file, "webhook_url_file")?;
                        if !(url.starts_with("https://") || url.starts_with("http://")) {
                            return Err(err(
                                "the file in webhook_url_file does not hold an http(s) URL".into(),
                            ));
                        }
                        SlackPost::Webhook(url)
                    }
                    _ => SlackPost::Bot {
                        base_url: self.base_url.clone(),
                        token: read(&self.bot_token_file, "bot_token_file")?,
                        channel: self.slack_channel.clone().unwrap_or_default(),
                    },
                };
                let signing_secret = match &self.signing_secret_file {
                    Some(_) => Some(read(&self.signing_secret_file, "signing_secret_file")?),
                    None => None,
                };
                Target::Slack {
                    post,
                    signing_secret: signing_secret.map(String::into_bytes),
                    users: self.slack_users.clone(),
                    response_url_base: self.response_url_base.clone(),
                }
            }
            Kind::Pagerduty => Target::Pagerduty {
                base_url: self.base_url.clone(),
                routing_key: read(&self.routing_key_file, "routing_key_file")?,
            },
            Kind::Jira => {
                let token = read(&self.token_file, "token_file")?;
                Target::Jira {
                    base_url: self.base_url.clone(),
                    project: self.project.clone(),
                    issue_type: self.issue_type.clone(),
                    auth: match &self.email {
                        Some(email) => JiraAuth::Basic {
                            email: email.clone(),
                            token,
                        },
                        None => JiraAuth::Bearer(token),
                    },
                }
            }
            Kind::Webhook => Target::Webhook {
                url: self.url.clone(),
                secret: read(&self.secret_file, "secret_file")?.into_bytes(),
            },
        };
        Ok(Channel {
            name: self.name.clone(),
            target,
            give_up_after: self.give_up_after,
        })
    }
}

/// What happened to a rollout, with what a message names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The event.
    pub event: Event,
    /// The rollout's id.
    pub rollout: u64,
    /// Environment.
    pub environment: String,
    /// Service.
    pub service: String,
    /// Version.
    pub version: String,
    /// The desired-state commit that promoted it.
    pub commit: String,
    /// Its state after the event.
    pub state: RolloutState,
    /// The hosts concerned (failed ones for `failed`, and so on), at most [`MAX_HOSTS`].
    pub hosts: Vec<String>,
    /// How many hosts are concerned in all.
    pub host_count: usize,
    /// Why.
    pub reason: Option<String>,
    /// Who may approve (for `approval_required`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvers: Option<String>,
    /// When.
    pub at_ms: u64,
}

/// The most hosts a notice names (the count says how many there are).
pub const MAX_HOSTS: usize = 50;

impl Notice {
    /// `env/service/version`.
    pub fn subject(&self) -> String {
        format!("{}/{}/{}", self.environment, self.service, self.version)
    }

    /// One line: what happened.
    pub fn headline(&self) -> String {
        let s = self.subject();
        match self.event {
            Event::ApprovalRequired => format!("{s} waits for approval"),
            Event::Started => format!("{s} started rolling out"),
            Event::Succeeded => format!("{s} succeeded"),
            Event::Failed => format!("{s} failed"),
            Event::RolledBack => format!("{s} was rolled back"),
            Event::VerificationMedium => format!("{s}: verification came out medium risk"),
            Event::Paused => format!("{s} is paused"),
        }
    }

    /// The hosts, in words.
    pub fn hosts_text(&self) -> String {
        if self.host_count == 0 {
            return "none".into();
        }
        let mut t = self.hosts.join(", ");
        if self.host_count > self.hosts.len() {
            t.push_str(&format!(" and {} more", self.host_count - self.hosts.len()));
        }
        t
    }

    /// Where the rollout is seen (the dashboard's page of it), under the coordinator's public
    /// URL.
    pub fn link(&self, public_url: &str) -> String {
        format!(
            "{}/ui/rollouts/{}",
            public_url.trim_end_matches('/'),
            self.rollout
        )
    }
}

/// What a delivery does at its receiver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Action {
    /// A Slack message or a webhook event.
    Post,
    /// Open (or add to) a PagerDuty alert.
    Trigger {
        /// PagerDuty's dedup key: one alert per failing rollout.
        dedup_key: String,
    },
    /// Resolve a PagerDuty alert.
    Resolve {
        /// The alert's dedup key.
        dedup_key: String,
    },
    /// Create a Jira issue.
    CreateIssue,
    /// Comment on a Jira issue.
    Comment {
        /// The issue's key, once known.
        issue: Option<String>,
        /// The delivery that creates the issue, while its key is not known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
    },
}

impl Action {
    /// Its name (`drover notifications`).
    pub fn name(&self) -> &'static str {
        match self {
            Action::Post => "post",
            Action::Trigger { .. } => "trigger",
            Action::Resolve { .. } => "resolve",
            Action::CreateIssue => "create_issue",
            Action::Comment { .. } => "comment",
        }
    }
}

/// One message for one channel, as queued in the outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Unique: receivers dedupe by it (a delivery may come twice, never with two ids).
    pub id: String,
    /// The channel.
    pub channel: String,
    /// What it does.
    pub action: Action,
    /// What happened.
    pub notice: Notice,
    /// Queued.
    pub created_at_ms: u64,
    /// Attempts made.
    pub attempts: u32,
    /// Not before.
    pub next_at_ms: u64,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When it was given up (kept for `drover notifications`).
    pub failed_at_ms: Option<u64>,
}

impl Delivery {
    /// Whether the sender may send it now: pending, and not a comment on an issue not yet
    /// created.
    pub fn ready(&self) -> bool {
        self.failed_at_ms.is_none() && !matches!(self.action, Action::Comment { issue: None, .. })
    }
}

/// An open PagerDuty alert or Jira issue of a (channel, environment, service).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    /// The channel.
    pub channel: String,
    /// Environment.
    pub environment: String,
    /// Service.
    pub service: String,
    /// The rollout whose failure opened it.
    pub rollout: u64,
    /// PagerDuty's dedup key.
    pub dedup_key: String,
    /// The Jira issue's key, once created.
    pub issue: Option<String>,
    /// The delivery that creates the Jira issue.
    pub created_by: Option<String>,
    /// Opened.
    pub opened_at_ms: u64,
}

impl Incident {
    /// Its key in the store.
    pub fn key(&self) -> String {
        incident_key(&self.channel, &self.environment, &self.service)
    }
}

/// The store key of the incident of (channel, environment, service).
pub fn incident_key(channel: &str, env: &str, service: &str) -> String {
    format!("{channel}/{env}/{service}")
}

/// PagerDuty's dedup key for a rollout: names it, and is the same for every event of it.
pub fn dedup_key(env: &str, service: &str, rollout: u64) -> String {
    format!("drover/{env}/{service}/rollout-{rollout}")
}

/// What [`plan`] decided for one notice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// (channel, action, delivery id) to queue.
    pub send: Vec<(String, Action, String)>,
    /// Incidents opened.
    pub open: Vec<Incident>,
    /// Incidents closed (by key).
    pub close: Vec<String>,
    /// Channels the routes name that coordinator.yaml does not define.
    pub unknown: Vec<String>,
}

/// Whether an event is a failure that pages and opens an issue.
fn is_failure(e: Event) -> bool {
    matches!(e, Event::Failed | Event::RolledBack)
}

/// Which channels hear of `notice`, and what each does: pure. `kinds` are coordinator.yaml's
/// channels; `incidents` those open. `new_id` names the delivery that creates a Jira issue
/// (a comment queued in the same plan waits for its key).
pub fn plan(
    notice: &Notice,
    routes: &[Route],
    kinds: &BTreeMap<String, Kind>,
    incidents: &BTreeMap<String, Incident>,
    mut new_id: impl FnMut() -> String,
) -> Plan {
    let mut p = Plan::default();
    let mut named: Vec<&str> = Vec::new();
    for r in routes.iter().filter(|r| r.on.contains(&notice.event)) {
        for c in &r.to {
            if !named.contains(&c.as_str()) {
                named.push(c);
            }
        }
    }
    // A success resolves what the service's failure opened, routed or not.
    if notice.event == Event::Succeeded {
        for i in incidents.values() {
            if i.environment == notice.environment
                && i.service == notice.service
                && !named.contains(&i.channel.as_str())
            {
                named.push(&i.channel);
            }
        }
    }
    let env = &notice.environment;
    let service = &notice.service;
    for c in named {
        let Some(kind) = kinds.get(c) else {
            p.unknown.push(c.to_string());
            continue;
        };
        let key = incident_key(c, env, service);
        let open = incidents.get(&key);
        let action = match kind {
            Kind::Slack | Kind::Webhook => Some(Action::Post),
            Kind::Pagerduty => match (notice.event, open) {
                (Event::Succeeded, Some(i)) => {
                    p.close.push(key);
                    Some(Action::Resolve {
                        dedup_key: i.dedup_key.clone(),
                    })
                }
                // Already paged for this service: PagerDuty would only add to the alert.
                (_, Some(_)) => None,
                (
                    Event::Failed | Event::RolledBack | Event::Paused | Event::VerificationMedium,
                    None,
                ) => {
                    let dedup = dedup_key(env, service, notice.rollout);
                    p.open.push(Incident {
                        channel: c.to_string(),
                        environment: env.clone(),
                        service: service.clone(),
                        rollout: notice.rollout,
                        dedup_key: dedup.clone(),
                        issue: None,
                        created_by: None,
                        opened_at_ms: notice.at_ms,
                    });
                    Some(Action::Trigger { dedup_key: dedup })
                }
                // Nothing to page about.
                (Event::Succeeded | Event::Started | Event::ApprovalRequired, None) => None,
            },
            Kind::Jira => match open {
                Some(i) => {
                    if notice.event == Event::Succeeded {
                        p.close.push(key);
                    }
                    Some(Action::Comment {
                        issue: i.issue.clone(),
                        after: if i.issue.is_none() {
                            i.created_by.clone()
                        } else {
                            None
                        },
                    })
                }
                None if is_failure(notice.event) => {
                    let id = new_id();
                    p.open.push(Incident {
                        channel: c.to_string(),
                        environment: env.clone(),
                        service: service.clone(),
                        rollout: notice.rollout,
                        dedup_key: dedup_key(env, service, notice.rollout),
                        issue: None,
                        created_by: Some(id.clone()),
                        opened_at_ms: notice.at_ms,
                    });
                    p.send.push((c.to_string(), Action::CreateIssue, id));
                    None
                }
                // No issue is opened for what is not a failure.
                None => None,
            },
        };
        if let Some(a) = action {
            p.send.push((c.to_string(), a, new_id()));
        }
    }
    p
}

/// `GET /v1/notifications`: deliveries waiting or given up, and open incidents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// Deliveries, oldest first.
    pub deliveries: Vec<Delivery>,
    /// Open PagerDuty alerts and Jira issues.
    pub incidents: Vec<Incident>,
}

/// The outcome of one attempt, as the sender classifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The receiver took it; for a Jira issue created, its key.
    Delivered(Option<String>),
    /// Try again, not before `at_ms`.
    Retry {
        /// What went wrong.
        error: String,
        /// When.
        at_ms: u64,
    },
    /// Given up: a refusal that retrying cannot change, or the channel's give-up time passed.
    GaveUp(String),
}

/// The first wait between attempts, doubled after each, up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between attempts (without a `Retry-After`).
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// The longest `Retry-After` honoured.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(3600);

/// How long to wait before attempt `attempts + 1`, after `attempts` failed ones: the
/// receiver's `Retry-After` when it gave one (capped), else exponential backoff. Pure.
pub fn backoff(attempts: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(d) = retry_after {
        return d.clamp(Duration::from_millis(100), RETRY_AFTER_MAX);
    }
    let exp = attempts.saturating_sub(1).min(16);
    (RETRY_FIRST * 2u32.pow(exp)).min(RETRY_MAX)
}

/// What an HTTP answer means for a delivery. Pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Taken.
    Ok,
    /// Retry (after the `Retry-After`, if any).
    Retry(Option<Duration>),
    /// Refused for good.
    Refused,
}

/// Classifies a status: 2xx taken; 408, 425, 429 and 5xx retried; other 4xx refused for good
/// (a bad key or payload does not heal by retrying). Pure.
pub fn classify(status: u16, retry_after: Option<&str>) -> Verdict {
    match status {
        200..=299 => Verdict::Ok,
        408 | 425 | 429 | 500..=599 => Verdict::Retry(retry_after.and_then(parse_retry_after)),
        _ => Verdict::Refused,
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not used by these services and is ignored).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests;
