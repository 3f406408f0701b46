//! Coordinator benchmark: lease acquire+release throughput and latency with 100 concurrent
//! clients, over plain HTTP and over TLS and with the etcd store (a 3-member cluster, over
//! plain gRPC and over mutual TLS) in the same run; the coordinator's CPU and memory with
//! 10,000 hosts heartbeating every 30 s (SQLite and etcd); and commit → 1,000 long-polling
//! agents know it, with the push webhook (SQLite and etcd).
//!
//!     cargo bench -p drover-coordinator --bench leases [-- SECONDS]
//!
//! It builds and starts the real `drover-coordinator` (release build, SQLite store with
//! `synchronous = FULL`, the desired state served by `git daemon`) and drives it over loopback
//! HTTP(S) with the crate's own client.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use drover_coordinator::auth::hash_token;
use drover_coordinator::client::{Client, Options};
use drover_coordinator::wire::{
    AcquireRequest, Heartbeat, Outcome, Purpose, ReleaseRequest, ServiceReport,
};

const CLIENTS: usize = 100;
const HOSTS: usize = 10_000;
/// Agents long-polling the branch tip.
const AGENTS: usize = 1_000;
/// Commits whose arrival they time.
const COMMITS: usize = 5;
/// The GitLab webhook token the coordinator is given.
const HOOK_TOKEN: &str = "bench-webhook-token";

