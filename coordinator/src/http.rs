//! The HTTP layer: routes of docs/protocol.md, authentication, body limits, JSON errors. Each
//! handler checks the caller and the body, then hands a [`Command`] to the actor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use crate::actor::{Command, Reply};
use crate::auth::{Caller, Need, RateLimiter, Tokens, cap};
use crate::core::ApiError;
use crate::notify::slack as slack_verify;
use crate::notify::{Channel, Target};
use crate::server::ServerStats;
use crate::webhook::{self, Secrets};
use crate::wire::{
    AcquireRequest, GateRequest, Heartbeat, PROTOCOL, PROTOCOL_HEADER, ReleaseRequest,
    RollbackRequest, TrafficRequest,
};

/// Largest request body accepted.
pub const MAX_BODY: usize = 256 << 10;

/// Most token buckets the rate limiter keeps.
const RATE_KEYS: usize = 200_000;

/// Shared by the handlers.
#[derive(Clone)]
pub struct App {
    pub(crate) tx: mpsc::Sender<Command>,
    tokens: Arc<RwLock<Arc<Tokens>>>,
    rate: Arc<Mutex<RateLimiter>>,
    requests: Arc<[AtomicU64; 6]>,
    /// Requests without a valid token (never stored, only counted).
    pub(crate) unauthenticated: Arc<AtomicU64>,
    /// Requests refused by the rate limit.
    pub(crate) rate_limited: Arc<AtomicU64>,
    /// The server's counters, shown in /metrics.
    server: Arc<ServerStats>,
    /// Git webhooks: the forges' secrets and the channel that asks for a fetch.
    git_webhook: Option<GitWebhook>,
    /// The branch tip as fetched, and how long a long-poll of it is held at most.
    tip: Option<Tip>,
    /// Git webhooks verified (0) and refused (1), for /metrics.
    webhooks: Arc<[AtomicU64; 2]>,
    /// Long-polls of the tip held now, for /metrics.
    tip_waiting: Arc<AtomicU64>,
    /// Slack apps whose signed button clicks approve and reject.
    slack: Option<Slack>,
    /// The web dashboard (`/ui/`).
    pub(crate) ui: Option<Arc<crate::ui::Ui>>,
}

/// What `POST /v1/integrations/slack/actions` needs.
#[derive(Clone)]
struct Slack {
    /// The Slack channels with a signing secret.
    apps: Arc<Vec<SlackApp>>,
    /// Bounds the bodies read at once (read before they can be verified).
    reading: Arc<tokio::sync::Semaphore>,
    /// Posts to `response_url`s.
    client: reqwest::Client,
}

/// One Slack channel's click settings.
struct SlackApp {
    channel: String,
    signing_secret: Vec<u8>,
    users: std::collections::BTreeMap<String, String>,
    response_url_base: String,
}

impl App {
    /// Handlers sending to the actor through `tx`, checking `tokens`, allowing each token
    /// `rate` requests a second with bursts of `burst` (rate 0: no limit).
    pub fn new(
        tx: mpsc::Sender<Command>,
        tokens: Tokens,
        rate: u32,
        burst: u32,
        server: Arc<ServerStats>,
    ) -> App {
        App {
            tx,
            tokens: Arc::new(RwLock::new(Arc::new(tokens))),
            rate: Arc::new(Mutex::new(RateLimiter::new(rate, burst, RATE_KEYS))),
            requests: Arc::new(Default::default()),
            unauthenticated: Arc::new(AtomicU64::new(0)),
            rate_limited: Arc::new(AtomicU64::new(0)),
            server,
            git_webhook: None,
            tip: None,
            webhooks: Arc::default(),
            tip_waiting: Arc::default(),
            slack: None,
            ui: None,
        }
    }

    /// Serves the web dashboard under `/ui/`.
    pub fn with_ui(mut self, ui: crate::ui::Ui) -> App {
        self.ui = Some(Arc::new(ui));
        self
    }

