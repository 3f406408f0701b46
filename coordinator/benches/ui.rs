//! Dashboard benchmark: the fleet page of 10,000 hosts, rendered by the real coordinator.
//!
//!     cargo bench -p drover-coordinator --bench ui [-- REQUESTS]
//!
//! It builds and starts the release `drover-coordinator`, registers 10,000 hosts by heartbeat
//! (the agents' own client), logs in as a viewer and times `GET /ui/fleet` (first page, last
//! page, a state filter) over loopback: the coordinator's state read, filter, counts over every
//! row and the page's HTML. Then the same render in-process, without HTTP.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_coordinator::auth::hash_token;
use drover_coordinator::client::Client;
use drover_coordinator::wire::{Heartbeat, HostView, ServiceReport, Status};

const HOSTS: usize = 10_000;

fn hb(i: usize) -> Heartbeat {
    Heartbeat {
        environment: if i % 2 == 0 { "prod" } else { "staging" }.into(),
        labels: [("role".to_string(), "web".to_string())].into(),
        agent_version: Some("bench".into()),
        commit: None,
        services: vec![ServiceReport {
            service: "hello".into(),
            desired: Some("1.0.0".into()),
            actual: Some(if i % 10 == 0 { "0.9.0" } else { "1.0.0" }.into()),
            healthy: i % 13 != 0,
            phase: None,
            last_error: (i % 13 == 0).then(|| "health check failed: connection refused".into()),
            failed: None,
        }],
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30);
    let bin = drover_tests::release_bin("drover-coordinator", "drover-coordinator");
    let dir = tempfile::tempdir().unwrap();
    let repo = drover_tests::git::Repo::init(&dir.path().join("fleet"));
    repo.write(
        "environments/prod.yaml",
        "environment: prod\nservices: {}\n",
    )
    .write(
        "environments/staging.yaml",
        "environment: staging\nservices: {}\n",
    );
    repo.commit("empty");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.path().join("c.yaml"),
        format!(
            "listen: 127.0.0.1:{port}\nstore: {{ sqlite: {} }}\nrepo: {{ url: \"{}\", poll_interval: 10m }}\nheartbeat_interval: 60s\nlimits: {{ requests_per_second: 0 }}\ntokens:\n  - {{ name: fleet, role: agent, sha256: {} }}\n  - {{ name: watcher, role: viewer, sha256: {} }}\n",
            dir.path().join("c.db").display(),
            repo.dir.display(),
            hash_token("fleet-token"),
            hash_token("watcher-token")
        ),
    )
    .unwrap();
    let mut server = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(dir.path().join("c.yaml"))
        .stderr(Stdio::null())
        .spawn()
        .expect("coordinator starts");
    let url = format!("http://127.0.0.1:{port}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let clients: Vec<Client> = (0..100).map(|_| Client::new(&url, "fleet-token").unwrap()).collect();
        for _ in 0..200 {
            if clients[0].heartbeat("host-00000", &hb(0)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for chunk in 0..HOSTS / 100 {
            let mut js = Vec::new();
            for (j, c) in clients.iter().enumerate() {
                let i = chunk * 100 + j;
                let c = c.clone();
                js.push(tokio::spawn(async move {
                    c.heartbeat(&format!("host-{i:05}"), &hb(i)).await.expect("heartbeat")
                }));
            }
            for j in js {
                j.await.unwrap();
            }
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let login = http
            .post(format!("{url}/ui/login"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("token=watcher-token")
            .send()
            .await
            .unwrap();
        let cookie = login
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .expect("a session cookie")
            .to_string();
        println!("dashboard: fleet page of {HOSTS} hosts over HTTP, {n} requests each (server-side render + loopback)");
        for path in ["/ui/fleet", "/ui/fleet?page=100", "/ui/fleet?state=down&env=prod"] {
            let mut times = Vec::with_capacity(n);
            let mut bytes = 0;
            for _ in 0..n {
                let t0 = Instant::now();
                let r = http
                    .get(format!("{url}{path}"))
                    .header("Cookie", &cookie)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                bytes = r.bytes().await.unwrap().len();
                times.push(t0.elapsed());
            }
            times.sort();
            println!(
                "  GET {path:<32} p50 {:6.1} ms  p99 {:6.1} ms  max {:6.1} ms  ({} KiB)",
                ms(percentile(&times, 0.5)),
                ms(percentile(&times, 0.99)),
                ms(*times.last().unwrap()),
                bytes / 1024
            );
        }
    });
    let _ = server.kill();
    let _ = server.wait();
    // The render alone, in this process.
    let status = Status {
        desired: None,
        refused: None,
        git_error: None,
        overrides: vec![],
        hosts: (0..HOSTS)
            .map(|i| {
                let h = hb(i);
                HostView {
                    host: format!("host-{i:05}"),
                    environment: h.environment,
                    labels: h.labels,
                    agent_version: h.agent_version,
                    services: h.services,
                    last_seen_ms: 0,
                    stale: false,
                }
            })
            .collect(),
        rollouts: vec![],
    };
    let viewer = drover_coordinator::ui::html::Viewer {
        name: "watcher".into(),
        role: "viewer",
        may_approve: false,
        groups: vec![],
        csrf: "x".into(),
    };
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let page = drover_coordinator::ui::html::fleet(
            &status,
            &drover_coordinator::view::Filter::default(),
            1,
            &viewer,
            0,
        );
        std::hint::black_box(page);
        times.push(t0.elapsed());
    }
    times.sort();
    println!(
        "  render only (filter, counts over {HOSTS} rows, one page): p50 {:.2} ms, p99 {:.2} ms",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.99))
    );
}
