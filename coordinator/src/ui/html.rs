//! The dashboard's pages, rendered on the server from the coordinator's state. Pure: state in,
//! HTML out. Every text from hosts or Git goes through [`esc`]; no page carries an inline
//! script or style (the CSP forbids them): the one script, `live.js`, is an asset.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::view::{Filter, RowState, time};
use crate::wire::{AuditEntry, RolloutState, RolloutView, Status};

/// Rows of the fleet table per page.
pub const PAGE_ROWS: usize = 100;

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Escapes a query parameter's value.
pub fn url_esc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Who looks, as the pages need it.
#[derive(Clone, Debug)]
pub struct Viewer {
    /// Token name.
    pub name: String,
    /// Role name.
    pub role: &'static str,
    /// Whether the role may approve and reject.
    pub may_approve: bool,
    /// Groups (for approvers lists).
    pub groups: Vec<String>,
    /// The session's CSRF token, put in every form.
    pub csrf: String,
}

/// The page around `body`: navigation, who is logged in, the live-update script.
pub fn layout(title: &str, active: &str, who: Option<&Viewer>, body: &str) -> String {
    let mut nav = String::new();
    if let Some(v) = who {
        for (href, label) in [
            ("/ui/fleet", "Fleet"),
            ("/ui/rollouts", "Rollouts"),
            ("/ui/approvals", "Approvals"),
            ("/ui/history", "History"),
            ("/ui/verification", "Verification"),
        ] {
            let cls = if label == active {
                " class=\"active\""
            } else {
                ""
            };
            let _ = write!(nav, "<a href=\"{href}\"{cls}>{label}</a>");
        }
        let _ = write!(
            nav,
            "<span class=\"who\">{} ({})</span><form method=\"post\" action=\"/ui/logout\" class=\"inline\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\">Log out</button></form>",
            esc(&v.name),
            v.role,
            esc(&v.csrf)
        );
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>{} — drover</title><link rel=\"stylesheet\" href=\"/ui/assets/style.css\">\
         <script src=\"/ui/assets/live.js\" defer></script></head>\
         <body><header><span class=\"brand\">drover</span><nav>{nav}</nav></header><main id=\"main\">{body}</main></body></html>",
        esc(title)
    )
}

/// The login page.
pub fn login(error: Option<&str>) -> String {
    let err = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(e)))
        .unwrap_or_default();
    layout(
        "Log in",
        "",
        None,
        &format!(
            "<h1>Log in</h1>{err}<form method=\"post\" action=\"/ui/login\" class=\"login\">\
             <label>Token <input type=\"password\" name=\"token\" autocomplete=\"off\" required autofocus></label>\
             <button type=\"submit\">Log in</button></form>\
             <p class=\"hint\">Paste a drover token (viewer, responder, operator, approver or admin). \
             The session lasts 12 hours.</p>"
        ),
    )
}

/// A one-message page (errors).
pub fn message(title: &str, text: &str, who: Option<&Viewer>) -> String {
    layout(
        title,
        "",
        who,
        &format!("<h1>{}</h1><p>{}</p>", esc(title), esc(text)),
    )
}

fn states_of(svc: &crate::wire::ServiceReport, h: &crate::wire::HostView) -> Vec<&'static str> {
    RowState::of(h, svc)
        .into_iter()
        .map(|s| {
            RowState::ALL
                .iter()
                .find(|(x, _)| *x == s)
                .map(|(_, n)| *n)
                .unwrap_or("ok")
        })
        .collect()
}

