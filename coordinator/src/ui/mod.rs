//! The web dashboard, served by the coordinator itself under `/ui/` (assets embedded, no CDN):
//! fleet, rollouts (the state machine drawn, batches), approvals (with Approve and Reject for
//! those who may), history (filtered, CSV and JSON export) and verification verdicts.
//!
//! - Pages are rendered on the server ([`html`], pure) and read without JavaScript; `live.js`
//!   refreshes the page's content when the coordinator's state changes (server-sent events
//!   from `/ui/events`).
//! - Log in by pasting a token: the server keeps a session (an `HttpOnly`, `SameSite=Strict`
//!   cookie, `Secure` under TLS, 12 hours). Each request looks the session's token up again, so
//!   a token removed from coordinator.yaml (SIGHUP) ends its sessions.
//! - Every form carries the session's CSRF token; a POST without it is 403. Decisions go
//!   through the same command and checks as the API (role, then the policy's groups); a
//!   refusal is 403 and audited.
//! - Every page has a CSP with no inline script or style, `X-Content-Type-Options: nosniff`,
//!   framing denied, no referrer, no caching.

pub mod chart;
pub mod html;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};

use crate::actor::{Command, now_ms};
use crate::auth::{Caller, Need, hash_token};
use crate::http::App;
use crate::view::{Filter, Label, RowState};
use html::{HistoryFilter, Viewer};

/// How long a session lasts.
pub const SESSION_TTL_MS: u64 = 12 * 3600 * 1000;
/// The most sessions kept (the oldest are dropped beyond).
const MAX_SESSIONS: usize = 10_000;
/// The largest form read.
const MAX_FORM: usize = 16 << 10;
/// The session cookie.
const COOKIE: &str = "drover_session";

/// The content security policy: nothing inline, nothing from elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const STYLE: &str = include_str!("assets/style.css");
const LIVE: &str = include_str!("assets/live.js");

struct Session {
    token_hash: String,
    csrf: String,
    expires_ms: u64,
}

/// The dashboard's state: sessions, and what the live updates follow.
pub struct Ui {
    sessions: Mutex<HashMap<String, Session>>,
    /// Cookies get `Secure` (the coordinator speaks TLS).
    secure: bool,
    /// Bumped by the actor each time it stores changes.
    generation: Arc<AtomicU64>,
    /// Set when the coordinator shuts down (ends event streams).
    stop: tokio::sync::watch::Receiver<bool>,
    /// Failed logins of the current minute.
    failures: Mutex<Failures>,
}

/// Failed logins allowed per minute, from everyone together; past them every login waits for
/// the next minute (tokens are long random secrets: this only slows a guesser further).
pub const MAX_FAILED_LOGINS: u32 = 10;

/// Failed logins counted over a one-minute window.
#[derive(Debug, Default)]
struct Failures {
    /// Start of the window.
    since_ms: u64,
    /// Failures since then.
    count: u32,
}

impl Failures {
    /// How long logins must wait, if the window's failures are used up. Pure.
    fn wait(&self, now: u64) -> Option<u64> {
        let end = self.since_ms + 60_000;
        (now < end && self.count >= MAX_FAILED_LOGINS).then(|| end - now)
    }

    /// Counts a failure at `now`.
    fn add(&mut self, now: u64) {
        if now >= self.since_ms + 60_000 {
            *self = Failures {
                since_ms: now,
                count: 0,
            };
        }
        self.count += 1;
    }
}

impl Ui {
    /// A dashboard whose live updates follow `generation`.
    pub fn new(
        secure: bool,
        generation: Arc<AtomicU64>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Ui {
        Ui {
            sessions: Mutex::new(HashMap::new()),
            secure,
            generation,
            stop,
            failures: Mutex::default(),
        }
    }
}

/// The dashboard's routes.
pub fn routes() -> Router<App> {
    Router::new()
        .route("/ui", get(|| async { redirect("/ui/fleet") }))
        .route("/ui/", get(|| async { redirect("/ui/fleet") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/fleet", get(fleet))
        .route("/ui/rollouts", get(rollouts))
        .route("/ui/rollouts/{id}", get(rollout))
        .route("/ui/approvals", get(approvals))
        .route(
            "/ui/approvals/{env}/{service}/{version}/{verb}",
            post(decide),
        )
        .route("/ui/history", get(history))
        .route("/ui/verification", get(verification))
        .route("/ui/events", get(events))
        .route(
            "/ui/assets/style.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/ui/assets/live.js",
            get(|| async { asset(LIVE, "text/javascript; charset=utf-8") }),
        )
}

/// The headers every dashboard answer carries.
fn secure_headers(h: &mut HeaderMap) {
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("cache-control", HeaderValue::from_static("no-store"));
}

fn page(status: StatusCode, html: String) -> Response {
    let mut r = Response::new(Body::from(html));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure_headers(r.headers_mut());
    r
}

fn redirect(to: &'static str) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    secure_headers(r.headers_mut());
    r
}

fn asset(text: &'static str, kind: &'static str) -> Response {
    let mut r = Response::new(Body::from(text));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    secure_headers(r.headers_mut());
    r
}

fn random_hex() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

fn cookie_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == COOKIE).then(|| v.to_string())
        })
}

