//! Progress of deploys as they happen, for whoever watches (`drover-agent once`): each phase
//! as it starts and ends, with its duration, and each deploy's end.
//!
//! The engine sends [`Update`]s to a [`Progress`] that nobody listens to unless a command
//! subscribes. [`Board`] turns them into text: on a terminal, a line per finished phase and a
//! live line of the phases running (redrawn in place); otherwise plain lines, one per start
//! and end; with `--json`, one JSON object per line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::engine::Reconciled;

/// One step of a deploy.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[allow(missing_docs, reason = "variant fields are named for what they hold")]
pub enum Update {
    /// A phase began.
    PhaseStarted {
        service: String,
        version: String,
        phase: String,
    },
    /// A phase ended; `error` when it failed.
    PhaseEnded {
        service: String,
        version: String,
        phase: String,
        took_ms: u64,
        error: Option<String>,
    },
    /// The deploy ended.
    Ended {
        service: String,
        version: String,
        /// `deployed`, `rolled_back`, `abandoned`, `broken`, `waiting`, …
        outcome: &'static str,
        summary: String,
        took_ms: u64,
    },
}

/// Where the engine sends updates: nowhere until someone subscribes. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    tx: Arc<Mutex<Option<mpsc::UnboundedSender<Update>>>>,
}

impl Progress {
    /// Sends the updates from now on to the returned receiver.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Update> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    /// Sends `update` if someone listens.
    pub fn send(&self, update: Update) {
        if let Some(tx) = &*self.tx.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = tx.send(update);
        }
    }
}

/// The `outcome` name of a reconcile's end.
pub fn outcome_name(o: &Reconciled) -> &'static str {
    match o {
        Reconciled::UpToDate { .. } => "up_to_date",
        Reconciled::Started { .. } => "started",
        Reconciled::Deployed { .. } => "deployed",
        Reconciled::Abandoned { .. } => "abandoned",
        Reconciled::RolledBack { .. } => "rolled_back",
        Reconciled::SkippedFailed { .. } => "skipped_failed",
        Reconciled::Waiting { .. } => "waiting",
        Reconciled::Broken { .. } => "broken",
        Reconciled::Ran {
            elsewhere: None, ..
        } => "ran",
        Reconciled::Ran { .. } => "ran_elsewhere",
        Reconciled::Failed { .. } => "job_failed",
    }
}

/// How a [`Board`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// A terminal `width` columns wide: finished phases as lines, running ones on a live line.
    Terminal {
        /// Columns.
        width: usize,
    },
    /// Plain lines (a pipe or a file).
    Plain,
    /// One JSON object per line.
    Json,
}

/// Erases the current line of a terminal and returns to its start.
const CLEAR: &str = "\r\x1b[2K";

/// Turns updates into text; keeps the phases running for the live line.
#[derive(Debug)]
pub struct Board {
    style: Style,
    running: BTreeMap<String, (String, String, Instant)>,
    /// Whether a live line is on screen (to erase before the next text).
    live: bool,
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// Text from apps and hooks (in errors) is shown, not obeyed.
fn safe(s: &str) -> String {
    drover_desired::text::printable(s).replace('\n', " ")
}

impl Board {
    /// A board writing in `style`.
    pub fn new(style: Style) -> Board {
        Board {
            style,
            running: BTreeMap::new(),
            live: false,
        }
    }

    /// The text to write for `u` (may be empty).
    pub fn update(&mut self, u: &Update) -> String {
        if self.style == Style::Json {
            let mut v = serde_json::to_value(u).expect("an update serializes");
            v["at"] = crate::fsutil::now_rfc3339().into();
            return format!("{v}\n");
        }
        let mut out = String::new();
        match u {
            Update::PhaseStarted {
                service,
                version,
                phase,
            } => {
                self.running.insert(
                    service.clone(),
                    (version.clone(), phase.clone(), Instant::now()),
                );
                if self.style == Style::Plain {
                    let _ = writeln!(out, "{service} {version}: {phase} …");
                }
            }
            Update::PhaseEnded {
                service,
                version,
                phase,
                took_ms,
                error,
            } => {
                self.running.remove(service);
                let mark = match (self.style, error.is_some()) {
                    (Style::Terminal { .. }, false) => "✓ ",
                    (Style::Terminal { .. }, true) => "✗ ",
                    _ => "",
                };
                let verdict = match error {
                    None => "ok".to_string(),
                    Some(e) => format!("failed: {}", safe(e)),
                };
                let _ = writeln!(
                    out,
                    "{mark}{service} {version}: {phase} {verdict} ({})",
                    secs(*took_ms)
                );
            }
            Update::Ended { service, .. } => {
                self.running.remove(service);
            }
        }
        if let Style::Terminal { .. } = self.style {
            let mut framed = String::new();
            if self.live {
                framed.push_str(CLEAR);
                self.live = false;
            }
            framed.push_str(&out);
            framed.push_str(&self.live_line());
            return framed;
        }
        out
    }