/// The fleet: hosts × services, filtered by `f`, page `page` (from 1), with counts per state
/// over every row that matches.
pub fn fleet(s: &Status, f: &Filter, page: usize, who: &Viewer, now_ms: u64) -> String {
    let s = crate::view::filter(s, f);
    let mut counts: BTreeMap<&str, usize> = RowState::ALL.iter().map(|(_, n)| (*n, 0)).collect();
    let mut rows = 0usize;
    for h in &s.hosts {
        for svc in &h.services {
            rows += 1;
            for st in states_of(svc, h) {
                *counts.entry(st).or_default() += 1;
            }
        }
    }
    let pages = rows.div_ceil(PAGE_ROWS).max(1);
    let page = page.clamp(1, pages);
    let (from, to) = ((page - 1) * PAGE_ROWS, (page * PAGE_ROWS).min(rows));
    let mut b = String::with_capacity(64 * 1024);
    b.push_str("<h1>Fleet</h1>");
    if let Some(d) = &s.desired {
        let _ = write!(
            b,
            "<p class=\"commit\">Following commit <code>{}</code>, read {}</p>",
            esc(crate::view::short(&d.commit)),
            time(d.fetched_at_ms)
        );
    }
    if let Some(r) = &s.refused {
        let _ = write!(
            b,
            "<p class=\"error\">Commit <code>{}</code> refused: {}</p>",
            esc(crate::view::short(&r.commit)),
            esc(&r.problems.join("; "))
        );
    }
    b.push_str("<ul class=\"counts\">");
    let _ = write!(
        b,
        "<li><b>{}</b> hosts</li><li><b>{rows}</b> services</li>",
        s.hosts.len()
    );
    for (st, n) in &counts {
        let _ = write!(b, "<li class=\"st-{st}\"><b>{n}</b> {st}</li>");
    }
    b.push_str("</ul>");
    filter_form(&mut b, f);
    let _ = write!(
        b,
        "<table class=\"fleet\"><thead><tr><th>Host</th><th>Environment</th><th>Service</th><th>Desired</th>\
         <th>Actual</th><th>Phase</th><th>Health</th><th>Seen</th><th>Last error</th></tr></thead><tbody>"
    );
    let mut i = 0usize;
    'rows: for h in &s.hosts {
        for svc in &h.services {
            if i >= to {
                break 'rows;
            }
            if i >= from {
                let states = states_of(svc, h);
                let seen = if h.stale {
                    format!(
                        "stale ({}s ago)",
                        now_ms.saturating_sub(h.last_seen_ms) / 1000
                    )
                } else {
                    format!("{}s ago", now_ms.saturating_sub(h.last_seen_ms) / 1000)
                };
                let _ = write!(
                    b,
                    "<tr class=\"st-{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"err\">{}</td></tr>",
                    states[0],
                    esc(&h.host),
                    esc(&h.environment),
                    esc(&svc.service),
                    esc(svc.desired.as_deref().unwrap_or("—")),
                    esc(svc.actual.as_deref().unwrap_or("—")),
                    esc(svc.phase.as_deref().unwrap_or("")),
                    states.join(", "),
                    seen,
                    esc(svc.last_error.as_deref().unwrap_or(""))
                );
            }
            i += 1;
        }
    }
    b.push_str("</tbody></table>");
    let q = filter_query(f);
    let _ = write!(
        b,
        "<p class=\"pages\">Rows {}–{to} of {rows}, page {page} of {pages}. ",
        if rows == 0 { 0 } else { from + 1 }
    );
    if page > 1 {
        let _ = write!(
            b,
            "<a href=\"/ui/fleet?{q}page={}\">Previous</a> ",
            page - 1
        );
    }
    if page < pages {
        let _ = write!(b, "<a href=\"/ui/fleet?{q}page={}\">Next</a>", page + 1);
    }
    b.push_str("</p>");
    layout("Fleet", "Fleet", Some(who), &b)
}

fn filter_query(f: &Filter) -> String {
    let mut q = String::new();
    for e in &f.environments {
        let _ = write!(q, "env={}&", url_esc(e));
    }
    for s in &f.services {
        let _ = write!(q, "service={}&", url_esc(s));
    }
    for l in &f.labels {
        let _ = write!(q, "label={}&", url_esc(&format!("{}={}", l.key, l.value)));
    }
    for st in &f.states {
        if let Some((_, n)) = RowState::ALL.iter().find(|(x, _)| x == st) {
            let _ = write!(q, "state={n}&");
        }
    }
    q
}

