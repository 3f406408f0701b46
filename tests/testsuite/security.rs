//! The coordinator under attack: host-bound tokens, unauthenticated floods, slowloris, TLS,
//! late outcomes, a full disk, a damaged store, reloads.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use drover_tests::coordinator::{Coordinator, token};
use drover_tests::host::Fleet;
use drover_tests::tls::TestCa;
use drover_tests::wait_for;
use serde_json::Value;

fn acquire_body(host: &str, commit: &str) -> String {
    format!(
        r#"{{"host":"{host}","environment":"test","service":"hello","version":"1.0","purpose":"deploy","commit":"{commit}"}}"#
    )
}

const HEARTBEAT: &str = r#"{"environment":"test","services":[]}"#;

/// A fleet pinning hello 1.0 and a coordinator (with `extra` config) that has read it.
fn started(extra: &str) -> (Fleet, Coordinator, String) {
    let f = Fleet::new();
    let commit = f.pin_raw("1.0", &"a".repeat(64));
    let c = Coordinator::start(f.dir.path(), extra);
    c.wait_commit(&commit);
    (f, c, commit)
}

/// Renews lease `id` with `token`: (status, body).
fn renew(c: &Coordinator, id: &str, token: &str) -> (u16, Value) {
    c.http(
        "POST",
        &format!("/v1/leases/{id}/renew"),
        Some(token),
        "",
        true,
    )
}

/// Releases lease `id` with `token` and the release `body`: (status, body).
fn release(c: &Coordinator, id: &str, token: &str, body: &str) -> (u16, Value) {
    c.http(
        "POST",
        &format!("/v1/leases/{id}/release"),
        Some(token),
        body,
        true,
    )
}

/// An empty heartbeat of `host` with `token`: (status, body).
fn heartbeat(c: &Coordinator, host: &str, token: &str) -> (u16, Value) {
    c.http(
        "POST",
        &format!("/v1/hosts/{host}/heartbeat"),
        Some(token),
        HEARTBEAT,
        true,
    )
}

fn metric(c: &Coordinator, name: &str) -> f64 {
    let (s, m) = c.http("GET", "/metrics", Some(&token("watcher")), "", false);
    assert_eq!(s, 200, "{m}");
    let text = m.as_str().unwrap_or("").to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .parse()
        .unwrap()
}