/// The logged-in caller, with the session's CSRF token.
struct Who {
    caller: Caller,
    viewer: Viewer,
}

/// The session's caller: the token is looked up again (a token removed ends the session).
fn who(app: &App, headers: &HeaderMap) -> Option<Who> {
    let ui = app.ui.as_ref()?;
    let id = cookie_of(headers)?;
    let now = now_ms();
    let (hash, csrf) = {
        let mut s = ui.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let sess = s.get(&id)?;
        if sess.expires_ms <= now {
            s.remove(&id);
            return None;
        }
        (sess.token_hash.clone(), sess.csrf.clone())
    };
    let caller = app.tokens().by_hash(&hash)?.clone();
    if caller.role == crate::auth::Role::Agent {
        return None;
    }
    let viewer = Viewer {
        name: caller.name.clone(),
        role: caller.role.name(),
        may_approve: Need::Approve.allows(caller.role),
        groups: caller.groups.clone(),
        csrf,
    };
    Some(Who { caller, viewer })
}

/// 404 when the dashboard is not enabled.
fn disabled() -> Response {
    page(
        StatusCode::NOT_FOUND,
        html::message("Not found", "the dashboard is not enabled", None),
    )
}

async fn login_page(State(app): State<App>, headers: HeaderMap) -> Response {
    if app.ui.is_none() {
        return disabled();
    }
    if who(&app, &headers).is_some() {
        return redirect("/ui/fleet");
    }
    page(StatusCode::OK, html::login(None))
}

async fn form(b: Body) -> Option<BTreeMap<String, String>> {
    let bytes = axum::body::to_bytes(b, MAX_FORM).await.ok()?;
    Some(
        url::form_urlencoded::parse(&bytes)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    )
}