fn filter_form(b: &mut String, f: &Filter) {
    let first = |v: &[String]| v.first().map(|s| esc(s)).unwrap_or_default();
    let label = f
        .labels
        .first()
        .map(|l| esc(&format!("{}={}", l.key, l.value)))
        .unwrap_or_default();
    let _ = write!(
        b,
        "<form method=\"get\" action=\"/ui/fleet\" class=\"filters\">\
         <label>Environment <input name=\"env\" value=\"{}\"></label>\
         <label>Service <input name=\"service\" value=\"{}\"></label>\
         <label>Label <input name=\"label\" value=\"{label}\" placeholder=\"role=web\"></label>\
         <label>State <select name=\"state\"><option value=\"\">any</option>",
        first(&f.environments),
        first(&f.services)
    );
    for (st, n) in RowState::ALL {
        let sel = if f.states.contains(&st) {
            " selected"
        } else {
            ""
        };
        let _ = write!(b, "<option value=\"{n}\"{sel}>{n}</option>");
    }
    b.push_str("</select></label><button type=\"submit\">Filter</button></form>");
}

/// The states a rollout goes through, in order, as drawn.
const PATH: [RolloutState; 6] = [
    RolloutState::Pending,
    RolloutState::ApprovalRequired,
    RolloutState::Approved,
    RolloutState::Running,
    RolloutState::Verifying,
    RolloutState::Success,
];

/// The state machine, drawn: the main path with the current state marked, and the side
/// states (paused, failed, rolling back, aborted) marked when in them.
pub fn machine(state: RolloutState) -> String {
    let mut b = String::from("<ol class=\"machine\">");
    let at = PATH.iter().position(|s| *s == state);
    for (i, s) in PATH.iter().enumerate() {
        let cls = match at {
            Some(a) if a == i => "now",
            Some(a) if i < a => "past",
            _ => "",
        };
        let _ = write!(b, "<li class=\"{cls}\">{s}</li>");
    }
    b.push_str("</ol><ol class=\"machine side\">");
    for s in [
        RolloutState::Paused,
        RolloutState::Failed,
        RolloutState::RollingBack,
        RolloutState::Aborted,
    ] {
        let cls = if s == state { "now bad" } else { "" };
        let _ = write!(b, "<li class=\"{cls}\">{s}</li>");
    }
    b.push_str("</ol>");
    b
}

/// Hosts of a rollout's batches: done, in flight, failed, waiting.
fn batches(r: &RolloutView, s: &Status) -> String {
    let waiting = s
        .hosts
        .iter()
        .filter(|h| h.environment == r.environment)
        .filter(|h| h.services.iter().any(|x| x.service == r.service))
        .filter(|h| {
            !r.succeeded.contains(&h.host)
                && !r.failed.contains(&h.host)
                && !r.reverted.contains(&h.host)
        })
        .count()
        .saturating_sub(r.leases as usize);
    format!(
        "<ul class=\"batches\"><li class=\"done\"><b>{}</b> done</li><li class=\"flight\"><b>{}</b> in flight</li>\
         <li class=\"wait\"><b>{waiting}</b> waiting</li><li class=\"failed\"><b>{}</b> failed</li>\
         <li><b>{}</b> reverted</li><li><b>{}</b> verified</li></ul>",
        r.succeeded.len(),
        r.leases,
        r.failed.len(),
        r.reverted.len(),
        r.verified.len()
    )
}

/// A rollout's heading: a link to its page, and its state.
fn heading(r: &RolloutView) -> String {
    format!(
        "<h2><a href=\"/ui/rollouts/{}\">#{} {}/{}/{}</a> <span class=\"state\">{}</span></h2>",
        r.id,
        r.id,
        esc(&r.environment),
        esc(&r.service),
        esc(&r.version),
        r.state
    )
}

