//! `drover-coordinator`: the coordinator server (`serve`) and its helpers.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use drover_coordinator::actor::{self, Settings, now_ms};
use drover_coordinator::auth::hash_token;
use drover_coordinator::config::Config;
use drover_coordinator::config::StoreConfig;
use drover_coordinator::core::Core;
use drover_coordinator::http::{App, metrics_router, router};
use drover_coordinator::notify;
use drover_coordinator::server::{self, ServerStats};
use drover_coordinator::store::{Sqlite, Store, dump, etcd};
use drover_coordinator::tls::{self, TlsSlot};

/// drover's coordinator: rolling-batch leases, approval gates, fleet view, audit.
#[derive(Parser)]
#[command(name = "drover-coordinator", version)]
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
    /// Make a fresh agent token for HOST: prints the token (for the host's token_file) and
    /// the line to add to `tokens:`.
    Enroll {
        /// The host's name, as in its agent configuration.
        host: String,
    },
    /// Check, export or import the store (recovery of a damaged store).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Integrity check and a read of every row; exit 1 if anything is wrong.
    Check {
        /// The SQLite store file.
        #[arg(long)]
        store: PathBuf,
    },
    /// Every readable row as JSON lines on stdout.
    Export {
        /// The SQLite store file.
        #[arg(long, required_unless_present = "config", conflicts_with = "config")]
        store: Option<PathBuf>,
        /// Or the store of this coordinator.yaml (SQLite or etcd).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// A new store (the file must not exist; the etcd prefix must be empty, no coordinator
    /// leading it) from JSON lines on stdin.
    Import {
        /// The SQLite store file to create.
        #[arg(long, required_unless_present = "config", conflicts_with = "config")]
        store: Option<PathBuf>,
        /// Or the store of this coordinator.yaml (SQLite or etcd).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // Files the coordinator creates (the store, its WAL, the Git mirror) are its own.
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    if let Some(code) = drover_desired::cli::intercept(Cli::command) {
        return code;
    }
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
        Command::Enroll { host } => {
            if !drover_coordinator::auth::valid_host(&host) {
                anyhow::bail!(
                    "`{host}` is not a host name (letters, digits, `.`, `-`, `_`, `+`; at most 253)"
                );
            }
            let token = hex::encode(rand::random::<[u8; 32]>());
            println!(
                "# token for {host} (put it in the host's token_file, mode 600; it is shown once):"
            );
            println!("{token}");
            println!(
                "# add to tokens: in coordinator.yaml, then `systemctl reload drover-coordinator`:"
            );
            println!(
                "  - {{ name: {host}, role: agent, host: {host}, sha256: {} }}",
                hash_token(&token)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Store { command } => store_command(command),
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                if let Some(t) = &c.tls {
                    tls::load(t)?;
                }
                for name in c.tokens.fleet_wide() {
                    println!(
                        "warning: agent token `{name}` may act as any host; give it `host:` (drover-coordinator enroll HOST)"
                    );
                }
                println!(
                    "ok: listen {}, store {}, repo {} ({})",
                    c.listen,
                    c.store.describe(),
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

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
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

/// The store a `store` subcommand works on: `--store FILE`, or the one of `--config`.
fn store_of(store: Option<PathBuf>, config: Option<PathBuf>) -> anyhow::Result<StoreConfig> {
    match (store, config) {
        (Some(p), _) => Ok(StoreConfig::Sqlite(p)),
        (None, Some(c)) => Ok(Config::load(&c)
            .map_err(|e| anyhow::anyhow!("invalid coordinator configuration:\n{e}"))?
            .store),
        (None, None) => anyhow::bail!("give --store FILE or --config coordinator.yaml"),
    }
}

fn etcd_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn store_command(command: StoreCommand) -> anyhow::Result<ExitCode> {
    let show = |c: &dump::Counts| {
        for (table, n) in &c.rows {
            eprintln!("{table}: {n} rows");
        }
        for p in &c.problems {
            eprintln!("problem: {p}");
        }
    };
    match command {
        StoreCommand::Check { store } => {
            let c = dump::check(&store)?;
            show(&c);
            if c.problems.is_empty() {
                println!("ok: {} is sound", store.display());
                Ok(ExitCode::SUCCESS)
            } else {
                println!(
                    "{} has {} problem(s); `store export` saves the readable rows",
                    store.display(),
                    c.problems.len()
                );
                Ok(ExitCode::FAILURE)
            }
        }
        StoreCommand::Export { store, config } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let c = match store_of(store, config)? {
                StoreConfig::Sqlite(path) => dump::export(&path, &mut out)?,
                StoreConfig::Etcd(e) => {
                    let rt = etcd_runtime()?;
                    let client = rt.block_on(etcd::connect(&e))?;
                    // Reads only: no lead needed (a leading coordinator may keep running).
                    let mut s =
                        etcd::Etcd::new(client, rt.handle().clone(), &e, etcd::Lead { lease: 0 });
                    dump::export_etcd(&mut s, &mut out)?
                }
            };
            show(&c);
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Import { store, config } => {
            let stdin = std::io::stdin();
            let (c, what) = match store_of(store, config)? {
                StoreConfig::Sqlite(path) => (
                    dump::import(&path, &mut stdin.lock())?,
                    path.display().to_string(),
                ),
                StoreConfig::Etcd(e) => {
                    let (rows, c) = dump::rows_for_etcd(&mut stdin.lock())?;
                    let rt = etcd_runtime()?;
                    rt.block_on(async {
                        let mut client = etcd::connect(&e).await?;
                        etcd::import(&mut client, &e, rows).await
                    })?;
                    (c, format!("etcd prefix {}", e.prefix))
                }
            };
            show(&c);
            println!("ok: {what} created");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// How many connections the open-file limit leaves room for. The soft limit is raised to the
/// hard one first (systemd's default soft limit is 1024, its hard limit much higher).
fn connection_budget(wanted: u32) -> u32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return wanted;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    };
    // Room for the store, the Git mirror, the listeners and the runtime.
    let room = soft.saturating_sub(128).min(u64::from(u32::MAX)) as u32;
    if room < wanted {
        tracing::warn!(
            open_files = soft,
            connections = room,
            wanted,
            "the open-file limit allows fewer connections than limits.connections (raise LimitNOFILE)"
        );
    }
    wanted.min(room.max(16))
}

/// Re-reads the tokens and the TLS files (SIGHUP). On any problem the running ones stay.
fn reload(path: &Path, app: &App, tls: Option<&TlsSlot>) {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload: invalid configuration; keeping the running one");
            return;
        }
    };
    match (tls, &config.tls) {
        (Some(slot), Some(files)) => match tls::load(files) {
            Ok(c) => slot.set(c),
            Err(e) => {
                tracing::error!(error = %e, "reload: TLS files unusable; keeping the running ones");
                return;
            }
        },
        (None, None) => {}
        _ => tracing::warn!(
            "reload: turning TLS on or off needs a restart; only the tokens are reloaded"
        ),
    }
    for name in config.tokens.fleet_wide() {
        tracing::warn!(
            token = name,
            "agent token may act as any host; bind it with `host:`"
        );
    }
    app.set_tokens(config.tokens);
    tracing::info!("reloaded the tokens and the TLS files");
}

fn serve(config: Config) -> anyhow::Result<()> {
    let notify = SystemdNotify::from_env();
    let tls = match &config.tls {
        Some(files) => Some(TlsSlot::new(tls::load(files)?)),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (store, snap): (Box<dyn Store>, _) = match &config.store {
        StoreConfig::Sqlite(path) => {
            let mut store = Sqlite::open(path)?;
            let snap = store.load()?;
            (Box::new(store), snap)
        }
        StoreConfig::Etcd(e) => {
            let me = format!(
                "{} {}",
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .unwrap_or_default()
                    .trim(),
                config.listen
            );
            let won = rt.block_on(async {
                let mut client = etcd::connect(e).await?;
                tracing::info!(endpoints = %e.endpoints.join(","), prefix = %e.prefix, "campaigning to lead the fleet");
                // A standby is up (systemd must not time its start out): it serves nothing.
                notify.send("READY=1\nSTATUS=standing by: another coordinator may lead");
                tokio::select! {
                    r = etcd::campaign(&mut client, e, &me) => r.map(|l| Some((client, l))),
                    () = terminated() => Ok(None),
                }
            })?;
            let Some((client, l)) = won else {
                tracing::info!("stopped while standing by");
                return Ok(());
            };
            tracing::info!(lease = l.lease, "leading the fleet");
            // The lead is kept alive from now on (loading may take a while); it ends when its
            // etcd lease does: stop at once (fenced: its writes would be refused anyway).
            let (keeper, cfg) = (client.clone(), e.clone());
            rt.spawn(async move {
                let why = etcd::keep_lead(keeper, &cfg, l).await;
                etcd::deposed(&why)
            });
            let mut store = etcd::Etcd::new(client, rt.handle().clone(), e, l);
            let snap = store.load()?;
            (Box::new(store), snap)
        }
    };
    let (leases, rollouts) = (snap.leases.len(), snap.rollouts.len());
    let mut core = Core::new(
        snap,
        config.lease_ttl.as_millis() as u64,
        config.heartbeat.as_millis() as u64,
        now_ms(),
    );
    core.max_hosts = config.limits.max_hosts as usize;
    let channels: std::collections::BTreeMap<String, notify::Channel> = config
        .notifications
        .iter()
        .map(|spec| spec.load().map(|c| (c.name.clone(), c)))
        .collect::<Result<_, _>>()
        .context("reading the notification channels' secret files")?;
    core.channels = channels
        .iter()
        .map(|(n, c)| (n.clone(), c.target.kind()))
        .collect();
    let channels = Arc::new(channels);
    let (outbox_tx, outbox_rx) = tokio::sync::mpsc::unbounded_channel();
    let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for name in config.tokens.fleet_wide() {
        tracing::warn!(
            token = name,
            "agent token may act as any host: a holder can lease, release and heartbeat as any host; give each host its own (drover-coordinator enroll HOST)"
        );
    }
    let mut limits = config.limits.clone();
    limits.connections = connection_budget(limits.connections);
    let settings = Settings {
        audit_max_age: config.audit_max_age,
        audit_max_entries: config.audit_max_entries,
        outbox: Some(outbox_tx),
        generation: Some(generation.clone()),
        ..Settings::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let (wake_tx, wake_rx) = tokio::sync::mpsc::channel(1);
    let webhook_wake = wake_tx.clone();
    let webhook_secrets = drover_coordinator::webhook::Secrets::load(&config.webhook)
        .context("reading the webhook secrets")?;
    let state = std::thread::Builder::new()
        .name("state".into())
        .spawn(move || actor::run(core, store, rx, settings, Some(wake_tx)))
        .context("starting the state thread")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let metrics_listener = match config.metrics_listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("cannot listen on {a} (metrics_listen)"))?,
            ),
            None => None,
        };
        tracing::info!(listen = %config.listen, tls = tls.is_some(), store = %config.store.describe(), repo = %config.repo.url, rollouts, leases, connections = limits.connections, "coordinator serving");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (tip_tx, tip_rx) = tokio::sync::watch::channel(None);
        let git = tokio::spawn(drover_coordinator::git::follow(
            config.repo.clone(),
            config.git_dir.clone(),
            tx.clone(),
            tip_tx,
            wake_rx,
            stop_rx.clone(),
        ));
        let sender = {
            let tx = tx.clone();
            tokio::spawn(notify::sender::run(
                channels.clone(),
                config.public_url.clone(),
                outbox_rx,
                Arc::new(move |id, attempt| {
                    let _ = tx.send(actor::Command::Delivered(id, attempt));
                }),
            ))
        };
        let stats = Arc::new(ServerStats::default());
        let app = App::new(
            tx,
            config.tokens.clone(),
            limits.requests_per_second,
            limits.burst,
            stats.clone(),
        )
        .with_git_webhook(webhook_secrets, webhook_wake)
        .with_slack(&channels)
        .with_ui(drover_coordinator::ui::Ui::new(
            tls.is_some(),
            generation,
            stop_rx.clone(),
        ))
        // A long-poll ends well before the request timeout would cut it.
        .with_tip(
            tip_rx,
            (limits.request_timeout.saturating_sub(std::time::Duration::from_secs(5))).clamp(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(25),
            ),
            stop_rx.clone(),
        );
        let metrics = metrics_listener.map(|l| {
            let mut limits = limits.clone();
            limits.connections = 64;
            let mut stop = stop_rx.clone();
            tokio::spawn(server::serve(
                l,
                metrics_router(app.clone()),
                None,
                limits,
                Arc::new(ServerStats::default()),
                async move {
                    let _ = stop.changed().await;
                },
            ))
        });
        let hup = {
            let (app, tls, path) = (app.clone(), tls.clone(), config.path.clone());
            tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let Ok(mut hup) = signal(SignalKind::hangup()) else {
                    return;
                };
                while hup.recv().await.is_some() {
                    notify.send("RELOADING=1");
                    reload(&path, &app, tls.as_ref());
                    notify.send("READY=1");
                }
            })
        };
        SystemdNotify::from_env().send(&format!("READY=1\nSTATUS=serving on {}", config.listen));
        server::serve(listener, router(app), tls, limits, stats, async move {
            terminated().await;
            tracing::info!("shutting down");
            SystemdNotify::from_env().send("STOPPING=1");
        })
        .await;
        hup.abort();
        // The sender holds a way to the actor: it goes first, so that the actor can stop.
        sender.abort();
        let _ = sender.await;
        let _ = stop_tx.send(true);
        if let Some(m) = metrics {
            let _ = m.await;
        }
        let _ = git.await;
        anyhow::Ok(())
    })?;
    // The router and the Git follower (and their senders) are gone: the actor finishes its
    // last batch and stops.
    let _ = state.join();
    Ok(())
}
