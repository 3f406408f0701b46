//! systemd notifications (`Type=notify`): READY, STATUS (the phase of a deploy), WATCHDOG,
//! STOPPING. The socket is read from `NOTIFY_SOCKET` once at start-up; without it every call
//! is a no-op.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

/// Sends notifications to systemd.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    target: Option<Arc<(UnixDatagram, SocketAddr)>>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier for the `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID` of `env`.
    pub fn from_env(env: &std::collections::BTreeMap<String, String>) -> Notifier {
        let target = env.get("NOTIFY_SOCKET").and_then(|path| {
            let addr = match path.strip_prefix('@') {
                Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
                None => SocketAddr::from_pathname(path),
            }
            .ok()?;
            let sock = UnixDatagram::unbound().ok()?;
            Some(Arc::new((sock, addr)))
        });
        let ours = env
            .get("WATCHDOG_PID")
            .is_none_or(|p| p.parse::<u32>().ok() == Some(std::process::id()));
        let watchdog = env
            .get("WATCHDOG_USEC")
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && ours)
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    fn send(&self, msg: &str) {
        if let Some(t) = &self.target
            && let Err(e) = t.0.send_to_addr(msg.as_bytes(), &t.1)
        {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    /// Startup is done.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// What the service is doing now (shown by `systemctl status`).
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// Shutting down.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    /// Keep-alive for `WatchdogSec=`.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// How often to call [`Notifier::watchdog`] (half the configured timeout), if enabled.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_the_socket_and_is_silent_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let env = [
            ("NOTIFY_SOCKET".to_string(), path.display().to_string()),
            ("WATCHDOG_USEC".to_string(), "4000000".to_string()),
        ]
        .into();
        let n = Notifier::from_env(&env);
        n.ready("watching\nsecond line");
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=watching");
        assert_eq!(n.watchdog_every(), Some(Duration::from_secs(2)));
        Notifier::from_env(&Default::default()).status("nowhere");
    }
}
