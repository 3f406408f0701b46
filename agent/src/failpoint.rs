//! Test-only fault injection at named points of a deploy.
//!
//! `DROVER_FAILPOINTS=stage=kill,health=error` (read once at start-up by the binary) makes the
//! agent kill itself with SIGKILL, or fail with an error, when it reaches those points. The
//! crash-recovery tests use it to stop the agent at every phase; it does nothing unless set.

use std::collections::BTreeMap;
use std::sync::OnceLock;

/// What to do at a failpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL the agent (a crash, as far as its state is concerned).
    Kill,
    /// Fail the current step with an error.
    Error,
}

static POINTS: OnceLock<BTreeMap<String, Fault>> = OnceLock::new();

/// Installs failpoints from a spec like `stage=kill,health=error`; unknown actions are errors.
pub fn init(spec: &str) -> Result<(), String> {
    let mut points = BTreeMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, action) = item
            .split_once('=')
            .ok_or_else(|| format!("failpoint `{item}`: expected NAME=kill or NAME=error"))?;
        let action = match action {
            "kill" => Fault::Kill,
            "error" => Fault::Error,
            other => return Err(format!("failpoint `{name}`: unknown action `{other}`")),
        };
        points.insert(name.to_string(), action);
    }
    let _ = POINTS.set(points);
    Ok(())
}

/// Acts on failpoint `name` if it is set: kills the process, or returns an error message.
pub fn hit(name: &str) -> Result<(), String> {
    match POINTS.get().and_then(|p| p.get(name)) {
        None => Ok(()),
        Some(Fault::Kill) => {
            tracing::warn!(failpoint = name, "failpoint: killing the agent");
            // SAFETY: raising a signal on ourselves has no memory-safety preconditions.
            unsafe {
                libc::raise(libc::SIGKILL);
            }
            unreachable!("SIGKILL cannot be caught")
        }
        Some(Fault::Error) => Err(format!("failpoint `{name}` injected an error")),
    }
}