    /// On a terminal: the live line redrawn (elapsed times move on); else nothing.
    pub fn tick(&mut self) -> String {
        match self.style {
            Style::Terminal { .. } if !self.running.is_empty() => {
                let mut s = String::from(CLEAR);
                self.live = false;
                s.push_str(&self.live_line());
                s
            }
            _ => String::new(),
        }
    }

    /// Ends the board: erases the live line.
    pub fn finish(&mut self) -> String {
        if self.live {
            self.live = false;
            CLEAR.to_string()
        } else {
            String::new()
        }
    }

    fn live_line(&mut self) -> String {
        let Style::Terminal { width } = self.style else {
            return String::new();
        };
        if self.running.is_empty() {
            return String::new();
        }
        let line = self
            .running
            .iter()
            .map(|(s, (v, p, at))| {
                format!("{s} {v}: {p} {}", secs(at.elapsed().as_millis() as u64))
            })
            .collect::<Vec<_>>()
            .join(" · ");
        let line = format!("… {line}");
        // The live line must fit, or the terminal wraps it and `\r` erases only its last row.
        let fitted: String = line.chars().take(width.saturating_sub(1).max(10)).collect();
        self.live = true;
        fitted
    }
}

/// How often the live line is redrawn.
pub const TICK: Duration = Duration::from_millis(250);

/// The terminal's width in columns, if stdout is one.
pub use drover_desired::text::terminal_width;

#[cfg(test)]
mod tests {
    use super::*;

    fn started(s: &str, p: &str) -> Update {
        Update::PhaseStarted {
            service: s.into(),
            version: "2.0".into(),
            phase: p.into(),
        }
    }

    fn ended(s: &str, p: &str, error: Option<&str>) -> Update {
        Update::PhaseEnded {
            service: s.into(),
            version: "2.0".into(),
            phase: p.into(),
            took_ms: 1234,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn plain_lines_have_no_terminal_codes() {
        let mut b = Board::new(Style::Plain);
        let mut out = b.update(&started("hello", "fetch"));
        out += &b.update(&ended("hello", "fetch", None));
        out += &b.update(&started("hello", "check"));
        out += &b.update(&ended("hello", "check", Some("HTTP 500\x1b[31m\nboom")));
        out += &b.tick();
        out += &b.finish();
        assert_eq!(
            out,
            "hello 2.0: fetch …\nhello 2.0: fetch ok (1.2s)\nhello 2.0: check …\nhello 2.0: check failed: HTTP 500\\u{1b}[31m boom (1.2s)\n"
        );
    }

    #[test]
    fn a_terminal_gets_finished_phases_above_a_live_line_that_fits() {
        let mut b = Board::new(Style::Terminal { width: 40 });
        let out = b.update(&started("hello", "fetch"));
        assert_eq!(out, "… hello 2.0: fetch 0.0s");
        let out = b.update(&started("a-service-with-a-long-name", "stage"));
        assert!(out.starts_with(CLEAR), "{out:?}");
        assert_eq!(out.chars().count(), CLEAR.chars().count() + 39, "{out:?}");
        let out = b.update(&ended("hello", "fetch", None));
        assert!(
            out.starts_with(&format!("{CLEAR}✓ hello 2.0: fetch ok (1.2s)\n… a-service")),
            "{out:?}"
        );
        assert!(b.tick().starts_with(CLEAR));
        let out = b.update(&ended("a-service-with-a-long-name", "stage", Some("no")));
        assert!(out.contains("✗ a-service-with-a-long-name 2.0: stage failed: no"));
        assert!(!out.contains('…'), "nothing runs: no live line: {out:?}");
        assert_eq!(b.tick(), "");
        assert_eq!(b.finish(), "");
    }

    #[test]
    fn json_is_one_object_per_line() {
        let mut b = Board::new(Style::Json);
        let out = b.update(&ended("hello", "check", Some("HTTP 500")));
        assert!(out.ends_with('\n') && out.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["event"], "phase_ended");
        assert_eq!(v["phase"], "check");
        assert_eq!(v["took_ms"], 1234);
        assert_eq!(v["error"], "HTTP 500");
        assert!(v["at"].as_str().unwrap().ends_with('Z'));
    }
}