/// Every rollout, newest first (at most 200).
pub fn rollouts(s: &Status, who: &Viewer) -> String {
    let mut b = String::from("<h1>Rollouts</h1>");
    let mut rs: Vec<&RolloutView> = s.rollouts.iter().collect();
    rs.sort_by_key(|r| std::cmp::Reverse(r.id));
    if rs.is_empty() {
        b.push_str("<p>No rollout yet.</p>");
    }
    for r in rs.into_iter().take(200) {
        let _ = write!(
            b,
            "<section class=\"rollout st-{}\">{}{}{}{}{}</section>",
            r.state.to_string().to_lowercase(),
            heading(r),
            machine(r.state),
            batches(r, s),
            super::chart::traffic(&r.traffic),
            r.reason
                .as_deref()
                .map(|x| format!("<p class=\"reason\">{}</p>", esc(x)))
                .unwrap_or_default()
        );
    }
    layout("Rollouts", "Rollouts", Some(who), &b)
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        esc(&v.join(", "))
    }
}

/// One rollout, with its audit entries.
pub fn rollout(r: &RolloutView, s: &Status, audit: &[AuditEntry], who: &Viewer) -> String {
    let mut b = format!(
        "<h1>#{} {}/{}/{} <span class=\"state\">{}</span></h1>{}{}",
        r.id,
        esc(&r.environment),
        esc(&r.service),
        esc(&r.version),
        r.state,
        machine(r.state),
        batches(r, s)
    );
    let decision = r
        .decision
        .as_ref()
        .map(|d| {
            format!(
                "{} by {} at {}",
                if d.approved { "approved" } else { "rejected" },
                esc(&d.by),
                time(d.at_ms)
            )
        })
        .unwrap_or_else(|| "none".into());
    let _ = write!(
        b,
        "<dl class=\"facts\"><dt>Kind</dt><dd>{:?}, attempt {}</dd><dt>Trigger</dt><dd>{}</dd>\
         <dt>Commit</dt><dd><code>{}</code></dd><dt>Reason</dt><dd>{}</dd><dt>Waiting for</dt><dd>{}</dd>\
         <dt>Decision</dt><dd>{decision}</dd><dt>Succeeded</dt><dd>{}</dd><dt>Failed</dt><dd>{}</dd>\
         <dt>Reverted</dt><dd>{}</dd><dt>Policy</dt><dd>max_parallel {}, max_failures {}{}</dd>\
         <dt>Created</dt><dd>{}</dd><dt>Updated</dt><dd>{}</dd></dl>",
        r.kind,
        r.attempt,
        esc(&r.trigger),
        esc(&r.commit),
        esc(r.reason.as_deref().unwrap_or("")),
        esc(r.waiting_for.as_deref().unwrap_or("")),
        list(&r.succeeded),
        list(&r.failed),
        list(&r.reverted),
        r.policy.max_parallel,
        r.policy.max_failures,
        if r.policy.approval_required {
            format!(", approval by {}", esc(&r.policy.approvers.join(", ")))
        } else {
            String::new()
        },
        time(r.created_at_ms),
        time(r.updated_at_ms)
    );
    if r.state == RolloutState::ApprovalRequired && may_decide(r, who) {
        decide_forms(&mut b, r, who);
    }
    if !r.traffic.is_empty() {
        b.push_str("<h2>Traffic</h2>");
        b.push_str(&super::chart::traffic(&r.traffic));
    }
    if !r.verdicts.is_empty() {
        b.push_str("<h2>Verification</h2>");
        verdicts(&mut b, r);
        for c in r.charts.iter().rev() {
            b.push_str(&super::chart::verdict(c));
        }
    }
    b.push_str("<h2>History</h2>");
    history_table(&mut b, audit);
    layout(&format!("Rollout {}", r.id), "Rollouts", Some(who), &b)
}

/// Whether `who` may approve or reject `r` (role, and group when the policy names some).
pub fn may_decide(r: &RolloutView, who: &Viewer) -> bool {
    who.may_approve
        && (who.role == "admin"
            || r.policy.approvers.is_empty()
            || who.groups.iter().any(|g| r.policy.approvers.contains(g)))
}

