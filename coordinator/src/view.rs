//! What the `drover` CLI shows of the coordinator's answers: the fleet's status filtered by
//! environment, service, label and state ([`filter`]), and laid out as tables that fit the
//! terminal ([`status_table`]) — columns as wide as their widest value, so versions are never
//! cut, and the note (a deploy phase, the last error) wrapped, never truncated.
//!
//! Pure functions over [`crate::wire`] types; the caller makes the text printable.

use std::fmt::Write as _;
use std::str::FromStr;

use crate::wire::{HostView, RolloutKind, RolloutView, ServiceReport, Status};

/// The state of one host's service, as `--state` names it. A row may be in several.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowState {
    /// Runs the desired version, healthy, nothing under way, heard from lately.
    Ok,
    /// A deploy (or rollback) is under way.
    Deploying,
    /// A version failed there and is not retried by itself.
    Failed,
    /// Not running or not healthy.
    Down,
    /// The host has not sent a heartbeat for three intervals.
    Stale,
    /// It runs another version than its desired state names.
    Drifted,
}

impl RowState {
    /// Every state, with its name.
    pub const ALL: [(RowState, &'static str); 6] = [
        (RowState::Ok, "ok"),
        (RowState::Deploying, "deploying"),
        (RowState::Failed, "failed"),
        (RowState::Down, "down"),
        (RowState::Stale, "stale"),
        (RowState::Drifted, "drifted"),
    ];

    /// The states `svc` on `host` is in.
    pub fn of(host: &HostView, svc: &ServiceReport) -> Vec<RowState> {
        let drifted = svc.desired.is_some() && svc.desired != svc.actual;
        let mut out = Vec::new();
        if svc.phase.is_some() {
            out.push(RowState::Deploying);
        }
        if svc.failed.is_some() {
            out.push(RowState::Failed);
        }
        if !svc.healthy {
            out.push(RowState::Down);
        }
        if host.stale {
            out.push(RowState::Stale);
        }
        if drifted {
            out.push(RowState::Drifted);
        }
        if out.is_empty() {
            out.push(RowState::Ok);
        }
        out
    }
}

impl FromStr for RowState {
    type Err = String;
    fn from_str(s: &str) -> Result<RowState, String> {
        RowState::ALL
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(st, _)| *st)
            .ok_or_else(|| {
                let names: Vec<&str> = RowState::ALL.iter().map(|(_, n)| *n).collect();
                format!("unknown state `{s}`: use one of {}", names.join(", "))
            })
    }
}

/// A `key=value` label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    /// The label.
    pub key: String,
    /// Its value.
    pub value: String,
}

impl FromStr for Label {
    type Err = String;
    fn from_str(s: &str) -> Result<Label, String> {
        match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok(Label {
                key: k.to_string(),
                value: v.to_string(),
            }),
            _ => Err(format!(
                "label selector `{s}` is not KEY=VALUE (e.g. role=web)"
            )),
        }
    }
}

/// What `drover status` keeps. Each list is "any of"; the lists together are "all of"
/// (labels: every one must match).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Environments.
    pub environments: Vec<String>,
    /// Services.
    pub services: Vec<String>,
    /// Labels, all required.
    pub labels: Vec<Label>,
    /// Row states.
    pub states: Vec<RowState>,
}

impl Filter {
    fn env(&self, e: &str) -> bool {
        self.environments.is_empty() || self.environments.iter().any(|x| x == e)
    }
    fn service(&self, s: &str) -> bool {
        self.services.is_empty() || self.services.iter().any(|x| x == s)
    }
    fn host(&self, h: &HostView) -> bool {
        self.env(&h.environment)
            && self
                .labels
                .iter()
                .all(|l| h.labels.get(&l.key) == Some(&l.value))
    }
    fn row(&self, h: &HostView, s: &ServiceReport) -> bool {
        self.service(&s.service)
            && (self.states.is_empty()
                || RowState::of(h, s).iter().any(|st| self.states.contains(st)))
    }
}