async fn login(State(app): State<App>, b: Body) -> Response {
    let Some(ui) = app.ui.as_deref() else {
        return disabled();
    };
    let token = form(b)
        .await
        .and_then(|f| f.get("token").map(|t| t.trim().to_string()))
        .unwrap_or_default();
    let now = now_ms();
    let throttled = ui
        .failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .wait(now);
    if let Some(wait) = throttled {
        app.rate_limited.fetch_add(1, Ordering::Relaxed);
        let secs = wait.div_ceil(1000);
        let mut r = page(
            StatusCode::TOO_MANY_REQUESTS,
            html::login(Some(&format!(
                "Too many failed logins in the last minute ({MAX_FAILED_LOGINS} allowed). Try again in {secs} s."
            ))),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return r;
    }
    let caller = (!token.is_empty())
        .then(|| app.tokens().check(&token).cloned())
        .flatten();
    let Some(caller) = caller else {
        app.unauthenticated.fetch_add(1, Ordering::Relaxed);
        ui.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(now);
        tracing::warn!("dashboard login with an unknown token");
        return page(
            StatusCode::UNAUTHORIZED,
            html::login(Some(
                "Unknown token. Paste a token that coordinator.yaml lists.",
            )),
        );
    };
    if caller.role == crate::auth::Role::Agent {
        return page(
            StatusCode::FORBIDDEN,
            html::login(Some(
                "That is an agent token: agents do not log in. Use a person's token.",
            )),
        );
    }
    let id = random_hex();
    {
        let mut s = ui.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.retain(|_, x| x.expires_ms > now);
        if s.len() >= MAX_SESSIONS
            && let Some(oldest) = s
                .iter()
                .min_by_key(|(_, x)| x.expires_ms)
                .map(|(k, _)| k.clone())
        {
            s.remove(&oldest);
        }
        s.insert(
            id.clone(),
            Session {
                token_hash: hash_token(&token),
                csrf: random_hex(),
                expires_ms: now + SESSION_TTL_MS,
            },
        );
    }
    tracing::info!(who = %caller.name, role = caller.role.name(), "dashboard login");
    let mut r = redirect("/ui/fleet");
    let cookie = format!(
        "{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL_MS / 1000,
        if ui.secure { "; Secure" } else { "" }
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// 403 for a form without the session's CSRF token.
fn csrf_ok(w: &Who, f: &BTreeMap<String, String>) -> bool {
    let given = f.get("csrf").map(String::as_bytes).unwrap_or_default();
    let want = w.viewer.csrf.as_bytes();
    given.len() == want.len() && given.iter().zip(want).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
}

async fn logout(State(app): State<App>, headers: HeaderMap, b: Body) -> Response {
    let Some(w) = who(&app, &headers) else {
        return redirect("/ui/login");
    };
    let f = form(b).await.unwrap_or_default();
    if !csrf_ok(&w, &f) {
        return forbidden(
            &w,
            "the form's CSRF token is missing or wrong; reload the page",
        );
    }
    if let (Some(ui), Some(id)) = (app.ui.as_ref(), cookie_of(&headers)) {
        ui.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
    let mut r = redirect("/ui/login");
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("drover_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

fn forbidden(w: &Who, why: &str) -> Response {
    page(
        StatusCode::FORBIDDEN,
        html::message("Forbidden", why, Some(&w.viewer)),
    )
}

/// 503: the state actor did not answer.
fn failed() -> Response {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        html::message(
            "Unavailable",
            "the coordinator's state did not answer; retry",
            None,
        ),
    )
}

async fn status(app: &App) -> Result<crate::wire::Status, Response> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    app.tx.send(Command::Status(tx)).map_err(|_| failed())?;
    rx.await.map_err(|_| failed())?.map_err(|_| failed())
}

/// One rollout in full (with its verdicts' samples); `None` if there is no such rollout.
async fn detail(app: &App, id: u64) -> Result<Option<crate::wire::RolloutView>, Response> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    app.tx
        .send(Command::Rollout(id, tx))
        .map_err(|_| failed())?;
    Ok(rx.await.map_err(|_| failed())?.ok().map(|r| r.rollout))
}

async fn audit(app: &App, limit: u32) -> Result<Vec<crate::wire::AuditEntry>, Response> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let failed = || {
        page(
            StatusCode::SERVICE_UNAVAILABLE,
            html::message("Unavailable", "the audit could not be read; retry", None),
        )
    };
    app.tx
        .send(Command::History(limit, tx))
        .map_err(|_| failed())?;
    Ok(rx
        .await
        .map_err(|_| failed())?
        .map_err(|_| failed())?
        .entries)
}

/// Query parameters, each name with its values.
fn query(raw: Option<&str>) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()).take(64) {
        if !v.is_empty() {
            m.entry(k.into_owned()).or_default().push(v.into_owned());
        }
    }
    m
}

macro_rules! logged_in {
    ($app:expr, $headers:expr) => {
        match who(&$app, &$headers) {
            Some(w) => w,
            None => {
                if $app.ui.is_none() {
                    return page(
                        StatusCode::NOT_FOUND,
                        html::message("Not found", "the dashboard is not enabled", None),
                    );
                }
                return redirect("/ui/login");
            }
        }
    };
}

async fn fleet(State(app): State<App>, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let w = logged_in!(app, headers);
    let q = query(q.as_deref());
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    let mut labels = Vec::new();
    for l in get("label") {
        match l.parse::<Label>() {
            Ok(l) => labels.push(l),
            Err(e) => {
                return page(
                    StatusCode::BAD_REQUEST,
                    html::message("Bad filter", &e, Some(&w.viewer)),
                );
            }
        }
    }
    let mut states = Vec::new();
    for s in get("state") {
        match s.parse::<RowState>() {
            Ok(s) => states.push(s),
            Err(e) => {
                return page(
                    StatusCode::BAD_REQUEST,
                    html::message("Bad filter", &e, Some(&w.viewer)),
                );
            }
        }
    }
    let f = Filter {
        environments: get("env"),
        services: get("service"),
        labels,
        states,
    };
    let p = get("page")
        .first()
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(1);
    match status(&app).await {
        Ok(s) => page(StatusCode::OK, html::fleet(&s, &f, p, &w.viewer, now_ms())),
        Err(r) => r,
    }
}

