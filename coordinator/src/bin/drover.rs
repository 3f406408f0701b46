//! `drover`: the operator CLI of the coordinator — fleet status, approvals, pause/resume/abort,
//! retry, rollback, history.

use drover_desired::text::printable;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use drover_coordinator::client::{Client, ClientError};
use drover_coordinator::wire::{RolloutKind, RolloutReply, RolloutView, Status};

/// Operate a drover fleet through its coordinator.
#[derive(Parser)]
#[command(name = "drover", version)]
struct Cli {
    /// The coordinator's URL.
    #[arg(
        long,
        global = true,
        env = "DROVER_URL",
        default_value = "http://127.0.0.1:7070"
    )]
    url: String,
    /// A file holding the bearer token (else the DROVER_TOKEN environment variable).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// PEM file of the CA certificates that sign the coordinator's TLS certificate (else the
    /// system roots).
    #[arg(long, global = true, env = "DROVER_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Allow plain http:// to a coordinator that is not on loopback (the token crosses the
    /// network readable).
    #[arg(long, global = true)]
    insecure: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Hosts and rollouts.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a rollout waiting for approval.
    Approve {
        /// Environment.
        env: String,
        /// Service.
        service: String,
        /// Version.
        version: String,
    },
    /// Reject a rollout waiting for approval (it is aborted).
    Reject {
        /// Environment.
        env: String,
        /// Service.
        service: String,
        /// Version.
        version: String,
    },
    /// Pause the service's running rollout: no new host starts.
    Pause {
        /// Environment.
        env: String,
        /// Service.
        service: String,
    },
    /// Resume a paused rollout.
    Resume {
        /// Environment.
        env: String,
        /// Service.
        service: String,
    },
    /// Abort the service's unfinished rollout.
    Abort {
        /// Environment.
        env: String,
        /// Service.
        service: String,
    },
    /// Start the FAILED or ABORTED rollout of the version Git asks for again, as a new
    /// attempt; hosts forget that it failed there.
    Retry {
        /// Environment.
        env: String,
        /// Service.
        service: String,
    },
    /// Bring every host of the service back to the previous version that succeeded there
    /// (or --to VERSION), under the lease limit, with no approval. Git's version comes back
    /// only with a new commit of the service's version.
    Rollback {
        /// Environment.
        env: String,
        /// Service.
        service: String,
        /// The version to go back to; it must have succeeded in ENV.
        #[arg(long)]
        to: Option<String>,
    },
    /// The audit trail: transitions, approvals (who, when), leases, reverts, denied calls.
    History {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// How many entries (newest).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

fn main() -> ExitCode {
    if let Some(code) = drover_desired::cli::intercept(Cli::command) {
        return code;
    }
    let cli = Cli::parse();
    let token = match &cli.token_file {
        Some(f) => match drover_desired::file::read_text_capped(f, 64 << 10) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: cannot read token file {}: {e}", f.display());
                return ExitCode::from(2);
            }
        },
        None => std::env::var("DROVER_TOKEN").unwrap_or_default(),
    };
    if token.trim().is_empty() {
        eprintln!("error: no token: pass --token-file FILE or set DROVER_TOKEN");
        return ExitCode::from(2);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(run(cli, &token)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", printable(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, token: &str) -> Result<(), ClientError> {
    let c = Client::with_options(
        &cli.url,
        token,
        &drover_coordinator::client::Options {
            ca_file: cli.ca_file.clone(),
            insecure: cli.insecure,
        },
    )?;
    match cli.command {
        Command::Status { json } => {
            let s = c.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s).expect("json"));
            } else {
                // Hosts' text (errors, phases) may hold terminal escapes: shown, not obeyed.
                print!("{}", printable(&status_table(&s)));
            }
        }
        Command::Approve {
            env,
            service,
            version,
        } => {
            print_rollout(&c.decide(&env, &service, &version, true).await?);
        }
        Command::Reject {
            env,
            service,
            version,
        } => {
            print_rollout(&c.decide(&env, &service, &version, false).await?);
        }
        Command::Pause { env, service } => {
            print_rollout(&c.operate(&env, &service, "pause").await?)
        }
        Command::Resume { env, service } => {
            print_rollout(&c.operate(&env, &service, "resume").await?)
        }
        Command::Abort { env, service } => {
            print_rollout(&c.operate(&env, &service, "abort").await?)
        }
        Command::Retry { env, service } => print_rollout(&c.retry(&env, &service).await?),
        Command::Rollback { env, service, to } => {
            print_rollout(&c.rollback(&env, &service, to.as_deref()).await?)
        }
        Command::History { json, limit } => {
            let h = c.history(limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h).expect("json"));
            } else {
                for e in h.entries {
                    let line = format!(
                        "{}  {:<12} {:<16} {:<28} {}",
                        time(e.at_ms),
                        e.actor,
                        e.action,
                        e.subject,
                        e.detail
                    );
                    println!("{}", printable(&line));
                }
            }
        }
    }
    Ok(())
}