/// `s` with only what `f` keeps: hosts of the environments and labels, their services of the
/// services and states (a host left with none is dropped when services or states are asked
/// for), and the rollouts and rollbacks of those environments and services.
pub fn filter(s: &Status, f: &Filter) -> Status {
    let rows_asked = !f.services.is_empty() || !f.states.is_empty();
    let hosts = s
        .hosts
        .iter()
        .filter(|h| f.host(h))
        .filter_map(|h| {
            let mut h = h.clone();
            let services = std::mem::take(&mut h.services);
            h.services = services.into_iter().filter(|svc| f.row(&h, svc)).collect();
            (!rows_asked || !h.services.is_empty()).then_some(h)
        })
        .collect();
    Status {
        desired: s.desired.clone(),
        refused: s.refused.clone(),
        git_error: s.git_error.clone(),
        overrides: s
            .overrides
            .iter()
            .filter(|o| f.env(&o.environment) && f.service(&o.service))
            .cloned()
            .collect(),
        hosts,
        rollouts: s
            .rollouts
            .iter()
            .filter(|r| f.env(&r.environment) && f.service(&r.service))
            .cloned()
            .collect(),
    }
}

/// A commit id, short.
pub fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// `YYYY-MM-DD HH:MM:SS` UTC of a millisecond timestamp.
pub fn time(ms: u64) -> String {
    let t = crate::time::rfc3339((ms / 1000) as i64, 0);
    t[..19].replace('T', " ")
}

