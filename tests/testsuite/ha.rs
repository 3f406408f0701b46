//! Several coordinators on a real 3-member etcd cluster: one leads, the others stand by; the
//! agents know them all. Killing the leader, or an etcd member, in the middle of a rollout
//! loses no lease, approval or outcome, and never lets more than `max_parallel` hosts deploy.

use std::time::Duration;

use drover_tests::coordinator::Coordinator;
use drover_tests::etcd::Etcd;
use drover_tests::host::{Fleet, Host, Running};
use drover_tests::wait_for;

use crate::coordinator::{max_overlap, wait_all, windows};

/// A coordinator named `name` on `etcd`, under prefix `/t`, its lead lasting 4 s.
fn on_etcd(f: &Fleet, etcd: &Etcd, name: &str) -> Coordinator {
    on_endpoints(f, &etcd.endpoints(), name, "")
}

/// [`on_etcd`] on `endpoints`, with `more` (`, key: value`) in its `store.etcd`.
fn on_endpoints(f: &Fleet, endpoints: &[String], name: &str, more: &str) -> Coordinator {
    let state = f.dir.path().join(name).join("state");
    let store = format!(
        "store: {{ etcd: {{ endpoints: [{}], prefix: /t, max_txn_ops: 1024, leader_ttl: 4s{more} }} }}\nstate_dir: {}\n",
        endpoints.join(", "),
        state.display()
    );
    Coordinator::prepare_with(f.dir.path(), name, &store, "")
}

/// The agent config naming every coordinator.
fn agent_config(cs: &[&Coordinator]) -> String {
    let urls: Vec<String> = cs.iter().map(|c| format!("\"{}\"", c.url())).collect();
    format!(
        "coordinator: {{ url: [{}], token_file: \"{}\", heartbeat_interval: 500ms }}\n",
        urls.join(", "),
        cs[0].token_file("fleet").display()
    )
}

fn serving(c: &Coordinator) -> bool {
    drover_tests::http_get(c.port, "/healthz").is_some_and(|(s, _)| s == 200)
}

