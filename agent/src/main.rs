//! `drover-agent`: deploys this host's services (or an ECS cluster's) from a desired-state
//! Git repo. See `drover-agent --help`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use drover_agent::config::{self, Config};
use drover_agent::runner::Agent;
use drover_agent::{failpoint, spec, telemetry};

/// Deploys this host's services (or an ECS cluster's) from a desired-state Git repo.
#[derive(Parser)]
#[command(name = "drover-agent", version)]
struct Cli {
    /// Configuration file (drop-ins are read from `<name>.d/*.yaml` next to it).
    #[arg(long, global = true, default_value = config::DEFAULT_PATH, env = "DROVER_AGENT_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run as a daemon: watch the repo and keep this host in its desired state.
    Run,
    /// One pass: deploy what changed, wait for the checks, exit 0 if the host converged.
    /// Phases are shown as they happen (live on a terminal, plain lines otherwise).
    Once {
        /// Print one JSON object per line: every phase's start and end, each deploy's end,
        /// then a `result` per service.
        #[arg(long)]
        json: bool,
    },
    /// Check a desired-state repo (a directory) and print every problem with file:line.
    Validate {
        /// The repo's directory (with services/ and environments/).
        repo: PathBuf,
        /// A host var that templates may use (repeatable); defaults to the vars of --config
        /// when that file exists, otherwise any name is accepted.
        #[arg(long = "var", value_name = "NAME")]
        vars: Vec<String>,
    },
    /// Check the agent configuration (and drop-ins) and exit.
    CheckConfig,
    /// Show what would change on this host, changing nothing.
    Plan,
    /// Show the local state of every service.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Roll SERVICE back to its previous release (the current one is marked failed).
    Rollback {
        /// The service.
        service: String,
    },
}

