//! `drover-coordinator`: the coordinator server (`serve`) and its helpers.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use drover_coordinator::actor::{self, now_ms};
use drover_coordinator::auth::hash_token;
use drover_coordinator::config::Config;
use drover_coordinator::core::Core;
use drover_coordinator::http::{App, router};
use drover_coordinator::store::{Sqlite, Store};

/// drover's coordinator: rolling-batch leases, approval gates, fleet view, audit.
#[derive(Parser)]
#[command(name = "drover-coordinator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve {
        /// Configuration file.
        #[arg(long, default_value = "/etc/drover/coordinator.yaml")]
        config: PathBuf,
    },
    /// Check the configuration and exit.
    CheckConfig {
        /// Configuration file.
        #[arg(long, default_value = "/etc/drover/coordinator.yaml")]
        config: PathBuf,
    },
    /// Print the sha256 line for a token read from stdin (for the `tokens:` list).
    HashToken,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("DROVER_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .compact()
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::HashToken => {
            let mut token = String::new();
            std::io::stdin()
                .read_to_string(&mut token)
                .context("reading the token from stdin")?;
            if token.trim().is_empty() {
                anyhow::bail!("no token on stdin: echo -n TOKEN | drover-coordinator hash-token");
            }
            println!("sha256: {}", hash_token(&token));
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "ok: listen {}, store {}, repo {} ({})",
                    c.listen,
                    c.sqlite.display(),
                    c.repo.url,
                    c.repo.branch
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: invalid coordinator configuration:\n{e}");
                Ok(ExitCode::from(2))
            }
        },
        Command::Serve { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: invalid coordinator configuration:\n{e}");
                    return Ok(ExitCode::from(2));
                }
            };
            serve(config)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Tells systemd (`Type=notify`) about readiness and shutdown; a no-op outside systemd.
struct SystemdNotify(Option<std::path::PathBuf>);

impl SystemdNotify {
    fn from_env() -> SystemdNotify {
        // Read once at start. Abstract sockets (`@…`) are not used by systemd for services.
        SystemdNotify(
            std::env::var_os("NOTIFY_SOCKET")
                .map(std::path::PathBuf::from)
                .filter(|p| !p.to_string_lossy().starts_with('@')),
        )
    }

    fn send(&self, msg: &str) {
        if let Some(path) = &self.0 {
            let sent = std::os::unix::net::UnixDatagram::unbound()
                .and_then(|s| s.send_to(msg.as_bytes(), path));
            if let Err(e) = sent {
                tracing::debug!(error = %e, "sd_notify failed");
            }
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let notify = SystemdNotify::from_env();
    let mut store = Sqlite::open(&config.sqlite)?;
    let snap = store.load()?;
    let (leases, rollouts) = (snap.leases.len(), snap.rollouts.len());
    let core = Core::new(
        snap,
        config.lease_ttl.as_millis() as u64,
        config.heartbeat.as_millis() as u64,
        now_ms(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let (wake_tx, wake_rx) = tokio::sync::mpsc::channel(1);
    let state = std::thread::Builder::new()
        .name("state".into())
        .spawn(move || {
            actor::run(
                core,
                Box::new(store) as Box<dyn Store>,
                rx,
                Duration::from_millis(250),
                Some(wake_tx),
            )
        })
        .context("starting the state thread")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        tracing::info!(listen = %config.listen, store = %config.sqlite.display(), repo = %config.repo.url, rollouts, leases, "coordinator serving");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let git = tokio::spawn(drover_coordinator::git::follow(
            config.repo.clone(),
            config.git_dir.clone(),
            tx.clone(),
            wake_rx,
            stop_rx,
        ));
        let app = App::new(tx, config.tokens.clone());
        notify.send(&format!("READY=1\nSTATUS=serving on {}", config.listen));
        let served = axum::serve(listener, router(app))
            .with_graceful_shutdown(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
                let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                tracing::info!("shutting down");
                notify.send("STOPPING=1");
            })
            .await
            .context("serving");
        let _ = stop_tx.send(true);
        let _ = git.await;
        served
    })?;
    // The router and the Git follower (and their senders) are gone: the actor finishes its
    // last batch and stops.
    let _ = state.join();
    Ok(())
}