/// Bytes of the store: the database and its WAL.
fn store_size(c: &Coordinator) -> u64 {
    ["coordinator.db", "coordinator.db-wal"]
        .iter()
        .map(|f| {
            std::fs::metadata(c.dir.join(f))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn a_host_token_cannot_act_as_another_host() {
    let (_f, c, commit) = started("");
    let (web1, web2) = (token("web-01"), token("web-02"));
    // Its own heartbeat works; another host's is refused.
    let (s, b) = heartbeat(&c, "web-01", &web1);
    assert_eq!(s, 200, "{b}");
    let (s, b) = heartbeat(&c, "web-02", &web1);
    assert_eq!((s, b["kind"].as_str()), (403, Some("forbidden")), "{b}");
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("bound to host web-01"),
        "{b}"
    );
    // A lease for another host: refused.
    let (s, b) = c.http(
        "POST",
        "/v1/leases",
        Some(&web1),
        &acquire_body("web-02", &commit),
        true,
    );
    assert_eq!(s, 403, "{b}");
    // web-02 takes its lease; web-01 can neither renew nor release it (as a failure).
    let (s, b) = c.http(
        "POST",
        "/v1/leases",
        Some(&web2),
        &acquire_body("web-02", &commit),
        true,
    );
    assert_eq!(s, 200, "{b}");
    let id = b["lease"]["id"].as_str().unwrap().to_string();
    let (s, _) = renew(&c, &id, &web1);
    assert_eq!(s, 403);
    let (s, _) = release(
        &c,
        &id,
        &web1,
        r#"{"outcome":"failure","message":"spoofed"}"#,
    );
    assert_eq!(s, 403);
    // Nor stop it at a step gate.
    let (s, _) = c.http(
        "POST",
        &format!("/v1/leases/{id}/gate"),
        Some(&web1),
        r#"{"step":"10%"}"#,
        true,
    );
    assert_eq!(s, 403);
    let r = c.rollout("test", "1.0").unwrap();
    assert_eq!(r["state"], "RUNNING", "{r}");
    assert_eq!(r["failed"], serde_json::json!([]), "{r}");
    assert_eq!(r["leases"], 1, "{r}");
    // Every refusal is audited, and no viewer ever sees the lease id.
    let history = c.history();
    let denied: Vec<&Value> = history.iter().filter(|e| e["action"] == "denied").collect();
    assert_eq!(denied.len(), 5, "{denied:?}");
    assert!(denied.iter().all(|e| e["actor"] == "web-01"), "{denied:?}");
    let out = c.cli("watcher", &["history", "--json", "--limit", "10000"]);
    assert!(!out.stdout.contains(&id), "a viewer sees the lease id");
    let out = c.cli("watcher", &["status", "--json"]);
    assert!(!out.stdout.contains(&id), "a viewer sees the lease id");
    // The holder renews and releases.
    let (s, _) = renew(&c, &id, &web2);
    assert_eq!(s, 200);
    let (s, _) = release(&c, &id, &web2, r#"{"outcome":"success"}"#);
    assert_eq!(s, 200);
    // The fleet-wide token still acts as any host (small setups), with a warning at start.
    let (s, _) = heartbeat(&c, "web-02", &token("fleet"));
    assert_eq!(s, 200);
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(log.contains("may act as any host"), "{log}");
}

#[test]
fn an_unauthenticated_flood_leaves_the_store_unchanged() {
    let (_f, c, _) = started("");
    // Let the start-up writes settle.
    std::thread::sleep(Duration::from_secs(2));
    let audit_before = c.history().len();
    let size_before = store_size(&c);
    let port = c.port;
    let path = format!("/v1/hosts/{}/heartbeat", "x".repeat(8000));
    let start = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut answered = 0;
                for i in 0..750 {
                    let auth = if i % 2 == 0 {
                        vec!["Drover-Protocol: 1".to_string()]
                    } else {
                        vec![
                            "Drover-Protocol: 1".to_string(),
                            format!("Authorization: Bearer wrong-{t}-{i}"),
                        ]
                    };
                    if let Some((s, _)) =
                        drover_tests::http_request(port, "POST", &path, &auth, HEARTBEAT.as_bytes())
                    {
                        assert_eq!(s, 401);
                        answered += 1;
                    }
                }
                answered
            })
        })
        .collect();
    let answered: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let took = start.elapsed();
    let size_after = store_size(&c);
    eprintln!(
        "flood: {answered} unauthenticated requests with 8 KB paths in {took:?}; store {size_before} → {size_after} bytes"
    );
    assert!(answered >= 2900, "{answered}");
    assert_eq!(c.history().len(), audit_before, "nothing audited");
    assert_eq!(size_after, size_before, "the store did not grow");
    assert!(metric(&c, "drover_coordinator_unauthenticated_total") >= answered as f64);
    // A real client is still served.
    let (s, _) = heartbeat(&c, "web-01", &token("web-01"));
    assert_eq!(s, 200);
}