async fn rollouts(State(app): State<App>, headers: HeaderMap) -> Response {
    let w = logged_in!(app, headers);
    match status(&app).await {
        Ok(s) => page(StatusCode::OK, html::rollouts(&s, &w.viewer)),
        Err(r) => r,
    }
}

async fn rollout(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let w = logged_in!(app, headers);
    let s = match status(&app).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let r = match id.parse::<u64>() {
        Ok(id) => match detail(&app, id).await {
            Ok(r) => r,
            Err(r) => return r,
        },
        Err(_) => None,
    };
    let Some(r) = r else {
        return page(
            StatusCode::NOT_FOUND,
            html::message("Not found", "no such rollout", Some(&w.viewer)),
        );
    };
    let subject = format!("{}/{}/{}", r.environment, r.service, r.version);
    let entries = match audit(&app, 10_000).await {
        Ok(e) => e
            .into_iter()
            .filter(|e| e.subject == subject && e.at_ms + 1000 >= r.created_at_ms)
            .collect::<Vec<_>>(),
        Err(r) => return r,
    };
    page(StatusCode::OK, html::rollout(&r, &s, &entries, &w.viewer))
}

async fn approvals(State(app): State<App>, headers: HeaderMap) -> Response {
    let w = logged_in!(app, headers);
    match status(&app).await {
        Ok(s) => page(StatusCode::OK, html::approvals(&s, &w.viewer, None)),
        Err(r) => r,
    }
}

async fn decide(
    State(app): State<App>,
    headers: HeaderMap,
    Path((env, service, version, verb)): Path<(String, String, String, String)>,
    b: Body,
) -> Response {
    let w = logged_in!(app, headers);
    let f = form(b).await.unwrap_or_default();
    if !csrf_ok(&w, &f) {
        return forbidden(
            &w,
            "the form's CSRF token is missing or wrong; reload the page",
        );
    }
    let approve = match verb.as_str() {
        "approve" => true,
        "reject" => false,
        _ => {
            return page(
                StatusCode::NOT_FOUND,
                html::message("Not found", "approve or reject", Some(&w.viewer)),
            );
        }
    };
    let what = format!("{verb} {env}/{service}/{version} (dashboard)");
    if !Need::Approve.allows(w.caller.role) {
        let why = format!(
            "token {} has role {}; this needs {}",
            w.caller.name,
            w.caller.role.name(),
            Need::Approve.roles()
        );
        let _ = app.tx.send(Command::Denied {
            who: w.caller.name.clone(),
            what,
            why: why.clone(),
        });
        return forbidden(&w, &why);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sent = app.tx.send(Command::Decide {
        env,
        service,
        version,
        approve,
        during_freeze: false,
        caller: w.caller.clone(),
        reply: tx,
    });
    let outcome = match sent {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    let s = match status(&app).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match outcome {
        Some(Ok(reply)) => {
            let r = reply.rollout;
            page(
                StatusCode::OK,
                html::approvals(
                    &s,
                    &w.viewer,
                    Some(&format!(
                        "#{} {}/{}/{} {} by {}: now {}",
                        r.id,
                        r.environment,
                        r.service,
                        r.version,
                        if approve { "approved" } else { "rejected" },
                        w.caller.name,
                        r.state
                    )),
                ),
            )
        }
        Some(Err(e)) => page(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            html::approvals(
                &s,
                &w.viewer,
                Some(&format!("Not done: {}", e.body.message)),
            ),
        ),
        None => page(
            StatusCode::SERVICE_UNAVAILABLE,
            html::message(
                "Unavailable",
                "the coordinator did not answer; retry",
                Some(&w.viewer),
            ),
        ),
    }
}

/// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM[:SS]` (UTC) as ms since the epoch.
pub fn parse_time(s: &str) -> Option<u64> {
    let s = s.trim();
    let (date, time) = s.split_once(['T', ' ']).unwrap_or((s, "00:00"));
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let mut t = time.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm) = (t.next()??, t.next()??);
    let ss = t.next().flatten().unwrap_or(0);
    if !(0..24).contains(&hh) || !(0..60).contains(&mm) || !(0..60).contains(&ss) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs).ok().map(|s| s * 1000)
}

