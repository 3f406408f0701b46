//! Crash safety: the agent is killed (SIGKILL, through a failpoint) at every phase of a
//! deploy, several times each; a restart must converge to exactly one complete release
//! running. Also: repeated crashes are given up, damaged state is rebuilt from disk.

use drover_tests::host::{Fleet, Host};

/// Asserts the host runs exactly `version`, from a complete release, once.
fn converged(h: &Host, version: &str) {
    let pids = h.app_pids();
    assert_eq!(pids.len(), 1, "exactly one app process: {pids:?}");
    assert_eq!(h.version().as_deref(), Some(version));
    assert_eq!(h.current_dir().as_deref(), Some(version));
    let releases = h.releases();
    assert!(
        !releases.iter().any(|r| r.ends_with(".tmp")),
        "{releases:?}"
    );
    assert!(
        h.root()
            .join("releases")
            .join(version)
            .join(".drover-release.json")
            .is_file()
    );
    let st = h.hello();
    assert_eq!(st["current"], version);
    assert!(st["deploying"].is_null(), "{st}");
    assert_eq!(
        std::fs::read_dir(h.state.join("cache"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
            .count(),
        0
    );
}

fn killed_at(h: &Host, point: &str) {
    let spec = format!("{point}=kill");
    let out = h.once_with(&[("DROVER_FAILPOINTS", &spec)]);
    assert_eq!(out.code, -1, "killed by SIGKILL at {point}: {}", out.all());
}

#[test]
fn a_kill_at_any_phase_of_a_deploy_recovers() {
    for point in [
        "download", "fetch", "stage", "stop", "switch", "start", "check",
    ] {
        let f = Fleet::new();
        let h = f.host("h1");
        f.pin(&f.hello("1.0.0", &[]));
        assert_eq!(h.once().code, 0);
        for round in 1..=3 {
            let version = format!("1.{round}.0");
            f.pin(&f.hello(&version, &[]));
            killed_at(&h, point);
            let out = h.once();
            assert_eq!(out.code, 0, "{point} round {round}: {}", out.all());
            converged(&h, &version);
            assert!(
                h.phases().contains(&format!("{version}:recover")),
                "{point}: recovery is recorded"
            );
        }
    }
}

#[test]
fn a_kill_during_rollback_finishes_the_rollback() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    assert_eq!(h.once().code, 0);
    for round in 1..=3 {
        let version = format!("2.{round}.0");
        f.pin(&f.hello(&version, &["FAIL_HEALTH=1"]));
        killed_at(&h, "rollback");
        let out = h.once();
        assert_eq!(out.code, 1, "{}", out.all());
        assert!(out.stdout.contains("not retried"), "{}", out.stdout);
        converged(&h, "1.0.0");
        assert_eq!(h.hello()["failed"]["version"], version.as_str());
    }
}

#[test]
fn the_daemon_recovers_without_git() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    assert_eq!(h.once().code, 0);
    f.pin(&f.hello("2.0.0", &[]));
    killed_at(&h, "start");
    // The repo disappears: recovery uses what the state file recorded.
    std::fs::rename(&f.repo.dir, f.dir.path().join("fleet-gone")).unwrap();
    let agent = h.spawn(&[]);
    h.wait_current("2.0.0", std::time::Duration::from_secs(30));
    converged(&h, "2.0.0");
    drop(agent);
}

#[test]
fn a_deploy_that_keeps_crashing_the_agent_is_given_up() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    assert_eq!(h.once().code, 0);
    f.pin(&f.hello("2.0.0", &[]));
    for _ in 0..3 {
        killed_at(&h, "check");
    }
    let out = h.once_with(&[("DROVER_FAILPOINTS", "check=kill")]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout
            .contains("the agent stopped 3 times during this deploy"),
        "{}",
        out.stdout
    );
    converged(&h, "1.0.0");
    assert_eq!(h.hello()["failed"]["version"], "2.0.0");
}

#[test]
fn a_damaged_state_file_is_rebuilt_from_the_releases_on_disk() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    assert_eq!(h.once().code, 0);
    f.pin(&f.hello("2.0.0", &[]));
    assert_eq!(h.once().code, 0);
    let pid = h.app_pids()[0];
    let file = h.state.join("services/hello.json");
    std::fs::write(&file, b"{\"format\": 1, \"service\": \"hel").unwrap();
    let st = h.hello();
    let err = st["error"].as_str().unwrap();
    assert!(err.contains("is damaged"), "{err}");
    assert!(err.contains("rebuilt from the releases on disk"), "{err}");
    let out = h.once();
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stderr.contains("state file was damaged; rebuilt it"),
        "{}",
        out.stderr
    );
    let st = h.hello();
    assert_eq!(st["current"], "2.0.0");
    assert_eq!(st["previous"], "1.0.0");
    assert_eq!(h.app_pids(), vec![pid], "the running app was left alone");
    let kept: Vec<_> = std::fs::read_dir(h.state.join("services"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "the damaged file is kept");
}

#[test]
fn a_deploy_resumed_after_a_kill_keeps_its_lease_alive() {
    use std::time::Duration;
    let f = Fleet::new();
    // Leases expire 4 s after their last renewal; the resumed health check takes longer.
    let c = drover_tests::coordinator::Coordinator::start(f.dir.path(), "lease_ttl: 4s\n");
    let outage = f.dir.path().join("dependency-down");
    f.repo.write(
        "services/hello.yaml",
        &drover_tests::host::SERVICE.replace("  timeout: 5s\n", "  timeout: 30s\n"),
    );
    f.pin(&f.hello("1.0.0", &[]));
    let h = f.host_with("web-01", "test", &c.agent_config());
    assert_eq!(h.once().code, 0);
    f.pin(&f.hello("2.0.0", &[&format!("FAIL_IF_EXISTS={}", outage.display())]));
    std::fs::write(&outage, "").unwrap();
    // Killed with the new version started and its lease held, before the health check.
    killed_at(&h, "check");
    let fixed = {
        let outage = outage.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(9));
            std::fs::remove_file(&outage).unwrap();
        })
    };
    let out = h.once();
    fixed.join().unwrap();
    assert_eq!(out.code, 0, "{}", out.all());
    // The restart resumed the deploy: a health check that waited for the outage to end.
    assert!(
        out.stdout.contains("hello 2.0.0: check ok"),
        "{}",
        out.stdout
    );
    assert_eq!(h.current().as_deref(), Some("2.0.0"));
    let hist = c.history();
    let expired: Vec<_> = hist
        .iter()
        .filter(|e| e["action"] == "lease_expired")
        .collect();
    assert!(
        expired.is_empty(),
        "the resumed deploy renewed its lease: {expired:?}"
    );
    assert!(hist.iter().any(|e| e["action"] == "lease_released"
        && e["subject"] == "test/hello/2.0.0"
        && e["detail"] == "success"));
}