/// Waits for every host to run `version`; on a timeout, shows what each side says.
fn converge(hosts: &[Host], agents: &[Running], cs: &mut [Coordinator], version: &str) {
    let limit = std::time::Instant::now() + Duration::from_secs(120);
    for (h, a) in hosts.iter().zip(agents) {
        loop {
            let s = h.hello();
            if s["current"] == version && s["deploying"].is_null() {
                break;
            }
            if std::time::Instant::now() > limit {
                let tail = |t: String| {
                    let lines: Vec<&str> = t.lines().collect();
                    lines[lines.len().saturating_sub(40)..].join("\n")
                };
                panic!(
                    "{} does not run {version}: {s:#}\nagent log:\n{}\ncoordinators:\n{}",
                    h.name,
                    tail(a.log()),
                    cs.iter()
                        .map(|c| tail(std::fs::read_to_string(&c.log).unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join("\n----\n")
                );
            }
            supervise(cs);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Watches the apps from outside, on their ports: the most hosts whose app did not answer
/// `/health` with 200 at the same moment, until `stop` is set.
fn probe(
    ports: Vec<u16>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(usize, u64)> {
    std::thread::spawn(move || {
        let (mut max, mut samples) = (0, 0u64);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let down = ports
                .iter()
                .filter(|p| drover_tests::http_get(**p, "/health").is_none_or(|(s, _)| s != 200))
                .count();
            max = max.max(down);
            samples += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        (max, samples)
    })
}

/// Starts again every coordinator that exited by itself (one that lost the lead exits), as
/// systemd's `Restart=always` does.
fn supervise(cs: &mut [Coordinator]) {
    for c in cs.iter_mut() {
        if c.exited() {
            c.spawn();
        }
    }
}

/// The coordinator that leads, once one does (restarting those that exited meanwhile).
fn lead(cs: &mut [Coordinator]) -> usize {
    wait_for("a coordinator to lead", Duration::from_secs(30), || {
        supervise(cs);
        leader(cs)
    })
}

/// Which coordinator serves (leads) now.
fn leader(cs: &[Coordinator]) -> Option<usize> {
    cs.iter().position(serving)
}

/// A small deterministic generator (the seed is printed, so a failing run can be replayed
/// with `DROVER_HA_SEED`).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Rounds of rollouts across 3 coordinators and 6 agent daemons on a 3-member etcd cluster;
/// in each, as soon as a host deploys, the leading coordinator or an etcd member (or both)
/// is killed with SIGKILL. `DROVER_HA_ROUNDS` rounds (3 by default; the first kills both).
#[test]
fn the_leader_or_an_etcd_member_killed_mid_rollout_loses_nothing() {
    let rounds: u64 = std::env::var("DROVER_HA_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("DROVER_HA_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) ^ drover_tests::free_port() as u64);
    eprintln!("ha: seed {seed} (DROVER_HA_SEED replays it), {rounds} rounds");
    let mut rng = Rng(seed);
    let f = Fleet::new();
    let mut etcd = Etcd::start(f.dir.path());
    let mut cs: Vec<Coordinator> = ["coord-a", "coord-b", "coord-c"]
        .iter()
        .map(|n| on_etcd(&f, &etcd, n))
        .collect();
    cs[0].restart();
    // The others stand by: they do not listen while A leads.
    for c in &mut cs[1..] {
        c.spawn();
    }
    for c in &cs[1..] {
        wait_for("a standby", Duration::from_secs(20), || {
            std::fs::read_to_string(&c.log)
                .ok()
                .filter(|l| l.contains("standing by"))
        });
        assert!(!serving(c));
    }
    // The leader key names A.
    assert!(
        etcd.ctl(&["get", "/t/leader", "--print-value-only"])
            .contains(&format!("127.0.0.1:{}", cs[0].port))
    );

    // Each deploy takes a second at least (the old release's before_stop sleeps).
    f.repo.write(
        "services/hello.yaml",
        &drover_tests::host::SERVICE.replace("before_stop: bin/drain", "before_stop: bin/slow"),
    );
    let policy = "rollout: { max_parallel: 2 }\n";
    f.pin_env("test", policy, &f.hello("1.0.0", &[]));
    let config = agent_config(&cs.iter().collect::<Vec<_>>());
    let names: Vec<String> = (1..=6).map(|i| format!("h{i}")).collect();
    let hosts: Vec<Host> = names
        .iter()
        .map(|n| f.host_with(n, "test", &config))
        .collect();
    let _agents: Vec<Running> = hosts.iter().map(|h| h.spawn(&[])).collect();
    wait_all(&hosts, "1.0.0", Duration::from_secs(120));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = probe(hosts.iter().map(|h| h.port).collect(), stop.clone());
    let mut faults = Vec::new();
    for round in 0..rounds {
        supervise(&mut cs);
        let version = format!("{}.0.0", round + 2);
        // 0: the leader; 1: an etcd member; 2: both. The first round kills both.
        let fault = if round == 0 { 2 } else { rng.below(3) };
        let member = rng.below(3) as usize;
        f.pin_env("test", policy, &f.hello(&version, &[]));
        wait_for("a host to deploy", Duration::from_secs(60), || {
            hosts
                .iter()
                .any(|h| {
                    h.events()
                        .iter()
                        .any(|e| e["version"] == version.as_str() && e["phase"] == "stop")
                })
                .then_some(())
        });
        let was = lead(&mut cs);
        if fault != 1 {
            cs[was].kill();
            faults.push(format!("{version}: coordinator {was} killed"));
        }
        if fault != 0 {
            etcd.kill(member);
            faults.push(format!("{version}: etcd member {member} killed"));
        }
        if fault != 1 {
            // Another takes over within the lead's TTL; the killed one comes back standing by.
            let limit = std::time::Instant::now() + Duration::from_secs(30);
            while leader(&cs).is_none() {
                supervise(&mut cs);
                assert!(
                    std::time::Instant::now() < limit,
                    "no coordinator leads:\n{}",
                    cs.iter()
                        .map(|c| std::fs::read_to_string(&c.log).unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join("\n----\n")
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            cs[was].spawn();
        }
        converge(&hosts, &_agents, &mut cs, &version);
        if fault != 0 {
            etcd.restart(member);
        }
        // From the agents' own logs: never more than 2 hosts between stop and healthy.
        let w = windows(&hosts, &version);
        assert_eq!(w.len(), 6, "{version}: every host deployed once: {w:?}");
        assert!(max_overlap(&w) <= 2, "{version}: {w:?}");
        // From the audit (the leader now has everything the one before wrote): each host got
        // one lease and released it once, and the rollout succeeded.
        let now = lead(&mut cs);
        wait_for("the rollout to succeed", Duration::from_secs(30), || {
            (cs[now].state("test", &version).as_deref() == Some("SUCCESS")).then_some(())
        });
        let hist = cs[now].history();
        let subject = format!("test/hello/{version}");
        for action in ["lease_granted", "lease_released"] {
            let mut hosts: Vec<&str> = hist
                .iter()
                .filter(|e| e["action"] == action && e["subject"] == subject.as_str())
                .map(|e| e["actor"].as_str().unwrap_or(""))
                .collect();
            assert_eq!(hosts.len(), 6, "{action} of {version}: {hist:?}");
            hosts.sort_unstable();
            hosts.dedup();
            assert_eq!(hosts.len(), 6, "{action} once per host: {hist:?}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (down, samples) = prober.join().unwrap();
    eprintln!(
        "ha: {rounds} rounds, {} faults injected: {}; at most {down} of 6 apps down at once ({samples} probes of every app)",
        faults.len(),
        faults.join("; ")
    );
    // From outside, on the apps' ports: never more than max_parallel down.
    assert!(down <= 2, "{down} apps were down at once");
    // One leads; the killed ones came back as standbys.
    let now = lead(&mut cs);
    for (i, c) in cs.iter().enumerate().filter(|(i, _)| *i != now) {
        assert!(!serving(c), "coordinator {i} serves beside {now}");
    }
    let b = &cs[now];

    // The fleet moves between the stores: etcd → a SQLite file → an empty etcd prefix.
    let tool = |args: &[&str], input: &[u8]| {
        use std::io::Write;
        let mut child = std::process::Command::new(drover_tests::bin("drover-coordinator"))
            .arg("store")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let config = b.config();
    let config = config.to_str().unwrap();
    let dump = tool(&["export", "--config", config], b"");
    let lines = |d: &[u8], table: &str| {
        String::from_utf8_lossy(d)
            .lines()
            .filter(|l| l.contains(&format!("\"table\":\"{table}\"")))
            .count()
    };
    assert_eq!(lines(&dump, "hosts"), 6);
    assert!(
        lines(&dump, "audit") >= 24,
        "{}",
        String::from_utf8_lossy(&dump)
    );
    let db = f.dir.path().join("moved.db");
    tool(&["import", "--store", db.to_str().unwrap()], &dump);
    let back = tool(&["export", "--store", db.to_str().unwrap()], b"");
    for t in ["rollouts", "leases", "hosts", "state", "audit"] {
        assert_eq!(lines(&back, t), lines(&dump, t), "{t}");
    }
    let t2 = f.dir.path().join("t2.yaml");
    std::fs::write(
        &t2,
        std::fs::read_to_string(b.config())
            .unwrap()
            .replace("prefix: /t,", "prefix: /t2,"),
    )
    .unwrap();
    tool(&["import", "--config", t2.to_str().unwrap()], &back);
    let again = tool(&["export", "--config", t2.to_str().unwrap()], b"");
    assert_eq!(again, dump, "etcd → SQLite → etcd keeps every row");
    // An import never overwrites: the prefix is not empty now.
    let out = std::process::Command::new(drover_tests::bin("drover-coordinator"))
        .args(["store", "import", "--config", t2.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("etcd prefix /t2 holds"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// etcd serving its clients over TLS and letting in only certificates its CA signed: two
/// coordinators reach it with `store.etcd.tls`, behind one HAProxy URL that health-checks
/// `/healthz` (the agents know only it); the fleet deploys, the standby takes over from a
/// killed leader and the agents follow through the same URL. A coordinator without a client
/// certificate, trusting another CA, or speaking plain gRPC to etcd is refused at start
/// with the reason.
#[test]
fn coordinators_on_etcd_over_mutual_tls_behind_one_load_balanced_url() {
    let f = Fleet::new();
    let ca = drover_tests::tls::TestCa::new(&f.dir.path().join("etcd-ca"));
    let etcd = Etcd::start_tls(f.dir.path(), &ca);
    let (cert, key) = ca.client("coordinator");
    let mutual = format!(
        ", tls: {{ ca_file: {}, cert_file: {}, key_file: {} }}",
        ca.ca.display(),
        cert.display(),
        key.display()
    );
    let mut cs: Vec<Coordinator> = ["coord-a", "coord-b"]
        .iter()
        .map(|n| on_endpoints(&f, &etcd.endpoints(), n, &mutual))
        .collect();
    cs[0].restart();
    cs[1].spawn();
    wait_for("a standby", Duration::from_secs(20), || {
        std::fs::read_to_string(&cs[1].log)
            .ok()
            .filter(|l| l.contains("standing by"))
    });
    assert!(
        etcd.ctl(&["get", "/t/leader", "--print-value-only"])
            .contains(&format!("127.0.0.1:{}", cs[0].port))
    );
    let lb = drover_tests::haproxy::Haproxy::start(f.dir.path(), &[cs[0].port, cs[1].port]);
    f.pin_env("test", "", &f.hello("1.0.0", &[]));
    let config = format!(
        "coordinator: {{ url: \"{}\", token_file: \"{}\", heartbeat_interval: 500ms }}\n",
        lb.url(),
        cs[0].token_file("fleet").display()
    );
    let hosts: Vec<Host> = ["h1", "h2"]
        .iter()
        .map(|n| f.host_with(n, "test", &config))
        .collect();
    let agents: Vec<Running> = hosts.iter().map(|h| h.spawn(&[])).collect();
    wait_all(&hosts, "1.0.0", Duration::from_secs(120));
    cs[0].kill();
    assert_eq!(lead(&mut cs), 1, "the standby leads");
    f.pin_env("test", "", &f.hello("2.0.0", &[]));
    converge(&hosts, &agents, &mut cs, "2.0.0");
    wait_for("the rollout to succeed", Duration::from_secs(30), || {
        (cs[1].state("test", "2.0.0").as_deref() == Some("SUCCESS")).then_some(())
    });
    // Both hosts were granted their 2.0.0 lease by B, through the balancer.
    let granted = cs[1]
        .history()
        .iter()
        .filter(|e| e["action"] == "lease_granted" && e["subject"] == "test/hello/2.0.0")
        .count();
    assert_eq!(granted, 2);
    // What the rollout wrote is in etcd (read with etcdctl's own client certificate).
    assert!(
        etcd.ctl(&["get", "/t/rollouts/", "--prefix", "--keys-only"])
            .contains("/t/rollouts/")
    );

    // Refused at start, each with its reason, and nothing written.
    let other = drover_tests::tls::TestCa::new(&f.dir.path().join("other-ca"));
    let plain: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| e.replace("https://", "http://"))
        .collect();
    for (name, tls, endpoints, says) in [
        (
            "no-client-cert",
            format!(", tls: {{ ca_file: {} }}", ca.ca.display()),
            etcd.endpoints(),
            "if etcd runs with --client-cert-auth, that cert_file",
        ),
        (
            "other-ca",
            format!(
                ", tls: {{ ca_file: {}, cert_file: {}, key_file: {} }}",
                other.ca.display(),
                cert.display(),
                key.display()
            ),
            etcd.endpoints(),
            "invalid peer certificate",
        ),
        (
            "plain",
            String::new(),
            plain,
            "if etcd serves TLS, use https:// endpoints and store.etcd.tls",
        ),
    ] {
        let mut c = on_endpoints(&f, &endpoints, name, &tls);
        c.spawn();
        let code = c.wait_exit(Duration::from_secs(60));
        let log = std::fs::read_to_string(&c.log).unwrap_or_default();
        assert!(code.is_some_and(|c| c != 0), "{name} runs: {log}");
        assert!(log.contains(says), "{name}: {log}");
        assert!(!serving(&c), "{name}");
        eprintln!("{name}: {}", log.lines().last().unwrap_or(""));
    }
    assert!(
        etcd.ctl(&["get", "/t/leader", "--print-value-only"])
            .contains(&format!("127.0.0.1:{}", cs[1].port)),
        "the leader is still B"
    );
}