async fn history(State(app): State<App>, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let w = logged_in!(app, headers);
    let q = query(q.as_deref());
    let one = |k: &str| {
        q.get(k)
            .and_then(|v| v.first())
            .cloned()
            .unwrap_or_default()
    };
    let raw: BTreeMap<String, String> = ["env", "service", "actor", "since", "until"]
        .into_iter()
        .map(|k| (k.to_string(), one(k)))
        .collect();
    let mut f = HistoryFilter {
        env: one("env"),
        service: one("service"),
        actor: one("actor"),
        ..HistoryFilter::default()
    };
    for (k, slot) in [("since", &mut f.since_ms), ("until", &mut f.until_ms)] {
        let v = one(k);
        if !v.is_empty() {
            match parse_time(&v) {
                Some(t) => *slot = Some(t),
                None => {
                    return page(
                        StatusCode::BAD_REQUEST,
                        html::message(
                            "Bad filter",
                            &format!(
                                "{k} `{v}` is not a date like 2026-12-01 or 2026-12-01T08:00 (UTC)"
                            ),
                            Some(&w.viewer),
                        ),
                    );
                }
            }
        }
    }
    let entries: Vec<crate::wire::AuditEntry> = match audit(&app, 10_000).await {
        Ok(e) => e.into_iter().filter(|e| f.keeps(e)).collect(),
        Err(r) => return r,
    };
    let download = |body: String, kind: &'static str, name: &'static str| {
        let mut r = Response::new(Body::from(body));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
        r.headers_mut()
            .insert(header::CONTENT_DISPOSITION, HeaderValue::from_static(name));
        secure_headers(r.headers_mut());
        r
    };
    match one("format").as_str() {
        "csv" => download(
            html::history_csv(&entries),
            "text/csv; charset=utf-8",
            "attachment; filename=\"drover-history.csv\"",
        ),
        "json" => download(
            serde_json::to_string_pretty(&crate::wire::History { entries }).expect("JSON"),
            "application/json",
            "attachment; filename=\"drover-history.json\"",
        ),
        "" | "html" => page(StatusCode::OK, html::history(&entries, &f, &raw, &w.viewer)),
        other => page(
            StatusCode::BAD_REQUEST,
            html::message(
                "Bad format",
                &format!("format `{other}`: csv or json"),
                Some(&w.viewer),
            ),
        ),
    }
}

async fn verification(State(app): State<App>, headers: HeaderMap) -> Response {
    let w = logged_in!(app, headers);
    let s = match status(&app).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut rs = Vec::new();
    for id in html::with_verdicts(&s) {
        match detail(&app, id).await {
            Ok(Some(r)) => rs.push(r),
            Ok(None) => {}
            Err(r) => return r,
        }
    }
    page(StatusCode::OK, html::verification(&rs, &w.viewer))
}

/// Server-sent events: `change` each time the coordinator stores changes (checked twice a
/// second), a comment every 15 s to keep the connection, ended after 5 minutes (the browser
/// reconnects) or at shutdown.
async fn events(State(app): State<App>, headers: HeaderMap) -> Response {
    let _w = logged_in!(app, headers);
    let Some(ui) = app.ui.clone() else {
        return redirect("/ui/login");
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::convert::Infallible>>(4);
    tokio::spawn(async move {
        let mut last = ui.generation.load(Ordering::Relaxed);
        let mut stop = ui.stop.clone();
        let start = tokio::time::Instant::now();
        let mut ping = tokio::time::Instant::now();
        if tx
            .send(Ok(format!("retry: 2000\nevent: hello\ndata: {last}\n\n")))
            .await
            .is_err()
        {
            return;
        }
        while start.elapsed() < Duration::from_secs(300) && !*stop.borrow() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => break,
            }
            let g = ui.generation.load(Ordering::Relaxed);
            let msg = if g != last {
                last = g;
                format!("event: change\ndata: {g}\n\n")
            } else if ping.elapsed() >= Duration::from_secs(15) {
                ping = tokio::time::Instant::now();
                ": ping\n\n".to_string()
            } else {
                continue;
            };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_stream(rx);
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    secure_headers(r.headers_mut());
    r
}

/// A stream of the channel's messages.
fn futures_stream(
    rx: tokio::sync::mpsc::Receiver<Result<String, std::convert::Infallible>>,
) -> impl futures_core::Stream<Item = Result<String, std::convert::Infallible>> {
    struct S(tokio::sync::mpsc::Receiver<Result<String, std::convert::Infallible>>);
    impl futures_core::Stream for S {
        type Item = Result<String, std::convert::Infallible>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0.poll_recv(cx)
        }
    }
    S(rx)
}

#[cfg(test)]
mod tests;