/// Slow clients from three loopback addresses: each opens `n` connections and sends a
/// request's headers one byte a second (slowloris). A separate process, as an attacker is.
fn slowloris(port: u16, n: usize) -> std::process::Child {
    let script = format!(
        r#"
import socket, time, sys
socks = []
for src in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
    for i in range({n}):
        try:
            s = socket.socket()
            s.bind((src, 0))
            s.settimeout(2)
            s.connect(("127.0.0.1", {port}))
            s.send(b"POST /v1/status HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        except OSError:
            pass
print(len(socks), flush=True)
while True:
    for s in list(socks):
        try:
            s.send(b"X")
        except OSError:
            socks.remove(s)
    time.sleep(1)
"#
    );
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs")
}

#[test]
fn slowloris_does_not_delay_a_heartbeat() {
    let f = Fleet::new();
    let commit = f.pin_raw("1.0", &"a".repeat(64));
    // systemd's default soft limit, and no higher hard limit to raise it to.
    let mut c = Coordinator::prepare(f.dir.path(), "");
    c.wrapper = vec!["prlimit".into(), "--nofile=1024:1024".into()];
    c.restart();
    c.wait_commit(&commit);
    let mut attacker = slowloris(c.port, 400);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(attacker.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    eprintln!(
        "slowloris: {} connections attempted, {} open",
        1200,
        line.trim()
    );
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t0 = Instant::now();
        let (s, b) = heartbeat(&c, "web-01", &token("web-01"));
        worst = worst.max(t0.elapsed());
        assert_eq!(s, 200, "{b}");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("slowloris: worst heartbeat latency {worst:?}");
    assert!(worst < Duration::from_secs(1), "{worst:?}");
    assert!(metric(&c, "drover_coordinator_connections_refused_total") > 0.0);
    let _ = attacker.kill();
    let _ = attacker.wait();
}

#[test]
fn the_fleet_runs_over_tls() {
    let f = Fleet::new();
    let ca = TestCa::new(&f.dir.path().join("tls"));
    let mut c = Coordinator::prepare(f.dir.path(), &ca.config());
    c.ca = Some(ca.ca.clone());
    c.restart();
    let built = f.hello("1.0", &[]);
    let commit = f.pin(&built);
    c.wait_commit(&commit);
    let hosts: Vec<_> = ["web-01", "web-02"]
        .iter()
        .map(|n| f.host_with(n, "test", &c.agent_config_as(n)))
        .collect();
    let agents: Vec<_> = hosts.iter().map(|h| h.spawn(&[])).collect();
    for h in &hosts {
        h.wait_current("1.0", Duration::from_secs(60));
    }
    wait_for("the rollout to succeed", Duration::from_secs(60), || {
        (c.state("test", "1.0").as_deref() == Some("SUCCESS")).then_some(())
    });
    drop(agents);
    // Without the CA the CLI refuses the certificate; plain HTTP gets no answer.
    let out = Command::new(drover_tests::bin("drover"))
        .args(["--url", &c.url(), "--token-file"])
        .arg(c.token_file("watcher"))
        .arg("status")
        .env_remove("DROVER_CA_FILE")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("unreachable"), "{err}");
    assert!(drover_tests::http_get(c.port, "/healthz").is_none_or(|(s, _)| s != 200));
    // DROVER_CA_FILE works as well as --ca-file.
    let out = Command::new(drover_tests::bin("drover"))
        .args(["--url", &c.url(), "--token-file"])
        .arg(c.token_file("watcher"))
        .arg("status")
        .env("DROVER_CA_FILE", &ca.ca)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A world-readable key is refused at start, saying which file and how to fix it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ca.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(drover_tests::bin("drover-coordinator"))
        .args(["check-config", "--config"])
        .arg(c.config())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err.contains("server.key") && err.contains("chmod 600"),
        "{err}"
    );
    // Plain HTTP to a non-loopback address is refused by the CLI unless --insecure.
    let out = Command::new(drover_tests::bin("drover"))
        .args(["--url", "http://192.0.2.1:7070", "--token-file"])
        .arg(c.token_file("watcher"))
        .arg("status")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("not loopback") && err.contains("--insecure"),
        "{err}"
    );
}

#[test]
fn a_late_failure_after_the_lease_expired_fails_the_rollout() {
    let (_f, c, commit) = started("lease_ttl: 2s\n");
    let agent = token("fleet");
    let (s, b) = c.http(
        "POST",
        "/v1/leases",
        Some(&agent),
        &acquire_body("h1", &commit),
        true,
    );
    assert_eq!(s, 200, "{b}");
    let id = b["lease"]["id"].as_str().unwrap().to_string();
    // Not renewed: it expires and its slot is given away.
    wait_for("the lease to expire", Duration::from_secs(20), || {
        (c.rollout("test", "1.0").unwrap()["leases"] == 0).then_some(())
    });
    let (s, b) = renew(&c, &id, &agent);
    assert_eq!((s, b["kind"].as_str()), (410, Some("lease_lost")), "{b}");
    // The host's failure arrives late: it counts (max_failures 0), the rollout fails.
    let (s, b) = release(
        &c,
        &id,
        &agent,
        r#"{"outcome":"failure","message":"health check failed"}"#,
    );
    assert_eq!(s, 200, "{b}");
    let r = c.rollout("test", "1.0").unwrap();
    assert_eq!(r["failed"], serde_json::json!(["h1"]), "{r}");
    assert!(
        matches!(
            r["state"].as_str(),
            Some("FAILED" | "ROLLING_BACK" | "ABORTED")
        ),
        "{r}"
    );
    assert!(
        c.history().iter().any(|e| e["detail"]
            .as_str()
            .unwrap_or("")
            .contains("after its lease expired")),
        "audited as late"
    );
}