/// One malloc arena: the agent allocates little, mostly on one thread, and each extra
/// glibc arena (one per thread that ever allocated) keeps its own free memory resident,
/// about 1 MiB of an idle agent's RSS.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    if let Some(code) = drover_desired::cli::intercept(Cli::command) {
        return code;
    }
    let cli = Cli::parse();
    let env: BTreeMap<String, String> = std::env::vars().collect();
    telemetry::init(&telemetry::Settings::from_env(&env), "drover-agent");
    if let Some(spec) = env.get("DROVER_FAILPOINTS")
        && let Err(e) = failpoint::init(spec)
    {
        eprintln!("error: DROVER_FAILPOINTS: {e}");
        return ExitCode::from(2);
    }
    match real_main(cli, env) {
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

fn real_main(cli: Cli, env: BTreeMap<String, String>) -> anyhow::Result<ExitCode> {
    if let Command::Validate { repo, vars } = &cli.command {
        return validate(repo, vars, &cli.config, env);
    }
    let config = match Config::load(&cli.config, env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if let Command::CheckConfig = cli.command {
        println!(
            "ok: {} (host {}, environment {}, repo {})",
            config
                .files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            config.host,
            config.environment,
            config.repo.url
        );
        return Ok(ExitCode::SUCCESS);
    }
    let notify = drover_agent::notify::Notifier::from_env(&config.env);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let agent = Agent::new(config, notify).await?;
        match cli.command {
            Command::Run => {
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    shutdown_signal().await;
                    let _ = tx.send(true);
                });
                agent.run(rx).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Once { json } => {
                let show = show_progress(&agent, json);
                let results = agent.once().await;
                show.end().await;
                let results = results?;
                let mut ok = true;
                for (name, outcome) in &results {
                    if json {
                        let line = serde_json::json!({
                            "event": "result",
                            "service": name,
                            "outcome": drover_agent::progress::outcome_name(outcome),
                            "converged": outcome.converged(),
                            "summary": outcome.summary(),
                        });
                        println!("{line}");
                    } else {
                        println!(
                            "{name}: {}",
                            drover_desired::text::printable(&outcome.summary())
                        );
                    }
                    ok &= outcome.converged();
                }
                if results.is_empty() && !json {
                    println!("no services for this host");
                }
                Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Command::Plan => {
                print!("{}", agent.plan().await?);
                Ok(ExitCode::SUCCESS)
            }
            Command::Status { json } => {
                let status = agent.status();
                if json {
                    println!("{}", serde_json::to_string_pretty(&status.json())?);
                } else {
                    // App and hook output may hold terminal escapes: shown, not obeyed.
                    print!("{}", drover_desired::text::printable(&status.table()));
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Rollback { service } => {
                let outcome = agent.rollback(&service).await?;
                println!(
                    "{service}: {}",
                    drover_desired::text::printable(&outcome.summary())
                );
                Ok(
                    if matches!(outcome, drover_agent::engine::Reconciled::RolledBack { .. }) {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    },
                )
            }
            Command::Validate { .. } | Command::CheckConfig => unreachable!("handled above"),
        }
    })
}

/// Prints the agent's progress while `once` runs, until [`Shower::end`].
struct Shower {
    done: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Shower {
    /// Prints what is left and erases the live line.
    async fn end(self) {
        let _ = self.done.send(());
        let _ = self.task.await;
    }
}

fn show_progress(agent: &Agent, json: bool) -> Shower {
    use drover_agent::progress::{Board, Style, TICK, terminal_width};
    use std::io::Write;
    let style = match (json, terminal_width()) {
        (true, _) => Style::Json,
        (false, Some(width)) => Style::Terminal { width },
        (false, None) => Style::Plain,
    };
    let mut rx = agent.progress().subscribe();
    let (done, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let write = |s: String| {
        if !s.is_empty() {
            let mut out = std::io::stdout().lock();
            // A closed pipe (`| head`) must not stop the deploy: the text is dropped.
            let _ = out.write_all(s.as_bytes()).and_then(|()| out.flush());
        }
    };
    let task = tokio::spawn(async move {
        let mut board = Board::new(style);
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                u = rx.recv() => match u {
                    Some(u) => write(board.update(&u)),
                    None => break,
                },
                _ = tick.tick() => write(board.tick()),
                _ = &mut done_rx => {
                    while let Ok(u) = rx.try_recv() {
                        write(board.update(&u));
                    }
                    break;
                }
            }
        }
        write(board.finish());
    });
    Shower { done, task }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `drover-agent validate REPO`.
fn validate(
    repo: &Path,
    vars: &[String],
    config: &Path,
    env: BTreeMap<String, String>,
) -> anyhow::Result<ExitCode> {
    let mut files = Vec::new();
    for dir in ["services", "environments"] {
        let Ok(entries) = std::fs::read_dir(repo.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let rel = format!("{dir}/{}", e.file_name().to_string_lossy());
            if !spec::is_spec_file(&rel) {
                continue;
            }
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            if size > drover_desired::yaml::MAX_FILE_BYTES as u64 {
                anyhow::bail!(
                    "{rel}: the file is {size} bytes; desired-state files are at most {} bytes",
                    drover_desired::yaml::MAX_FILE_BYTES
                );
            }
            if files.len() >= drover_desired::git::MAX_REPO_FILES {
                anyhow::bail!(
                    "more than {} desired-state files under services/ and environments/",
                    drover_desired::git::MAX_REPO_FILES
                );
            }
            let text = drover_agent::fsutil::read_text_capped(
                &e.path(),
                drover_desired::yaml::MAX_FILE_BYTES as u64,
            )
            .with_context(|| format!("cannot read {}", e.path().display()))?;
            files.push((rel, text));
        }
    }
    if files.is_empty() && !repo.join("environments").is_dir() {
        anyhow::bail!(
            "{} is not a desired-state repo: it has no services/ or environments/ directory",
            repo.display()
        );
    }
    files.sort();
    let loaded = config
        .is_file()
        .then(|| Config::load(config, env).ok())
        .flatten();
    let host_vars: Option<Vec<String>> = if !vars.is_empty() {
        Some(vars.to_vec())
    } else {
        loaded.as_ref().map(|c| c.vars.keys().cloned().collect())
    };
    match spec::load(&files, host_vars.as_deref()) {
        Ok(r) => {
            let default_user =
                loaded
                    .as_ref()
                    .and_then(|c| c.run_as.as_ref())
                    .is_some_and(|(u, _)| {
                        u.as_ref()
                            .is_some_and(|u| u.as_str() != "root" && u.as_str() != "0")
                    });
            for w in spec::root_warnings(&r, default_user) {
                eprintln!("warning: {w}");
            }
            let used = r.host_var_names();
            println!(
                "ok: {} service(s), {} environment(s){}",
                r.services.len(),
                r.environments.len(),
                if used.is_empty() {
                    String::new()
                } else {
                    format!("; host vars used: {}", used.join(", "))
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(problems) => {
            println!("{problems}");
            eprintln!("{} problem(s) found", problems.0.len());
            Ok(ExitCode::FAILURE)
        }
    }
}
