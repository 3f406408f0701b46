//! Several coordinators on a real 3-member etcd cluster: one leads, the others stand by; the
//! agents know them all. Killing the leader, or an etcd member, in the middle of a rollout
//! loses no lease, approval or outcome, and never lets more than `max_parallel` hosts deploy.

use std::time::Duration;

use drover_tests::coordinator::Coordinator;
use drover_tests::etcd::Etcd;
use drover_tests::host::{Fleet, Host, Running};
use drover_tests::wait_for;

use crate::coordinator::{max_overlap, wait_all, windows};

/// A coordinator named `name` on `etcd`, under prefix `/t`, its lead lasting 2 s.
fn on_etcd(f: &Fleet, etcd: &Etcd, name: &str) -> Coordinator {
    let state = f.dir.path().join(name).join("state");
    let store = format!(
        "store: {{ etcd: {{ endpoints: [{}], prefix: /t, max_txn_ops: 1024, leader_ttl: 2s }} }}\nstate_dir: {}\n",
        etcd.endpoints().join(", "),
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

#[test]
fn the_leader_or_an_etcd_member_killed_mid_rollout_loses_nothing() {
    let f = Fleet::new();
    let mut etcd = Etcd::start(f.dir.path());
    let mut a = on_etcd(&f, &etcd, "coord-a");
    let mut b = on_etcd(&f, &etcd, "coord-b");
    a.restart();
    // B stands by: it does not listen while A leads.
    b.spawn();
    wait_for("b to stand by", Duration::from_secs(20), || {
        std::fs::read_to_string(&b.log)
            .ok()
            .filter(|l| l.contains("standing by"))
    });
    assert!(!serving(&b));
    // The leader key names A.
    assert!(
        etcd.ctl(&["get", "/t/leader", "--print-value-only"])
            .contains(&format!("127.0.0.1:{}", a.port))
    );

    // Each deploy takes a second at least (the old release's before_stop sleeps).
    f.repo.write(
        "services/hello.yaml",
        &drover_tests::host::SERVICE.replace("before_stop: bin/drain", "before_stop: bin/slow"),
    );
    let policy = "rollout: { max_parallel: 2 }\n";
    f.pin_env("test", policy, &f.hello("1.0.0", &[]));
    let config = agent_config(&[&a, &b]);
    let names: Vec<String> = (1..=6).map(|i| format!("h{i}")).collect();
    let hosts: Vec<Host> = names
        .iter()
        .map(|n| f.host_with(n, "test", &config))
        .collect();
    let _agents: Vec<Running> = hosts.iter().map(|h| h.spawn(&[])).collect();
    wait_all(&hosts, "1.0.0", Duration::from_secs(120));

    // 2.0.0: once the first hosts are deploying, A dies (SIGKILL) and so does an etcd member.
    f.pin_env("test", policy, &f.hello("2.0.0", &[]));
    wait_for("a host to deploy 2.0.0", Duration::from_secs(60), || {
        hosts
            .iter()
            .any(|h| {
                h.events()
                    .iter()
                    .any(|e| e["version"] == "2.0.0" && e["phase"] == "stop")
            })
            .then_some(())
    });
    a.kill();
    etcd.kill(0);
    // B takes over within the lead's TTL, on the two members left.
    let limit = std::time::Instant::now() + Duration::from_secs(30);
    while !serving(&b) {
        assert!(
            std::time::Instant::now() < limit,
            "b does not lead:\n{}",
            std::fs::read_to_string(&b.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_all(&hosts, "2.0.0", Duration::from_secs(120));
    etcd.restart(0);

    // From the agents' own logs: never more than 2 hosts between stop and healthy.
    for v in ["1.0.0", "2.0.0"] {
        let w = windows(&hosts, v);
        assert_eq!(w.len(), 6, "{v}: every host deployed once: {w:?}");
        assert!(max_overlap(&w) <= 2, "{v}: {w:?}");
    }
    // From the audit (B has everything A wrote): each host got one lease, every outcome
    // counted, the rollout succeeded.
    wait_for("2.0.0 to succeed", Duration::from_secs(30), || {
        (b.state("test", "2.0.0").as_deref() == Some("SUCCESS")).then_some(())
    });
    let hist = b.history();
    for (action, n) in [("lease_granted", 6), ("lease_released", 6)] {
        let mut hosts: Vec<&str> = hist
            .iter()
            .filter(|e| e["action"] == action && e["subject"] == "test/hello/2.0.0")
            .map(|e| e["actor"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(hosts.len(), n, "{action}: {hist:?}");
        hosts.sort_unstable();
        hosts.dedup();
        assert_eq!(hosts.len(), n, "{action} once per host: {hist:?}");
    }

    // A comes back as a standby; B goes on leading.
    a.spawn();
    wait_for("a to stand by", Duration::from_secs(20), || {
        std::fs::read_to_string(&a.log)
            .ok()
            .filter(|l| l.matches("standing by").count() >= 1)
    });
    assert!(!serving(&a) && serving(&b));
    // What B wrote is in etcd, where A will read it when it leads again.
    let rollouts = etcd.ctl(&["get", "/t/rollouts/", "--prefix", "--print-value-only"]);
    assert!(rollouts.contains("\"SUCCESS\""), "{rollouts}");

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