fn store_cmd(args: &[&str], store: &Path, stdin: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(drover_tests::bin("drover-coordinator"));
    cmd.arg("store").args(args).arg("--store").arg(store);
    if let Some(i) = stdin {
        cmd.stdin(std::fs::File::open(i).unwrap());
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn a_truncated_or_damaged_store_refuses_to_start_and_can_be_recovered() {
    let f = Fleet::new();
    let commit = f.pin_raw("1.0", &"a".repeat(64));
    let mut c = Coordinator::start(f.dir.path(), "");
    c.wait_commit(&commit);
    let (s, _) = c.http(
        "POST",
        "/v1/leases",
        Some(&token("fleet")),
        &acquire_body("h1", &commit),
        true,
    );
    assert_eq!(s, 200);
    let audit = c.history().len();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(c.dir.join("coordinator.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the store is private");
    }
    // A clean stop folds the WAL into the database file.
    // SAFETY: kill(2) on the coordinator's pid.
    unsafe { libc::kill(c.pid().unwrap() as i32, libc::SIGTERM) };
    assert_eq!(c.wait_exit(Duration::from_secs(20)), Some(0));
    let db = c.dir.join("coordinator.db");
    let (code, out, err) = store_cmd(&["check"], &db, None);
    assert_eq!(code, 0, "{out}{err}");
    let good = std::fs::read(&db).unwrap();
    let wal = std::fs::read(c.dir.join("coordinator.db-wal")).ok();
    // Truncated to nothing: refused, naming the file and what to do.
    std::fs::write(&db, b"").unwrap();
    let _ = std::fs::remove_file(c.dir.join("coordinator.db-wal"));
    let _ = std::fs::remove_file(c.dir.join("coordinator.db-shm"));
    c.spawn();
    assert_ne!(c.wait_exit(Duration::from_secs(20)), Some(0));
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(log.contains("coordinator.db is empty (0 bytes)"), "{log}");
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0, "left as it was");
    // Garbage over its pages: refused too.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..] {
        *b = 0x5A;
    }
    std::fs::write(&db, &bad).unwrap();
    c.spawn();
    assert_ne!(c.wait_exit(Duration::from_secs(20)), Some(0));
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(
        log.contains("is damaged") && log.contains("store export"),
        "{log}"
    );
    let (code, out, _) = store_cmd(&["check"], &db, None);
    assert_eq!(code, 1, "{out}");
    // Recovery from the sound copy: export, import into a new file, start from it.
    std::fs::write(&db, &good).unwrap();
    if let Some(w) = &wal {
        std::fs::write(c.dir.join("coordinator.db-wal"), w).unwrap();
    }
    let dump = c.dir.join("dump.jsonl");
    let out = Command::new(drover_tests::bin("drover-coordinator"))
        .args(["store", "export", "--store"])
        .arg(&db)
        .stdout(std::fs::File::create(&dump).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(c.dir.join(format!("coordinator.db{suffix}")));
    }
    let (code, out, err) = store_cmd(&["import"], &db, Some(&dump));
    assert_eq!(code, 0, "{out}{err}");
    c.restart();
    assert!(c.history().len() >= audit, "every audit entry came back");
    assert_eq!(
        c.rollout("test", "1.0").unwrap()["leases"],
        1,
        "and the lease"
    );
}

fn big_heartbeat(services: usize) -> String {
    let s: Vec<String> = (0..services)
        .map(|i| {
            format!(
                r#"{{"service":"s{i}","healthy":true,"last_error":"{}"}}"#,
                "e".repeat(500)
            )
        })
        .collect();
    format!(r#"{{"environment":"test","services":[{}]}}"#, s.join(","))
}

#[test]
fn a_full_disk_answers_503_without_a_reload_storm_and_recovers() {
    let f = Fleet::new();
    let commit = f.pin_raw("1.0", &"a".repeat(64));
    let small = f.dir.path().join("small");
    let Some(_mnt) = drover_tests::Tmpfs::mount(&small, "4m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root); disk-full path not exercised");
        return;
    };
    let mut c = Coordinator::prepare(
        f.dir.path(),
        &format!("state_dir: {}\n", f.dir.path().join("state").display()),
    );
    let cfg = std::fs::read_to_string(c.config()).unwrap().replace(
        &format!("sqlite: {}", c.dir.join("coordinator.db").display()),
        &format!("sqlite: {}", small.join("coordinator.db").display()),
    );
    std::fs::write(c.config(), cfg).unwrap();
    c.restart();
    c.wait_commit(&commit);
    let agent = token("fleet");
    let (s, b) = c.http(
        "POST",
        "/v1/leases",
        Some(&agent),
        &acquire_body("h1", &commit),
        true,
    );
    assert_eq!(s, 200, "{b}");
    let lease = b["lease"]["id"].as_str().unwrap().to_string();
    // Fill the disk.
    let filler = small.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .output();
    // Writes until one fails: 503 `unavailable`.
    let mut refused = None;
    for i in 0..2000 {
        let (s, b) = c.http(
            "POST",
            &format!("/v1/hosts/n{i}/heartbeat"),
            Some(&agent),
            &big_heartbeat(40),
            true,
        );
        if s == 503 {
            refused = Some(b);
            break;
        }
        assert_eq!(s, 200, "{b}");
    }
    let b = refused.expect("a write failed on the full disk");
    assert_eq!(b["kind"], "unavailable", "{b}");
    // Read-only: changes get 503 at once, reads and renewals work, nothing reloads.
    let errors = metric(&c, "drover_coordinator_store_errors_total");
    for i in 0..200 {
        let (s, _) = c.http(
            "POST",
            &format!("/v1/hosts/m{i}/heartbeat"),
            Some(&agent),
            HEARTBEAT,
            true,
        );
        assert_eq!(s, 503);
    }
    assert_eq!(
        c.http("GET", "/v1/status", Some(&token("watcher")), "", true)
            .0,
        200
    );
    let (s, b) = renew(&c, &lease, &agent);
    assert_eq!(s, 200, "{b}");
    assert_eq!(metric(&c, "drover_coordinator_store_read_only"), 1.0);
    assert_eq!(
        metric(&c, "drover_coordinator_store_errors_total"),
        errors,
        "refused at once, not written (no reload storm)"
    );
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert_eq!(log.matches("store write failed").count(), 1, "{log}");
    // Space returns: it recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    wait_for(
        "the coordinator to write again",
        Duration::from_secs(60),
        || {
            let (s, _) = heartbeat(&c, "back", &agent);
            (s == 200).then_some(())
        },
    );
    assert_eq!(metric(&c, "drover_coordinator_store_read_only"), 0.0);
    // The lease held all along, its expiry kept.
    let (s, _) = renew(&c, &lease, &agent);
    assert_eq!(s, 200);
    c.kill();
}