fn decide_forms(b: &mut String, r: &RolloutView, who: &Viewer) {
    let path = format!(
        "/ui/approvals/{}/{}/{}",
        url_esc(&r.environment),
        url_esc(&r.service),
        url_esc(&r.version)
    );
    for (verb, label, cls) in [
        ("approve", "Approve", "primary"),
        ("reject", "Reject", "danger"),
    ] {
        let _ = write!(
            b,
            "<form method=\"post\" action=\"{path}/{verb}\" class=\"inline\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button type=\"submit\" class=\"{cls}\" data-rollout=\"{}\">{label}</button></form>",
            esc(&who.csrf),
            r.id
        );
    }
}

/// What waits for an approval, with Approve and Reject for those who may.
pub fn approvals(s: &Status, who: &Viewer, flash: Option<&str>) -> String {
    let mut b = String::from("<h1>Approvals</h1>");
    if let Some(f) = flash {
        let _ = write!(b, "<p class=\"flash\" role=\"status\">{}</p>", esc(f));
    }
    let waiting: Vec<&RolloutView> = s
        .rollouts
        .iter()
        .filter(|r| r.state == RolloutState::ApprovalRequired)
        .collect();
    if waiting.is_empty() {
        b.push_str("<p>Nothing waits for an approval.</p>");
    }
    for r in waiting {
        let _ = write!(
            b,
            "<section class=\"approval\"><h2><a href=\"/ui/rollouts/{}\">#{} {}/{}/{}</a></h2><p>Waits for {}. {}</p>",
            r.id,
            r.id,
            esc(&r.environment),
            esc(&r.service),
            esc(&r.version),
            if r.policy.approvers.is_empty() {
                "any approver".to_string()
            } else {
                esc(&r.policy.approvers.join(", "))
            },
            esc(r.reason.as_deref().unwrap_or(""))
        );
        if may_decide(r, who) {
            decide_forms(&mut b, r, who);
        }
        b.push_str("</section>");
    }
    layout("Approvals", "Approvals", Some(who), &b)
}

/// What the history page keeps.
#[derive(Clone, Debug, Default)]
pub struct HistoryFilter {
    /// Environment (the subject's first part).
    pub env: String,
    /// Service (the subject's second part).
    pub service: String,
    /// Actor.
    pub actor: String,
    /// From (ms, inclusive).
    pub since_ms: Option<u64>,
    /// Until (ms, exclusive).
    pub until_ms: Option<u64>,
}

impl HistoryFilter {
    /// Whether `e` passes.
    pub fn keeps(&self, e: &AuditEntry) -> bool {
        let mut parts = e.subject.split('/');
        let (env, service) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        (self.env.is_empty() || env == self.env)
            && (self.service.is_empty() || service == self.service)
            && (self.actor.is_empty() || e.actor == self.actor)
            && self.since_ms.is_none_or(|t| e.at_ms >= t)
            && self.until_ms.is_none_or(|t| e.at_ms < t)
    }

    fn query(&self) -> String {
        format!(
            "env={}&service={}&actor={}",
            url_esc(&self.env),
            url_esc(&self.service),
            url_esc(&self.actor)
        )
    }
}

fn history_table(b: &mut String, entries: &[AuditEntry]) {
    b.push_str("<table class=\"history\"><thead><tr><th>When</th><th>Actor</th><th>Action</th><th>Subject</th><th>Detail</th></tr></thead><tbody>");
    for e in entries.iter().rev() {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            time(e.at_ms),
            esc(&e.actor),
            esc(&e.action),
            esc(&e.subject),
            esc(&e.detail)
        );
    }
    b.push_str("</tbody></table>");
}