fn main() {
    let secs: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let bin = drover_tests::release_bin("drover-coordinator", "drover-coordinator");
    let dir = tempfile::tempdir().unwrap();
    let token = "bench-token";
    let (repo, commit) = desired_state(dir.path());
    raise_open_files();
    // Served by git daemon: the coordinator fetches as from a Git server, not from a local
    // path it would watch.
    let daemon = drover_tests::git::GitDaemon::start(dir.path());
    let git_url = format!("git://127.0.0.1:{}/fleet", daemon.port);
    let hook = dir.path().join("gitlab.token");
    std::fs::write(&hook, HOOK_TOKEN).unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let ca = drover_tests::tls::TestCa::new(&dir.path().join("tls"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // A 3-member etcd cluster for the etcd store (`--max-txn-ops 1024`), and one serving
    // its clients over TLS and asking for client certificates.
    let etcd = drover_tests::etcd::Etcd::start(dir.path());
    std::fs::create_dir_all(dir.path().join("mtls")).unwrap();
    let etcd_tls = drover_tests::etcd::Etcd::start_tls(&dir.path().join("mtls"), &ca);
    let (cert, key) = ca.client("bench-coordinator");
    // The same load over plain HTTP, then over TLS, then with the etcd store (plain gRPC,
    // then mutual TLS), in one run.
    let (mut plain, mut on_plain_etcd) = (0.0, 0.0);
    for name in ["plain", "tls", "etcd", "etcd-tls"] {
        let (tls, on_etcd) = (name == "tls", name.starts_with("etcd"));
        let store = if name == "etcd" {
            format!(
                "{{ etcd: {{ endpoints: [{}], prefix: /bench, max_txn_ops: 1024, leader_ttl: 5s }} }}",
                etcd.endpoints().join(", ")
            )
        } else if name == "etcd-tls" {
            format!(
                "{{ etcd: {{ endpoints: [{}], prefix: /bench, max_txn_ops: 1024, leader_ttl: 5s, tls: {{ ca_file: {}, cert_file: {}, key_file: {} }} }} }}",
                etcd_tls.endpoints().join(", "),
                ca.ca.display(),
                cert.display(),
                key.display()
            )
        } else {
            format!(
                "{{ sqlite: {} }}",
                dir.path().join(format!("{name}.db")).display()
            )
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tls_line = if tls { ca.config() } else { String::new() };
        // The rate limit is off: this measures what the coordinator can do.
        std::fs::write(
            dir.path().join(format!("{name}.yaml")),
            format!(
                "listen: 127.0.0.1:{port}\nstore: {store}\nrepo: {{ url: \"{git_url}\", poll_interval: 10m }}\nstate_dir: {}\nheartbeat_interval: 30s\nlimits: {{ requests_per_second: 0, connections: 8192, connections_per_address: 8192 }}\nwebhook: {{ gitlab_token_file: {} }}\n{tls_line}tokens:\n  - {{ name: fleet, role: agent, sha256: {} }}\n",
                dir.path().join(name).display(),
                hook.display(),
                hash_token(token)
            ),
        )
        .unwrap();
        let mut server = Command::new(&bin)
            .args(["serve", "--config"])
            .arg(dir.path().join(format!("{name}.yaml")))
            .stderr(Stdio::null())
            .spawn()
            .expect("coordinator starts");
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{port}");
        let options = Options {
            ca_file: tls.then(|| ca.ca.clone()),
            insecure: false,
        };
        rt.block_on(async {
            let c = Client::with_options(&url, token, &options).unwrap();
            // Ready once it has read the desired state (the lease requests need it).
            for _ in 0..400 {
                if c.acquire(&request(0, 0, &commit)).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let ops = leases(&url, token, &options, &commit, secs, name).await;
            if tls {
                println!(
                    "leases over TLS: {:.2}x the plain-HTTP throughput of the same run",
                    ops / plain
                );
            } else if name == "etcd-tls" {
                println!(
                    "leases on etcd over mutual TLS (3 members): {:.2}x the plain-gRPC etcd throughput of the same run   target ≥ 2000 ops/s",
                    ops / on_plain_etcd
                );
            } else if on_etcd {
                on_plain_etcd = ops;
                println!(
                    "leases on etcd (3 members): {:.2}x the SQLite throughput of the same run   target ≥ 2000 ops/s",
                    ops / plain
                );
                heartbeats(&url, token, server.id()).await;
                tips(&url, token, &repo).await;
            } else {
                plain = ops;
                heartbeats(&url, token, server.id()).await;
                tips(&url, token, &repo).await;
            }
        });
        let _ = server.kill();
        let _ = server.wait();
    }
    drop(daemon);
}

/// Raises this process's open-file soft limit to the hard one: the agents' connections need it.
fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn git(repo: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(repo)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.com")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.com")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A desired-state repo (git CLI) with environment `bench` pinning services svc0..svc{CLIENTS}
/// at 1.0.0, with room for every client's lease.
fn desired_state(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let repo = dir.join("fleet");
    std::fs::create_dir_all(repo.join("services")).unwrap();
    std::fs::create_dir_all(repo.join("environments")).unwrap();
    let mut env = String::from(
        "environment: bench\nrollout: { max_parallel: 1000, max_failures: 1000000 }\nservices:\n",
    );
    for i in 0..CLIENTS {
        std::fs::write(
            repo.join(format!("services/svc{i}.yaml")),
            format!(
                "service: svc{i}\nartifact: {{ url: \"http://127.0.0.1/a.tgz\" }}\ninstall: {{ root: /srv/svc{i} }}\nrun: {{ command: [bin/x] }}\n"
            ),
        )
        .unwrap();
        env.push_str(&format!(
            "  svc{i}: {{ version: 1.0.0, sha256: {} }}\n",
            "a".repeat(64)
        ));
    }
    std::fs::write(repo.join("environments/bench.yaml"), env).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "bench"]);
    let commit = git(&repo, &["rev-parse", "HEAD"]);
    (repo, commit)
}

fn request(i: usize, n: u64, commit: &str) -> AcquireRequest {
    AcquireRequest {
        host: format!("h{i}-{n}"),
        environment: "bench".into(),
        service: format!("svc{i}"),
        version: "1.0.0".into(),
        purpose: Purpose::Deploy,
        commit: commit.into(),
    }
}

fn hb(host: &str) -> Heartbeat {
    Heartbeat {
        environment: "bench".into(),
        labels: [("role".to_string(), "web".to_string())].into(),
        agent_version: Some("bench".into()),
        commit: None,
        services: vec![ServiceReport {
            service: "hello".into(),
            desired: Some("1.0.0".into()),
            actual: Some(format!("1.0.{}", host.len() % 3)),
            healthy: true,
            phase: None,
            last_error: None,
            failed: None,
        }],
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn leases(
    url: &str,
    token: &str,
    options: &Options,
    commit: &str,
    secs: u64,
    name: &str,
) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (stop, commit) = (stop.clone(), commit.to_string());
        let c = Client::with_options(url, token, options).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let req = request(i, n, &commit);
                let t = Instant::now();
                let g = c.acquire(&req).await.expect("acquire");
                lat.push(t.elapsed());
                let t = Instant::now();
                c.release(
                    &g.lease.id,
                    &ReleaseRequest {
                        outcome: Outcome::Success,
                        message: None,
                        verification: None,
                    },
                )
                .await
                .expect("release");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat: Vec<Duration> = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = t0.elapsed() + Duration::from_secs(1);
    lat.sort();
    let ops = lat.len() as f64 / elapsed.as_secs_f64();
    println!(
        "leases ({name}): {CLIENTS} concurrent clients, {ops:.0} ops/s (acquire + release, {} ops in {:.1}s), latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms   target ≥ 5000 ops/s",
        lat.len(),
        elapsed.as_secs_f64(),
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3
    );
    ops
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

async fn heartbeats(url: &str, token: &str, pid: u32) {
    let before = rss_mib(pid);
    // Register every host, 100 at a time.
    let clients: Vec<Client> = (0..100).map(|_| Client::new(url, token).unwrap()).collect();
    let t0 = Instant::now();
    for chunk in 0..HOSTS / 100 {
        let mut js = Vec::new();
        for (j, c) in clients.iter().enumerate() {
            let host = format!("host-{:05}", chunk * 100 + j);
            let c = c.clone();
            js.push(tokio::spawn(async move {
                c.heartbeat(&host, &hb(&host)).await.expect("heartbeat")
            }));
        }
        for j in js {
            j.await.unwrap();
        }
    }
    let registered = t0.elapsed();
    // Then a steady 30 s cycle: every host once, spread evenly (333/s).
    let t0 = Instant::now();
    let cpu0 = cpu_secs(pid);
    let every = Duration::from_secs(30) / HOSTS as u32;
    let mut ticker = tokio::time::interval(every);
    let mut js = Vec::new();
    for i in 0..HOSTS {
        ticker.tick().await;
        let host = format!("host-{i:05}");
        let c = clients[i % 100].clone();
        js.push(tokio::spawn(async move {
            c.heartbeat(&host, &hb(&host)).await.expect("heartbeat")
        }));
    }
    for j in js {
        j.await.unwrap();
    }
    let cycle = t0.elapsed();
    println!(
        "hosts: {HOSTS} registered in {:.1}s, then a 30 s heartbeat cycle in {:.1}s using {:.1} % of a core; coordinator RSS {:.1} MiB (was {:.1} MiB before the hosts)",
        registered.as_secs_f64(),
        cycle.as_secs_f64(),
        (cpu_secs(pid) - cpu0) / cycle.as_secs_f64() * 100.0,
        rss_mib(pid),
        before
    );
}

/// CPU time (user + system) the process has used, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Commit → every one of `AGENTS` long-polling agents (the agent's own client call) knows the
/// new tip: a commit, GitLab's push webhook, the coordinator's fetch from `git daemon`, the
/// long-polls answered. `COMMITS` rounds; latency from the commit being made.
async fn tips(url: &str, token: &str, repo: &std::path::Path) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let mut pollers = Vec::new();
    for i in 0..AGENTS {
        let c = Client::new(url, token).unwrap();
        let tx = tx.clone();
        pollers.push(tokio::spawn(async move {
            let host = format!("agent-{i:04}");
            let mut have: Option<String> = None;
            loop {
                match c.tip(&host, have.as_deref(), Duration::from_secs(25)).await {
                    Ok(Some(t)) if have.as_deref() != Some(t.as_str()) => {
                        let _ = tx.send((t.clone(), Instant::now()));
                        have = Some(t);
                    }
                    Ok(_) => {}
                    Err(e) => panic!("tip: {e}"),
                }
            }
        }));
    }
    // Every agent has the current tip and is parked in a long-poll.
    for _ in 0..AGENTS {
        rx.recv().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hook = reqwest::Client::new();
    let mut all: Vec<Duration> = Vec::new();
    let mut worst: Vec<Duration> = Vec::new();
    for n in 0..COMMITS {
        let repo = repo.to_path_buf();
        let commit = tokio::task::spawn_blocking(move || {
            git(
                &repo,
                &["commit", "-q", "--allow-empty", "-m", &format!("bench {n}")],
            );
            git(&repo, &["rev-parse", "HEAD"])
        })
        .await
        .unwrap();
        let t0 = Instant::now();
        let r = hook
            .post(format!("{url}/v1/webhooks/git"))
            .header("X-Gitlab-Token", HOOK_TOKEN)
            .header("X-Gitlab-Event", "Push Hook")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "the webhook is accepted");
        let mut lat = Vec::with_capacity(AGENTS);
        while lat.len() < AGENTS {
            let (tip, at) = rx.recv().await.unwrap();
            assert_eq!(tip, commit, "agents see the new commit");
            lat.push(at - t0);
        }
        lat.sort();
        worst.push(*lat.last().unwrap());
        all.extend(lat);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for p in pollers {
        p.abort();
    }
    all.sort();
    println!(
        "commit → {AGENTS} long-polling agents know it (push webhook, coordinator fetch from git daemon, {COMMITS} commits): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (slowest agent per commit: {})   target ≤ 1 s p99",
        percentile(&all, 0.5).as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() * 1e3,
        all.last().unwrap().as_secs_f64() * 1e3,
        worst
            .iter()
            .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