    /// Takes Slack's button clicks for the Slack channels of `channels` that have a signing
    /// secret (none: `/v1/integrations/slack/actions` answers 404).
    pub fn with_slack(mut self, channels: &std::collections::BTreeMap<String, Channel>) -> App {
        let apps: Vec<SlackApp> = channels
            .values()
            .filter_map(|c| match &c.target {
                Target::Slack {
                    signing_secret: Some(secret),
                    users,
                    response_url_base,
                    ..
                } => Some(SlackApp {
                    channel: c.name.clone(),
                    signing_secret: secret.clone(),
                    users: users.clone(),
                    response_url_base: response_url_base.clone(),
                }),
                _ => None,
            })
            .collect();
        if !apps.is_empty() {
            self.slack = Some(Slack {
                apps: Arc::new(apps),
                reading: Arc::new(tokio::sync::Semaphore::new(WEBHOOKS_AT_ONCE)),
                client: crate::notify::sender::client(),
            });
        }
        self
    }

    /// Serves `GET /v1/tip` from `tip`, holding a long-poll at most `max_wait`, or until
    /// `stop` (shutting down) is set.
    pub fn with_tip(
        mut self,
        tip: tokio::sync::watch::Receiver<Option<String>>,
        max_wait: std::time::Duration,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> App {
        self.tip = Some(Tip {
            tip,
            max_wait,
            stop,
        });
        self
    }

    /// Accepts Git push webhooks signed with `secrets`; each verified one sends on `wake`
    /// (a fetch now; a full channel means one is already due).
    pub fn with_git_webhook(
        mut self,
        secrets: Secrets,
        wake: tokio::sync::mpsc::Sender<()>,
    ) -> App {
        if secrets.any() {
            self.git_webhook = Some(GitWebhook {
                secrets: Arc::new(secrets),
                wake,
                reading: Arc::new(tokio::sync::Semaphore::new(WEBHOOKS_AT_ONCE)),
            });
        }
        self
    }

    /// Replaces the tokens (SIGHUP). Requests under way keep the tokens they were checked
    /// with; leases are untouched.
    pub fn set_tokens(&self, tokens: Tokens) {
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
    }

    pub(crate) fn tokens(&self) -> Arc<Tokens> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The router of the API (`listen`). `/metrics` there needs a token that may read.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_with_token))
        .route("/v1/hosts/{host}/heartbeat", post(heartbeat))
        .route("/v1/leases", post(acquire))
        .route("/v1/leases/{id}/renew", post(renew))
        .route("/v1/leases/{id}/release", post(release))
        .route("/v1/leases/{id}/gate", post(gate))
        .route("/v1/leases/{id}/traffic", post(traffic))
        .route("/v1/status", get(status))
        .route("/v1/history", get(history))
        .route(
            "/v1/rollouts/{env}/{service}/{version}/{verb}",
            post(decide),
        )
        .route("/v1/rollouts/{env}/{service}/{verb}", post(operate))
        .route("/v1/webhooks/git", post(git_webhook))
        .route("/v1/integrations/slack/actions", post(slack_actions))
        .route("/v1/notifications", get(notifications))
        .route("/v1/rollouts/{id}", get(rollout))
        .route("/v1/tip", get(tip))
        .merge(crate::ui::routes())
        .fallback(|| async { ApiError::not_found("no such endpoint; see docs/protocol.md") })
        .with_state(app)
}

/// The router of `metrics_listen`: `/metrics` and `/healthz` without a token, nothing else.
pub fn metrics_router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("this address serves only /metrics") })
        .with_state(app)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(status, &self.body)
    }
}

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).expect("response serializes");
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

fn count(app: &App, status: u16) {
    let i = match status {
        200..=299 => 0,
        401 | 403 => 1,
        409 => 2,
        400..=499 => 3,
        500..=599 => 4,
        _ => 5,
    };
    app.requests[i].fetch_add(1, Ordering::Relaxed);
}