/// The audit, filtered, newest first, with export links.
pub fn history(
    entries: &[AuditEntry],
    f: &HistoryFilter,
    raw: &BTreeMap<String, String>,
    who: &Viewer,
) -> String {
    let mut b = String::from("<h1>History</h1>");
    let v = |k: &str| esc(raw.get(k).map(String::as_str).unwrap_or(""));
    let _ = write!(
        b,
        "<form method=\"get\" action=\"/ui/history\" class=\"filters\">\
         <label>Environment <input name=\"env\" value=\"{}\"></label>\
         <label>Service <input name=\"service\" value=\"{}\"></label>\
         <label>Actor <input name=\"actor\" value=\"{}\"></label>\
         <label>Since <input name=\"since\" value=\"{}\" placeholder=\"2026-12-01 or 2026-12-01T08:00\"></label>\
         <label>Until <input name=\"until\" value=\"{}\"></label>\
         <button type=\"submit\">Filter</button></form>",
        v("env"),
        v("service"),
        v("actor"),
        v("since"),
        v("until")
    );
    let q = format!(
        "{}&since={}&until={}",
        f.query(),
        url_esc(raw.get("since").map(String::as_str).unwrap_or("")),
        url_esc(raw.get("until").map(String::as_str).unwrap_or(""))
    );
    let _ = write!(
        b,
        "<p class=\"export\">{} entries. Export: <a href=\"/ui/history?{q}&format=csv\">CSV</a> \
         <a href=\"/ui/history?{q}&format=json\">JSON</a></p>",
        entries.len()
    );
    history_table(&mut b, entries);
    layout("History", "History", Some(who), &b)
}

/// A CSV cell: quoted, and a leading `= + - @` (a formula to a spreadsheet) made text.
fn csv_cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The audit as CSV.
pub fn history_csv(entries: &[AuditEntry]) -> String {
    let mut o = String::from("seq,time,actor,action,subject,detail\r\n");
    for e in entries {
        let _ = write!(
            o,
            "{},{},{},{},{},{}\r\n",
            e.seq,
            csv_cell(&crate::time::rfc3339(
                (e.at_ms / 1000) as i64,
                (e.at_ms % 1000) as u32
            )),
            csv_cell(&e.actor),
            csv_cell(&e.action),
            csv_cell(&e.subject),
            csv_cell(&e.detail)
        );
    }
    o
}

fn verdicts(b: &mut String, r: &RolloutView) {
    b.push_str("<table class=\"verdicts\"><thead><tr><th>Host</th><th>Risk</th><th>Metrics (medians, p-values, judgements)</th></tr></thead><tbody>");
    for (host, v) in &r.verdicts {
        let (risk, summary) = v.split_once(": ").unwrap_or((v.as_str(), ""));
        let _ = write!(
            b,
            "<tr class=\"risk-{}\"><td>{}</td><td>{}</td><td>",
            esc(risk),
            esc(host),
            esc(risk)
        );
        for part in summary.split("; ") {
            let _ = write!(b, "<div>{}</div>", esc(part));
        }
        b.push_str("</td></tr>");
    }
    b.push_str("</tbody></table>");
}

/// Rollouts with metric verdicts (the newest first, each in full: with its charts).
pub fn verification(rs: &[RolloutView], who: &Viewer) -> String {
    let mut b = String::from("<h1>Verification</h1>");
    if rs.is_empty() {
        b.push_str("<p>No verdict yet: hosts report one with each release whose service has <code>verify:</code>.</p>");
    }
    for r in rs {
        let _ = write!(b, "<section>{}", heading(r));
        verdicts(&mut b, r);
        for c in r.charts.iter().rev() {
            b.push_str(&super::chart::verdict(c));
        }
        b.push_str("</section>");
    }
    layout("Verification", "Verification", Some(who), &b)
}

/// The ids of the rollouts the verification page shows: those with verdicts, newest first.
pub fn with_verdicts(s: &Status) -> Vec<u64> {
    let mut ids: Vec<u64> = s
        .rollouts
        .iter()
        .filter(|r| !r.verdicts.is_empty())
        .map(|r| r.id)
        .collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    ids.truncate(VERIFICATION_ROLLOUTS);
    ids
}

/// Rollouts shown on the verification page.
pub const VERIFICATION_ROLLOUTS: usize = 20;