#[test]
fn enroll_and_sighup_add_a_host_without_dropping_leases() {
    let (_f, c, commit) = started("");
    let (s, b) = c.http(
        "POST",
        "/v1/leases",
        Some(&token("web-01")),
        &acquire_body("web-01", &commit),
        true,
    );
    assert_eq!(s, 200, "{b}");
    let id = b["lease"]["id"].as_str().unwrap().to_string();
    let out = Command::new(drover_tests::bin("drover-coordinator"))
        .args(["enroll", "web-09"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let (secret, line) = (lines[0], lines[1]);
    assert_eq!(secret.len(), 64, "{text}");
    assert!(
        line.contains("host: web-09") && !line.contains(secret),
        "{text}"
    );
    let (s, _) = heartbeat(&c, "web-09", secret);
    assert_eq!(s, 401, "not known before the reload");
    let mut cfg = std::fs::read_to_string(c.config()).unwrap();
    cfg.push_str(line);
    cfg.push('\n');
    std::fs::write(c.config(), cfg).unwrap();
    // SAFETY: kill(2) on the coordinator's pid.
    unsafe { libc::kill(c.pid().unwrap() as i32, libc::SIGHUP) };
    wait_for("the reload", Duration::from_secs(10), || {
        let (s, _) = heartbeat(&c, "web-09", secret);
        (s == 200).then_some(())
    });
    let (s, _) = heartbeat(&c, "web-01", secret);
    assert_eq!(s, 403, "bound to web-09");
    // The lease taken before the reload is still held.
    let (s, b) = renew(&c, &id, &token("web-01"));
    assert_eq!(s, 200, "{b}");
    // A broken config on reload keeps the running tokens.
    std::fs::write(c.config(), "nonsense: [").unwrap();
    unsafe { libc::kill(c.pid().unwrap() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    let (s, _) = heartbeat(&c, "web-09", secret);
    assert_eq!(s, 200);
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(log.contains("keeping the running one"), "{log}");
}

#[test]
fn a_token_over_its_rate_gets_429_and_cannot_flood_the_audit() {
    let (_f, c, _) = started("limits: { requests_per_second: 1, burst: 40 }\n");
    let audit = c.history().len();
    // web-01 asks again and again to act as web-02: a few denials are audited, then 429.
    let mut codes = Vec::new();
    for _ in 0..100 {
        let (s, b) = heartbeat(&c, "web-02", &token("web-01"));
        if s == 429 {
            assert_eq!(b["kind"], "rate_limited", "{b}");
            assert!(b["retry_after_ms"].as_u64().unwrap() >= 100, "{b}");
        }
        codes.push(s);
    }
    // The burst (40) and about one a second more.
    let forbidden = codes.iter().filter(|s| **s == 403).count();
    assert!((40..=50).contains(&forbidden), "{codes:?}");
    assert!(
        codes.iter().filter(|s| **s == 429).count() >= 50,
        "{codes:?}"
    );
    let denied = c.history().len() - audit;
    assert_eq!(denied, forbidden, "only the answered denials are audited");
    // Other tokens have their own budget.
    let (s, _) = heartbeat(&c, "web-02", &token("web-02"));
    assert_eq!(s, 200);
    assert!(metric(&c, "drover_coordinator_rate_limited_total") >= 50.0);
}