/// Checks the protocol header and the token; audits denials.
fn caller(app: &App, headers: &HeaderMap, need: Need, what: &str) -> Result<Caller, ApiError> {
    match headers.get(PROTOCOL_HEADER).and_then(|v| v.to_str().ok()) {
        Some(PROTOCOL) => {}
        Some(other) => {
            return Err(ApiError {
                status: 400,
                body: crate::wire::ErrorBody {
                    kind: crate::wire::ErrorKind::Protocol,
                    message: format!(
                        "{PROTOCOL_HEADER}: {other} is not supported; this coordinator speaks {PROTOCOL}"
                    ),
                    reason: None,
                    retry_after_ms: None,
                },
            });
        }
        None => {
            return Err(ApiError {
                status: 400,
                body: crate::wire::ErrorBody {
                    kind: crate::wire::ErrorKind::Protocol,
                    message: format!("missing {PROTOCOL_HEADER}: {PROTOCOL} header"),
                    reason: None,
                    retry_after_ms: None,
                },
            });
        }
    }
    authenticate(app, headers, need, what)
}

/// Checks the token (not the protocol header: for `/metrics`, which scrapers read).
fn authenticate(
    app: &App,
    headers: &HeaderMap,
    need: Need,
    what: &str,
) -> Result<Caller, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Without a valid token nothing reaches the actor nor the store (a flood of them cannot
    // grow the audit): it is only counted.
    let unauthorized = |why: &str| {
        app.unauthenticated.fetch_add(1, Ordering::Relaxed);
        ApiError::new(401, crate::wire::ErrorKind::Unauthorized, why)
    };
    let Some(token) = token else {
        return Err(unauthorized("missing bearer token"));
    };
    let Some(c) = app.tokens().check(token).cloned() else {
        return Err(unauthorized("unknown token"));
    };
    if !need.allows(c.role) {
        let why = format!(
            "token {} has role {}; this needs {}",
            c.name,
            c.role.name(),
            need.roles()
        );
        return Err(deny(app, &c, what, why));
    }
    Ok(c)
}

/// A 403 for a known token, audited (the actor caps the text). Denials count against the
/// token's rate like any request: over it, the answer is 429 and nothing is audited, so a
/// token cannot grow the audit faster than its rate.
fn deny(app: &App, who: &Caller, what: &str, why: String) -> ApiError {
    if let Err(e) = limit(app, who, None) {
        return e;
    }
    let _ = app.tx.send(Command::Denied {
        who: who.name.clone(),
        what: what.into(),
        why: why.clone(),
    });
    ApiError::forbidden(why)
}

