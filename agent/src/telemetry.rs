//! Logging: journald with structured fields when running under systemd (`JOURNAL_STREAM` is
//! set), human-readable lines on stderr otherwise. `DROVER_LOG` sets the filter (default
//! `info`), `DROVER_LOG_FORMAT=json` switches stderr to JSON lines.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How to log, decided once from the environment at start-up.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Log to journald.
    pub journald: bool,
    /// JSON lines on stderr.
    pub json: bool,
    /// The filter directive (`info`, `drover_agent=debug`, …).
    pub filter: Option<String>,
}

impl Settings {
    /// Reads `JOURNAL_STREAM`, `DROVER_LOG` and `DROVER_LOG_FORMAT`.
    pub fn from_env(env: &std::collections::BTreeMap<String, String>) -> Settings {
        Settings {
            journald: env.contains_key("JOURNAL_STREAM"),
            json: env.get("DROVER_LOG_FORMAT").is_some_and(|f| f == "json"),
            filter: env.get("DROVER_LOG").cloned(),
        }
    }
}

/// Installs the global subscriber.
pub fn init(s: &Settings, identifier: &str) {
    let filter = EnvFilter::try_new(s.filter.as_deref().unwrap_or("info"))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if s.journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                // No prefix, so `journalctl SERVICE=hello` finds entries by their fields.
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier(identifier.to_string());
                registry.with(layer).init();
                return;
            }
            Err(e) => eprintln!("journald unavailable ({e}); logging to stderr"),
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    if s.json {
        registry.with(fmt.json().flatten_event(true)).init();
    } else {
        registry.with(fmt.compact()).init();
    }
}