fn print_rollout(r: &RolloutReply) {
    println!("{}", printable(&rollout_line(&r.rollout)));
}

fn rollout_line(r: &RolloutView) -> String {
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

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// `YYYY-MM-DD HH:MM:SS` UTC of a millisecond timestamp.
fn time(ms: u64) -> String {
    let t = drover_coordinator::time::rfc3339((ms / 1000) as i64, 0);
    t[..19].replace('T', " ")
}

fn status_table(s: &Status) -> String {
    let mut out = String::new();
    match &s.desired {
        Some(d) => out.push_str(&format!(
            "DESIRED STATE  commit {} ({}), read {}\n",
            short(&d.commit),
            time(d.commit_time_ms),
            time(d.fetched_at_ms)
        )),
        None => out.push_str("DESIRED STATE  not read yet\n"),
    }
    if let Some(e) = &s.git_error {
        out.push_str(&format!("  Git: {e}\n"));
    }
    if let Some(r) = &s.refused {
        out.push_str(&format!(
            "  REFUSED commit {} ({} problem(s)); nothing moves until a valid commit:\n",
            short(&r.commit),
            r.problems.len()
        ));
        for p in &r.problems {
            out.push_str(&format!("    {p}\n"));
        }
    }
    for o in &s.overrides {
        out.push_str(&format!(
            "  {}/{}: rolled back from {} to {} by {} at {}; Git still asks for {}\n",
            o.environment,
            o.service,
            o.from,
            o.to,
            o.by,
            time(o.at_ms),
            o.from
        ));
    }
    out.push_str("HOSTS\n");
    out.push_str(&format!(
        "  {:<16} {:<12} {:<12} {:<10} {:<10} {:<8} {}\n",
        "HOST", "ENVIRONMENT", "SERVICE", "DESIRED", "ACTUAL", "HEALTH", "NOTE"
    ));
    for h in &s.hosts {
        for svc in &h.services {
            let note = match (&svc.phase, &svc.last_error, h.stale) {
                (_, _, true) => "stale (no heartbeat)".to_string(),
                (Some(p), _, _) => format!("deploying ({p})"),
                (_, Some(e), _) => e.chars().take(60).collect(),
                _ => String::new(),
            };
            out.push_str(&format!(
                "  {:<16} {:<12} {:<12} {:<10} {:<10} {:<8} {}\n",
                h.host,
                h.environment,
                svc.service,
                svc.desired.as_deref().unwrap_or("-"),
                svc.actual.as_deref().unwrap_or("-"),
                if svc.healthy { "ok" } else { "DOWN" },
                note
            ));
        }
        if h.services.is_empty() {
            out.push_str(&format!(
                "  {:<16} {:<12} (no services)\n",
                h.host, h.environment
            ));
        }
    }
    out.push_str("ROLLOUTS\n");
    for r in &s.rollouts {
        out.push_str(&format!("  {}\n", rollout_line(r)));
    }
    out
}