/// The rate limit of `who` (acting as `host`, for an agent): 429 `rate_limited` when over.
/// A host-bound token has one bucket; a fleet-wide agent token one per host it acts as.
fn limit(app: &App, who: &Caller, host: Option<&str>) -> Result<(), ApiError> {
    let key = match host {
        Some(h) if who.host.is_none() => format!("{}/{}", who.name, cap(h, 253)),
        _ => who.name.clone(),
    };
    let taken = app
        .rate
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take(&key, std::time::Instant::now());
    taken.map_err(|wait| {
        app.rate_limited.fetch_add(1, Ordering::Relaxed);
        ApiError::rate_limited(
            (wait.as_millis() as u64).max(100),
            format!(
                "token {} sends more requests than the coordinator's rate limit (limits.requests_per_second); slow down",
                who.name
            ),
        )
    })
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes.
async fn body<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| too_large())?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes; an empty body is the default value.
async fn optional_body<T: DeserializeOwned + Default>(b: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(b, MAX_BODY)
        .await
        .map_err(|_| too_large())?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn too_large() -> ApiError {
    ApiError {
        status: 413,
        body: crate::wire::ErrorBody {
            kind: crate::wire::ErrorKind::PayloadTooLarge,
            message: format!("request body over {MAX_BODY} bytes"),
            reason: None,
            retry_after_ms: None,
        },
    }
}

/// Sends a command and waits for its answer.
async fn ask<T>(app: &App, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    app.tx
        .send(make(tx))
        .map_err(|_| ApiError::internal("the coordinator is shutting down"))?;
    rx.await
        .map_err(|_| ApiError::internal("the coordinator is shutting down"))?
}

fn answer<T: Serialize>(app: &App, r: Result<T, ApiError>) -> Response {
    let resp = match r {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    };
    count(app, resp.status().as_u16());
    resp
}

async fn healthz(State(app): State<App>) -> Response {
    match ask(&app, Command::Metrics).await {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics_with_token(State(app): State<App>, headers: HeaderMap) -> Response {
    match authenticate(&app, &headers, Need::Read, "metrics") {
        Ok(_) => metrics(State(app)).await,
        Err(e) => answer::<()>(&app, Err(e)),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    match ask(&app, Command::Metrics).await {
        Ok(mut text) => {
            text.push_str(&format!(
                "# TYPE drover_coordinator_unauthenticated_total counter\ndrover_coordinator_unauthenticated_total {}\n",
                app.unauthenticated.load(Ordering::Relaxed)
            ));
            text.push_str(&format!(
                "# TYPE drover_coordinator_rate_limited_total counter\ndrover_coordinator_rate_limited_total {}\n",
                app.rate_limited.load(Ordering::Relaxed)
            ));
            text.push_str("# TYPE drover_coordinator_git_webhooks_total counter\n");
            for (i, result) in ["verified", "refused"].iter().enumerate() {
                text.push_str(&format!(
                    "drover_coordinator_git_webhooks_total{{result=\"{result}\"}} {}\n",
                    app.webhooks[i].load(Ordering::Relaxed)
                ));
            }
            if let Some(hook) = &app.git_webhook {
                text.push_str(&format!(
                    "# TYPE drover_coordinator_git_webhooks_reading gauge\ndrover_coordinator_git_webhooks_reading {}\n",
                    WEBHOOKS_AT_ONCE - hook.reading.available_permits()
                ));
            }
            text.push_str(&format!(
                "# TYPE drover_coordinator_tip_waiting gauge\ndrover_coordinator_tip_waiting {}\n",
                app.tip_waiting.load(Ordering::Relaxed)
            ));
            text.push_str(&app.server.metrics());
            text.push_str("# TYPE drover_coordinator_http_responses_total counter\n");
            for (i, class) in ["2xx", "auth", "wait", "4xx", "5xx", "other"]
                .iter()
                .enumerate()
            {
                text.push_str(&format!(
                    "drover_coordinator_http_responses_total{{class=\"{class}\"}} {}\n",
                    app.requests[i].load(Ordering::Relaxed)
                ));
            }
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Largest webhook body accepted (a forge's push event; GitHub lists at most 20 commits).
const MAX_WEBHOOK_BODY: usize = 1 << 20;

/// Webhook bodies read at once: they are read before their signature can be checked, so
/// unauthenticated callers hold at most this many MiB (the others get 429).
const WEBHOOKS_AT_ONCE: usize = 8;

/// What `POST /v1/webhooks/git` needs.
#[derive(Clone)]
struct GitWebhook {
    /// The forges' secrets.
    secrets: Arc<Secrets>,
    /// Asks the Git follower for a fetch now.
    wake: tokio::sync::mpsc::Sender<()>,
    /// Bounds the bodies read at once.
    reading: Arc<tokio::sync::Semaphore>,
}

/// `POST /v1/webhooks/git`: authenticated by the forge's signature, not a token; a verified
/// one asks for a fetch of the repo now (202), anything else is 401 and fetches nothing.
async fn git_webhook(State(app): State<App>, headers: HeaderMap, b: Body) -> Response {
    let r = async {
        let Some(GitWebhook {
            secrets,
            wake,
            reading,
        }) = &app.git_webhook
        else {
            return Err(ApiError::not_found(
                "Git webhooks are not set up: coordinator.yaml needs `webhook: { github_secret_file | gitlab_token_file | gitea_secret_file }`",
            ));
        };
        let Ok(_permit) = reading.try_acquire() else {
            return Err(ApiError::rate_limited(
                1000,
                format!("{WEBHOOKS_AT_ONCE} webhooks are being read; retry"),
            ));
        };
        let bytes = axum::body::to_bytes(b, MAX_WEBHOOK_BODY)
            .await
            .map_err(|_| ApiError::new(413, crate::wire::ErrorKind::PayloadTooLarge, format!("webhook body over {MAX_WEBHOOK_BODY} bytes")))?;
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        match webhook::verify(secrets, header, &bytes) {
            Ok(forge) => {
                // A full channel: a fetch is already due, which will see this push too.
                let _ = wake.try_send(());
                app.webhooks[0].fetch_add(1, Ordering::Relaxed);
                tracing::info!(forge = ?forge, "git webhook: fetching the repo now");
                Ok(serde_json::json!({ "fetching": true }))
            }
            Err(refused) => {
                app.unauthenticated.fetch_add(1, Ordering::Relaxed);
                app.webhooks[1].fetch_add(1, Ordering::Relaxed);
                tracing::warn!(reason = %refused, "git webhook refused");
                Err(ApiError::new(
                    401,
                    crate::wire::ErrorKind::Unauthorized,
                    refused.to_string(),
                ))
            }
        }
    }
    .await;
    let resp = match r {
        Ok(v) => json_response(StatusCode::ACCEPTED, &v),
        Err(e) => e.into_response(),
    };
    count(&app, resp.status().as_u16());
    resp
}

/// What `GET /v1/tip` answers from.
#[derive(Clone)]
struct Tip {
    tip: tokio::sync::watch::Receiver<Option<String>>,
    max_wait: std::time::Duration,
    stop: tokio::sync::watch::Receiver<bool>,
}

/// Counts a held long-poll while it lives (a request dropped by its client included).
struct Held(Arc<AtomicU64>);

impl Held {
    fn new(count: &Arc<AtomicU64>) -> Held {
        count.fetch_add(1, Ordering::Relaxed);
        Held(count.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The query of `GET /v1/tip`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TipQuery {
    /// The commit the agent has: answer when the tip is another one.
    after: Option<String>,
    /// How long to hold the request while the tip is `after`, in ms.
    wait_ms: Option<u64>,
    /// The asking host (its rate-limit bucket under a shared token).
    host: Option<String>,
}

/// `GET /v1/tip`: the branch tip at once when it is not `after`, else (or before the first
/// fetch) when it moves or `wait_ms` (capped below the request timeout) passes — whichever
/// comes first.
async fn tip(State(app): State<App>, headers: HeaderMap, Query(q): Query<TipQuery>) -> Response {
    let r = async {
        let who = caller(&app, &headers, Need::Agent, "tip")?;
        limit(&app, &who, q.host.as_deref())?;
        let Some(t) = &app.tip else {
            return Err(ApiError::not_found(
                "this coordinator does not serve the tip",
            ));
        };
        if let Some(a) = &q.after
            && (a.is_empty() || a.len() > 64 || !a.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(ApiError::bad_request(
                "after: a commit id (hex, at most 64 digits)",
            ));
        }
        let (mut rx, mut stop) = (t.tip.clone(), t.stop.clone());
        let current = rx.borrow_and_update().clone();
        // Nothing to tell yet (no fetch so far, or the asker has the tip): hold.
        if (current.is_none() || current.as_deref() == q.after.as_deref()) && !*stop.borrow() {
            let wait = std::time::Duration::from_millis(q.wait_ms.unwrap_or(0)).min(t.max_wait);
            let _held = Held::new(&app.tip_waiting);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = rx.changed() => {}
                _ = stop.changed() => {}
            }
        }
        let commit = rx.borrow().clone();
        Ok(crate::wire::Tip { commit })
    }
    .await;
    answer(&app, r)
}

async fn heartbeat(
    State(app): State<App>,
    Path(host): Path<String>,
    headers: HeaderMap,
    b: Body,
) -> Response {
    let r = async {
        let who = caller(&app, &headers, Need::Agent, "heartbeat")?;
        limit(&app, &who, Some(&host))?;
        let hb: Heartbeat = body(b).await?;
        // Whether it may act as `host` is the core's to decide (and audit).
        ask(&app, |r| Command::Heartbeat(host, hb, who, r)).await
    }
    .await;
    answer(&app, r)
}

async fn acquire(State(app): State<App>, headers: HeaderMap, b: Body) -> Response {
    let r = async {
        let who = caller(&app, &headers, Need::Agent, "acquire lease")?;
        let req: AcquireRequest = body(b).await?;
        // Whether it may act as req.host is the core's to decide (and audit).
        limit(&app, &who, Some(&req.host))?;
        ask(&app, |r| Command::Acquire(req, who, r)).await
    }
    .await;
    answer(&app, r)
}

async fn renew(State(app): State<App>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let r = async {
        // The lease id is its holder's secret: never in the audit.
        let who = caller(&app, &headers, Need::Agent, "renew lease")?;
        limit(&app, &who, None)?;
        ask(&app, |r| Command::Renew(id, who, r)).await
    }
    .await;
    answer(&app, r)
}

/// A lease holder's call with a JSON body (`release`, `gate`, `traffic`): an agent's token,
/// its rate limit, the body, then the actor.
async fn holder_call<T: DeserializeOwned>(
    app: App,
    headers: HeaderMap,
    b: Body,
    what: &'static str,
    command: impl FnOnce(T, Caller, Reply<crate::wire::RolloutReply>) -> Command,
) -> Response {
    let r = async {
        let who = caller(&app, &headers, Need::Agent, what)?;
        limit(&app, &who, None)?;
        let req: T = body(b).await?;
        ask(&app, |r| command(req, who, r)).await
    }
    .await;
    answer(&app, r)
}

async fn release(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Body,
) -> Response {
    holder_call(
        app,
        headers,
        b,
        "release lease",
        |req: ReleaseRequest, who, r| Command::Release(id, req, who, r),
    )
    .await
}

async fn gate(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Body,
) -> Response {
    holder_call(app, headers, b, "step gate", |req: GateRequest, who, r| {
        Command::Gate(id, req, who, r)
    })
    .await
}

async fn traffic(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Body,
) -> Response {
    holder_call(
        app,
        headers,
        b,
        "report traffic",
        |req: TrafficRequest, who, r| Command::Traffic(id, req, who, r),
    )
    .await
}

async fn status(State(app): State<App>, headers: HeaderMap) -> Response {
    let r = async {
        let who = caller(&app, &headers, Need::Read, "status")?;
        limit(&app, &who, None)?;
        ask(&app, Command::Status).await
    }
    .await;
    answer(&app, r)
}

/// `GET /v1/rollouts/{id}`: one rollout (the dashboard shows it at `/ui/rollouts/{id}`).
async fn rollout(State(app): State<App>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let r = async {
        let who = caller(&app, &headers, Need::Read, "rollout")?;
        limit(&app, &who, None)?;
        let id: u64 = id
            .parse()
            .map_err(|_| ApiError::bad_request("a rollout id is a number"))?;
        ask(&app, |r| Command::Rollout(id, r)).await
    }
    .await;
    answer(&app, r)
}

/// `GET /v1/notifications`: deliveries waiting or given up, and open incidents.
async fn notifications(State(app): State<App>, headers: HeaderMap) -> Response {
    let r = async {
        let who = caller(&app, &headers, Need::Read, "notifications")?;
        limit(&app, &who, None)?;
        ask(&app, Command::Notifications).await
    }
    .await;
    answer(&app, r)
}

/// Largest Slack interaction payload read (drover's messages are small; Slack echoes them).
const MAX_SLACK_BODY: usize = 256 << 10;

/// `POST /v1/integrations/slack/actions`: a click on an approval message's button. Slack's
/// signature is the authentication (401 and nothing happens without a valid one, or with a
/// timestamp over 5 minutes away); the Slack user is mapped to a drover identity whose role
/// and groups apply as in the API. Slack gets 200 at once; the outcome replaces the message
/// through its `response_url` (or, refused, is shown to the clicking user only).
async fn slack_actions(State(app): State<App>, headers: HeaderMap, b: Body) -> Response {
    let r = async {
        let Some(slack) = &app.slack else {
            return Err(ApiError::not_found(
                "Slack actions are not set up: a slack channel in coordinator.yaml's notifications needs signing_secret_file",
            ));
        };
        let Ok(_permit) = slack.reading.try_acquire() else {
            return Err(ApiError::rate_limited(
                1000,
                format!("{WEBHOOKS_AT_ONCE} Slack requests are being read; retry"),
            ));
        };
        let bytes = axum::body::to_bytes(b, MAX_SLACK_BODY).await.map_err(|_| {
            ApiError::new(
                413,
                crate::wire::ErrorKind::PayloadTooLarge,
                format!("Slack request body over {MAX_SLACK_BODY} bytes"),
            )
        })?;
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        let now_s = crate::actor::now_ms() / 1000;
        let mut refused = slack_verify::Refused::Unsigned;
        let app_ok = slack.apps.iter().find(|a| {
            match slack_verify::verify(
                &a.signing_secret,
                header("x-slack-request-timestamp"),
                header("x-slack-signature"),
                &bytes,
                now_s,
            ) {
                Ok(()) => true,
                Err(e) => {
                    refused = e;
                    false
                }
            }
        });
        let Some(sapp) = app_ok else {
            app.unauthenticated.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(reason = %refused, "Slack action refused");
            return Err(ApiError::new(
                401,
                crate::wire::ErrorKind::Unauthorized,
                refused.to_string(),
            ));
        };
        let click = slack_verify::parse(&bytes).map_err(ApiError::bad_request)?;
        let respond = |body: serde_json::Value| {
            let Some(url) = click.response_url.clone() else {
                return;
            };
            if !url.starts_with(&sapp.response_url_base) {
                tracing::warn!(channel = %sapp.channel, "Slack response_url is not under the channel's response_url_base; not answered");
                return;
            }
            let client = slack.client.clone();
            tokio::spawn(async move {
                match client.post(&url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => tracing::warn!(status = r.status().as_u16(), "Slack response_url refused the answer"),
                    Err(e) => tracing::warn!(error = %e.without_url(), "Slack response_url unreachable"),
                }
            });
        };
        let what = format!(
            "{} {}/{}/{} from Slack",
            if click.approve { "approve" } else { "reject" },
            click.environment,
            click.service,
            click.version
        );
        let Some(who) = sapp
            .users
            .get(&click.user)
            .and_then(|name| app.tokens().by_name(name).cloned())
        else {
            let why = format!(
                "Slack user {} is not mapped to a drover identity (slack_users of channel {})",
                click.user, sapp.channel
            );
            let _ = app.tx.send(Command::Denied {
                who: format!("slack:{}", click.user),
                what: what.clone(),
                why: why.clone(),
            });
            respond(slack_verify::ephemeral(&format!("drover: not done. {why}.")));
            return Ok(serde_json::json!({}));
        };
        if !Need::Approve.allows(who.role) {
            let why = format!(
                "{} (Slack user {}) has role {}; approving needs {}",
                who.name,
                click.user,
                who.role.name(),
                Need::Approve.roles()
            );
            let e = deny(&app, &who, &what, why.clone());
            respond(slack_verify::ephemeral(&format!("drover: not done. {}", e.body.message)));
            return Ok(serde_json::json!({}));
        }
        if let Err(e) = limit(&app, &who, None) {
            respond(slack_verify::ephemeral(&format!("drover: not done. {}", e.body.message)));
            return Ok(serde_json::json!({}));
        }
        let (env, service, version, approve) = (
            click.environment.clone(),
            click.service.clone(),
            click.version.clone(),
            click.approve,
        );
        let name = who.name.clone();
        let done = ask(&app, |reply| Command::Decide {
            env,
            service,
            version,
            approve,
            during_freeze: false,
            caller: who,
            reply,
        })
        .await;
        tracing::info!(user = %click.user, who = %name, %what, ok = done.is_ok(), "Slack action");
        match done {
            Ok(r) => respond(slack_verify::answer(&format!(
                "{}/{}/{}: {} by {name} (from Slack). Rollout {} is {}.",
                r.rollout.environment,
                r.rollout.service,
                r.rollout.version,
                if click.approve { "approved" } else { "rejected" },
                r.rollout.id,
                r.rollout.state
            ))),
            Err(e) => respond(slack_verify::ephemeral(&format!(
                "drover: not done. {}",
                e.body.message
            ))),
        }
        Ok(serde_json::json!({}))
    }
    .await;
    let resp = match r {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    };
    count(&app, resp.status().as_u16());
    resp
}

#[derive(serde::Deserialize)]
struct HistoryQuery {
    limit: Option<u32>,
}

async fn history(
    State(app): State<App>,
    headers: HeaderMap,
    Query(q): Query<HistoryQuery>,
) -> Response {
    let r = async {
        let who = caller(&app, &headers, Need::Read, "history")?;
        limit(&app, &who, None)?;
        let limit = q.limit.unwrap_or(200).clamp(1, 10_000);
        ask(&app, |r| Command::History(limit, r)).await
    }
    .await;
    answer(&app, r)
}

/// The query of an approval: none, or `during_freeze=true|false`.
fn during_freeze(query: Option<&str>) -> Result<bool, ApiError> {
    match query.unwrap_or("") {
        "" | "during_freeze=false" => Ok(false),
        "during_freeze=true" => Ok(true),
        other => Err(ApiError::bad_request(format!(
            "unknown query `{}`: the only one is during_freeze=true",
            other.chars().take(80).collect::<String>()
        ))),
    }
}

async fn decide(
    State(app): State<App>,
    Path((env, service, version, verb)): Path<(String, String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let r = async {
        let approve = match verb.as_str() {
            "approve" => true,
            "reject" => false,
            _ => {
                return Err(ApiError::not_found(format!(
                    "unknown verb `{verb}`: approve or reject"
                )));
            }
        };
        let during_freeze = during_freeze(query.as_deref())?;
        if during_freeze && !approve {
            return Err(ApiError::bad_request(
                "during_freeze goes with approve: a rejection needs no freeze lifted",
            ));
        }
        let who = caller(
            &app,
            &headers,
            Need::Approve,
            &format!("{verb} {env}/{service}/{version}"),
        )?;
        limit(&app, &who, None)?;
        ask(&app, |reply| Command::Decide {
            env,
            service,
            version,
            approve,
            during_freeze,
            caller: who,
            reply,
        })
        .await
    }
    .await;
    answer(&app, r)
}

async fn operate(
    State(app): State<App>,
    Path((env, service, verb)): Path<(String, String, String)>,
    headers: HeaderMap,
    b: Body,
) -> Response {
    let r = async {
        let need = match verb.as_str() {
            "pause" => Need::Pause,
            "resume" | "abort" => Need::Operate,
            "retry" => Need::Retry,
            "rollback" => Need::Rollback,
            _ => {
                return Err(ApiError::not_found(format!(
                    "unknown verb `{verb}`: pause, resume, abort, retry or rollback"
                )));
            }
        };
        let who = caller(&app, &headers, need, &format!("{verb} {env}/{service}"))?;
        limit(&app, &who, None)?;
        match verb.as_str() {
            "retry" => {
                ask(&app, |reply| Command::Retry {
                    env,
                    service,
                    caller: who,
                    reply,
                })
                .await
            }
            "rollback" => {
                let req: RollbackRequest = optional_body(b).await?;
                ask(&app, |reply| Command::Rollback {
                    env,
                    service,
                    to: req.to,
                    caller: who,
                    reply,
                })
                .await
            }
            _ => {
                ask(&app, |reply| Command::Operate {
                    env,
                    service,
                    verb,
                    caller: who,
                    reply,
                })
                .await
            }
        }
    }
    .await;
    answer(&app, r)
}