/// `text` broken at spaces into lines of at most `width` characters (a longer word is cut
/// into pieces); `None`: one line.
pub fn wrap(text: &str, width: Option<usize>) -> Vec<String> {
    let Some(width) = width.map(|w| w.max(10)) else {
        return vec![text.to_string()];
    };
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let used = line.chars().count();
            let room = if used == 0 {
                width
            } else {
                width.saturating_sub(used + 1)
            };
            if word.len() <= room {
                if used > 0 {
                    line.push(' ');
                }
                line.extend(word.iter());
                break;
            }
            if used > 0 {
                lines.push(std::mem::take(&mut line));
                continue;
            }
            let rest = word.split_off(width);
            lines.push(word.into_iter().collect());
            word = rest;
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// One line (or more) of a rollout.
pub fn rollout_line(r: &RolloutView) -> String {
    let kind = match r.kind {
        RolloutKind::Deploy => "",
        RolloutKind::Rollback => " rollback",
    };
    let attempt = if r.attempt > 1 {
        format!(", attempt {}", r.attempt)
    } else {
        String::new()
    };
    let mut s = format!(
        "{}/{}/{} {} (#{}{kind}{attempt}, commit {}, leases {}, ok {}, failed {}, reverted {})",
        r.environment,
        r.service,
        r.version,
        r.state,
        r.id,
        short(&r.commit),
        r.leases,
        r.succeeded.len(),
        r.failed.len(),
        r.reverted.len()
    );
    if let Some(d) = &r.decision {
        s.push_str(&format!(
            "; {} by {} at {}",
            if d.approved { "approved" } else { "rejected" },
            d.by,
            time(d.at_ms)
        ));
    }
    if let Some(why) = &r.reason {
        s.push_str(&format!("; {why}"));
    }
    if let Some(w) = &r.waiting_for {
        s.push_str(&format!("\n      waits for {w}"));
    }
    for (host, v) in &r.verdicts {
        s.push_str(&format!("\n      verification on {host}: {v}"));
    }
    s
}

/// Text indented by `indent`, each of its lines wrapped to `width` (continuations indented
/// two more).
fn block(out: &mut String, indent: usize, text: &str, width: Option<usize>) {
    for line in text.lines() {
        let lead = line.len() - line.trim_start().len();
        let pad = indent + lead;
        let inner = width.map(|w| w.saturating_sub(pad + 2));
        for (j, part) in wrap(line.trim_start(), inner).iter().enumerate() {
            let extra = if j == 0 { 0 } else { 2 };
            let _ = writeln!(out, "{:pad$}{part}", "", pad = pad + extra);
        }
    }
}

/// The table of `drover status`, fitting `width` columns (`None`: not a terminal, no limit).
pub fn status_table(s: &Status, width: Option<usize>) -> String {
    let mut out = String::new();
    let desired = match &s.desired {
        Some(d) => format!(
            "DESIRED STATE  commit {} ({}), read {}",
            short(&d.commit),
            time(d.commit_time_ms),
            time(d.fetched_at_ms)
        ),
        None => "DESIRED STATE  not read yet".to_string(),
    };
    block(&mut out, 0, &desired, width);
    if let Some(e) = &s.git_error {
        block(&mut out, 2, &format!("Git: {e}"), width);
    }
    if let Some(r) = &s.refused {
        block(
            &mut out,
            2,
            &format!(
                "REFUSED commit {} ({} problem(s)); nothing moves until a valid commit:",
                short(&r.commit),
                r.problems.len()
            ),
            width,
        );
        for p in &r.problems {
            block(&mut out, 4, p, width);
        }
    }
    for o in &s.overrides {
        block(
            &mut out,
            2,
            &format!(
                "{}/{}: rolled back from {} to {} by {} at {}; Git still asks for {}",
                o.environment,
                o.service,
                o.from,
                o.to,
                o.by,
                time(o.at_ms),
                o.from
            ),
            width,
        );
    }
    out.push_str("HOSTS\n");
    out.push_str(&hosts_table(&s.hosts, width));
    out.push_str("ROLLOUTS\n");
    for r in &s.rollouts {
        block(&mut out, 2, &rollout_line(r), width);
    }
    out
}

const HEAD: [&str; 7] = [
    "HOST",
    "ENVIRONMENT",
    "SERVICE",
    "DESIRED",
    "ACTUAL",
    "HEALTH",
    "NOTE",
];

/// Below this many columns left for the note, it goes on lines of its own.
const MIN_NOTE: usize = 24;

fn hosts_table(hosts: &[HostView], width: Option<usize>) -> String {
    let mut rows: Vec<[String; 7]> = Vec::new();
    for h in hosts {
        for svc in &h.services {
            let note = match (&svc.phase, &svc.last_error, h.stale) {
                (_, _, true) => "stale (no heartbeat)".to_string(),
                (Some(p), _, _) => format!("deploying ({p})"),
                (_, Some(e), _) => e.clone(),
                _ => String::new(),
            };
            rows.push([
                h.host.clone(),
                h.environment.clone(),
                svc.service.clone(),
                svc.desired.clone().unwrap_or_else(|| "-".into()),
                svc.actual.clone().unwrap_or_else(|| "-".into()),
                if svc.healthy { "ok" } else { "DOWN" }.into(),
                note,
            ]);
        }
        if h.services.is_empty() {
            rows.push([
                h.host.clone(),
                h.environment.clone(),
                "(no services)".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
    }
    let mut cols = [0usize; 6];
    for (i, c) in cols.iter_mut().enumerate() {
        *c = rows
            .iter()
            .map(|r| r[i].chars().count())
            .chain([HEAD[i].len()])
            .max()
            .unwrap_or(0);
    }
    // Two spaces of indent, one between columns.
    let fixed: usize = 2 + cols.iter().map(|c| c + 1).sum::<usize>();
    let mut out = String::new();
    if let Some(w) = width
        && fixed > w
    {
        // Too narrow for the columns: a block per row, every value whole on its own line.
        for r in &rows {
            block(
                &mut out,
                2,
                &format!("{} ({}) {}: {}", r[0], r[1], r[2], r[5]),
                width,
            );
            if !r[3].is_empty() {
                block(&mut out, 6, &format!("desired {}", r[3]), width);
                block(&mut out, 6, &format!("actual {}", r[4]), width);
            }
            if !r[6].is_empty() {
                block(&mut out, 6, &r[6], width);
            }
        }
        return out;
    }
    let note_room = width.map(|w| w.saturating_sub(fixed));
    // Notes in a column only when it is wide enough for each of their words (a URL broken
    // across lines is no longer one); else each note goes below its row.
    let longest = rows
        .iter()
        .flat_map(|r| r[6].split_whitespace())
        .map(|w| w.chars().count())
        .max()
        .unwrap_or(0);
    let inline = note_room.is_none_or(|r| r >= MIN_NOTE && r >= longest);
    let line = |out: &mut String, r: &[String; 7], note: &str| {
        let mut l = String::from("  ");
        for (i, c) in cols.iter().enumerate() {
            let _ = write!(l, "{:<c$} ", r[i], c = c);
        }
        l.push_str(note);
        let _ = writeln!(out, "{}", l.trim_end());
    };
    let head: [String; 7] = HEAD.map(String::from);
    line(&mut out, &head, if inline { "NOTE" } else { "" });
    for r in &rows {
        if inline {
            let parts = wrap(&r[6], note_room);
            line(&mut out, r, &parts[0]);
            for p in &parts[1..] {
                let _ = writeln!(out, "{:fixed$}{p}", "");
            }
        } else {
            line(&mut out, r, "");
            if !r[6].is_empty() {
                let room = width.map(|w| w.saturating_sub(6));
                for p in wrap(&r[6], room) {
                    let _ = writeln!(out, "      {p}");
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
