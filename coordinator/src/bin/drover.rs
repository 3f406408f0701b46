//! `drover`: the operator CLI of the coordinator — fleet status, approvals, pause/resume/abort,
//! retry, rollback, history, notifications.

use drover_desired::text::printable;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use drover_coordinator::actor::now_ms;
use drover_coordinator::client::{Client, ClientError};
use drover_coordinator::notify::Listing;
use drover_coordinator::view::{self, Filter, Label, RowState, rollout_line, time};
use drover_coordinator::wire::RolloutReply;

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
        /// Only this environment (repeatable: any of them).
        #[arg(long = "env", value_name = "ENV")]
        environments: Vec<String>,
        /// Only this service (repeatable: any of them).
        #[arg(long = "service", value_name = "SERVICE")]
        services: Vec<String>,
        /// Only hosts with this label (repeatable: all of them).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<Label>,
        /// Only services in this state: ok, deploying, failed, down, stale or drifted
        /// (repeatable: any of them).
        #[arg(long = "state", value_name = "STATE")]
        states: Vec<RowState>,
    },
    /// Approve a rollout waiting for approval (before its start, or after its first batch).
    Approve {
        /// Environment.
        env: String,
        /// Service.
        service: String,
        /// Version.
        version: String,
        /// Also let it start while its environment is frozen (admins; audited). Other
        /// rollouts still wait for the freeze to end.
        #[arg(long)]
        during_freeze: bool,
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
    /// Notifications waiting to be delivered (with their last error and next attempt) or
    /// given up, and the open PagerDuty alerts and Jira issues.
    Notifications {
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
        Command::Status {
            json,
            environments,
            services,
            labels,
            states,
        } => {
            let filter = Filter {
                environments,
                services,
                labels,
                states,
            };
            let s = view::filter(&c.status().await?, &filter);
            if json {
                println!("{}", serde_json::to_string_pretty(&s).expect("json"));
            } else {
                // Hosts' text (errors, phases) may hold terminal escapes: shown, not obeyed.
                print!(
                    "{}",
                    printable(&view::status_table(
                        &s,
                        drover_desired::text::terminal_width()
                    ))
                );
            }
        }
        Command::Approve {
            env,
            service,
            version,
            during_freeze,
        } => {
            print_rollout(
                &c.decide(&env, &service, &version, true, during_freeze)
                    .await?,
            );
        }
        Command::Reject {
            env,
            service,
            version,
        } => {
            print_rollout(&c.decide(&env, &service, &version, false, false).await?);
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
        Command::Notifications { json } => {
            let l: Listing = c.get("/v1/notifications").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l).expect("json"));
            } else {
                print!("{}", printable(&notifications_table(&l, now_ms())));
            }
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

/// `drover notifications` as text: one line per delivery, then the open incidents.
fn notifications_table(l: &Listing, now: u64) -> String {
    let mut t = String::new();
    if l.deliveries.is_empty() {
        t.push_str("no notification waits or failed\n");
    }
    for d in &l.deliveries {
        let state = match d.failed_at_ms {
            Some(_) => "FAILED".to_string(),
            None if d.next_at_ms > now => {
                format!("retry in {}s", (d.next_at_ms - now).div_ceil(1000))
            }
            None => "sending".to_string(),
        };
        t.push_str(&format!(
            "{:<14} {:<16} {:<20} {:<12} {} attempt(s)  {}  delivery {}\n",
            state,
            d.channel,
            d.notice.event.name(),
            d.action.name(),
            d.attempts,
            d.notice.subject(),
            d.id
        ));
        if let Some(e) = &d.last_error {
            t.push_str(&format!("    last error: {e}\n"));
        }
    }
    for i in &l.incidents {
        t.push_str(&format!(
            "open incident on {}: {}/{} (rollout {}, dedup key {}{})\n",
            i.channel,
            i.environment,
            i.service,
            i.rollout,
            i.dedup_key,
            i.issue
                .as_deref()
                .map(|k| format!(", issue {k}"))
                .unwrap_or_default()
        ));
    }
    t
}
