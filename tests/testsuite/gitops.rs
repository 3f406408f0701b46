//! Git as the coordinator's source of truth, with real agents: policy from the commit, `git
//! revert` as a rollback, a return to a superseded version, `drover retry` and `drover
//! rollback` (with their roles), a commit that does not validate, and SUCCESS only once every
//! host has reported the version healthy.

use std::time::Duration;

use drover_tests::coordinator::{Coordinator, token};
use drover_tests::host::{Fleet, Outage};
use drover_tests::wait_for;
use serde_json::Value;

use crate::coordinator::{start_hosts, wait_all};

const APPROVAL: &str = "approval: { required: true, approvers: [release-managers], timeout: 1h }\n";

fn wait_state(c: &Coordinator, env: &str, version: &str, state: &str) {
    wait_for(
        &format!("{env}/hello/{version} to be {state}"),
        Duration::from_secs(60),
        || (c.state(env, version).as_deref() == Some(state)).then_some(()),
    );
}

fn approve(c: &Coordinator, env: &str, version: &str) {
    wait_state(c, env, version, "APPROVAL_REQUIRED");
    let out = c.cli("alice", &["approve", env, "hello", version]);
    assert_eq!(out.code, 0, "{}", out.all());
}

/// Audit entries of `action` (and, if given, of subject `subject`).
fn entries<'a>(hist: &'a [Value], action: &str, subject: Option<&str>) -> Vec<&'a Value> {
    hist.iter()
        .filter(|e| e["action"] == action && subject.is_none_or(|s| e["subject"] == s))
        .collect()
}

#[test]
fn git_revert_brings_the_fleet_back_without_approval_under_max_parallel() {
    let f = Fleet::new();
    // Stopped agents must not go stale while they sit out part of the test.
    let c = Coordinator::start(f.dir.path(), "heartbeat_interval: 60s\n");
    let policy = format!("rollout: {{ max_parallel: 1 }}\n{APPROVAL}");
    f.pin_env("test", &policy, &f.hello("1.0.0", &[]));
    approve(&c, "test", "1.0.0");
    let (hosts, mut agents) = start_hosts(&f, &c, &["h1", "h2", "h3", "h4", "h5"], "test");
    wait_all(&hosts, "1.0.0", Duration::from_secs(120));
    wait_state(&c, "test", "1.0.0", "SUCCESS");
    // h4 and h5 sit out 2.0.0: they never fetch it.
    for a in agents.split_off(3) {
        assert_eq!(a.stop(), 0);
    }
    let bad = f.pin_env("test", &policy, &f.hello("2.0.0", &[]));
    approve(&c, "test", "2.0.0");
    wait_all(&hosts[..3], "2.0.0", Duration::from_secs(120));
    assert_eq!(c.state("test", "2.0.0").as_deref(), Some("RUNNING"));

    // `git revert` of the promotion: back to 1.0.0, no approval, one host at a time.
    let outage = Outage::watch(hosts.iter().map(|h| h.port).collect());
    let rev = f.repo.revert(&bad);
    c.wait_commit(&rev);
    let two = c.rollout("test", "2.0.0").unwrap();
    assert_eq!(two["state"], "ABORTED", "{two}");
    assert!(
        two["reason"]
            .as_str()
            .unwrap()
            .starts_with("superseded by 1.0.0"),
        "{two}"
    );
    let back = c.rollout("test", "1.0.0").unwrap();
    assert_eq!(back["kind"], "rollback", "{back}");
    assert!(back["decision"].is_null(), "no approval: {back}");
    // A host that has not fetched the revert asks for 2.0.0 and gets no lease.
    let (status, body) = c.http(
        "POST",
        "/v1/leases",
        Some(&token("fleet")),
        &format!(
            r#"{{"host":"h4","environment":"test","service":"hello","version":"2.0.0","purpose":"deploy","commit":"{bad}"}}"#
        ),
        true,
    );
    assert_eq!(
        (status, body["reason"].as_str()),
        (409, Some("stale")),
        "{body}"
    );
    wait_all(&hosts[..3], "1.0.0", Duration::from_secs(120));
    // h4 and h5 come back: they read the revert and never touch 2.0.0.
    let _late: Vec<_> = hosts[3..].iter().map(|h| h.spawn(&[])).collect();
    wait_state(&c, "test", "1.0.0", "SUCCESS");
    let most = outage.most_down();
    eprintln!("most hosts down at once during the revert: {most}");
    // At least one (the watcher sees a host go down), at most max_parallel.
    assert_eq!(most, 1, "hosts down at once (max_parallel 1)");
    for h in &hosts[3..] {
        assert!(
            !h.phases().iter().any(|p| p.starts_with("2.0.0:")),
            "{} touched 2.0.0: {:?}",
            h.name,
            h.phases()
        );
        assert_eq!(h.version().as_deref(), Some("1.0.0"));
    }
    // From the audit: no lease for 2.0.0 once the coordinator had read the revert.
    let hist = c.history();
    let read = hist
        .iter()
        .find(|e| e["action"] == "desired_state" && e["detail"].as_str().unwrap().contains(&rev))
        .expect("the revert was read")["seq"]
        .as_u64()
        .unwrap();
    let late: Vec<&Value> = entries(&hist, "lease_granted", Some("test/hello/2.0.0"))
        .into_iter()
        .filter(|e| e["seq"].as_u64().unwrap() > read)
        .collect();
    assert!(late.is_empty(), "leases for the reverted version: {late:?}");
    assert!(entries(&hist, "approve", Some("test/hello/1.0.0")).len() == 1);
}

#[test]
fn a_return_to_a_superseded_version_can_be_approved_and_deployed() {
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "");
    f.pin_env("test", APPROVAL, &f.hello("1.0.0", &[]));
    approve(&c, "test", "1.0.0");
    let (hosts, _agents) = start_hosts(&f, &c, &["h1", "h2"], "test");
    wait_all(&hosts, "1.0.0", Duration::from_secs(60));
    f.pin_env("test", APPROVAL, &f.hello("2.0.0", &[]));
    wait_state(&c, "test", "2.0.0", "APPROVAL_REQUIRED");
    let three = f.pin_env("test", APPROVAL, &f.hello("3.0.0", &[]));
    wait_state(&c, "test", "2.0.0", "ABORTED");
    // Undo 3.0.0: Git asks for 2.0.0 again, a version never deployed here.
    let rev = f.repo.revert(&three);
    c.wait_commit(&rev);
    approve(&c, "test", "2.0.0");
    wait_all(&hosts, "2.0.0", Duration::from_secs(60));
    let twos: Vec<Value> = c.status()["rollouts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["version"] == "2.0.0")
        .cloned()
        .collect();
    assert_eq!(twos.len(), 2, "history keeps both: {twos:?}");
    assert_eq!(twos[0]["state"], "ABORTED");
    assert_ne!(twos[0]["commit"], twos[1]["commit"]);
    assert_eq!(twos[1]["decision"]["by"], "alice");
}

#[test]
fn retry_after_an_environmental_failure_is_fixed() {
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "");
    let policy = "rollout: { max_parallel: 1, max_failures: 0 }\n";
    f.pin_env("test", policy, &f.hello("1.0.0", &[]));
    let (hosts, _agents) = start_hosts(&f, &c, &["h1", "h2"], "test");
    wait_all(&hosts, "1.0.0", Duration::from_secs(60));
    // 2.0.0 depends on something that is down: its health check fails.
    let outage = f.dir.path().join("database-down");
    std::fs::write(&outage, "").unwrap();
    let fail_if = format!("FAIL_IF_EXISTS={}", outage.display());
    f.pin_env("test", policy, &f.hello("2.0.0", &[&fail_if]));
    wait_state(&c, "test", "2.0.0", "ABORTED");
    for h in &hosts {
        wait_for("the host to give 2.0.0 up", Duration::from_secs(60), || {
            (h.hello()["failed"]["version"] == "2.0.0").then_some(())
        });
        assert_eq!(h.version().as_deref(), Some("1.0.0"));
    }
    // A viewer may not retry; the denial is audited.
    let out = c.cli("watcher", &["retry", "test", "hello"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stderr.contains("forbidden") || out.stderr.contains("role"),
        "{}",
        out.stderr
    );
    let hist = c.history();
    assert!(
        entries(&hist, "denied", None)
            .iter()
            .any(|e| e["actor"] == "watcher"),
        "{hist:?}"
    );
    // The outage is fixed; an operator retries.
    std::fs::remove_file(&outage).unwrap();
    let out = c.cli("ops", &["retry", "test", "hello"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("attempt 2"), "{}", out.stdout);
    wait_all(&hosts, "2.0.0", Duration::from_secs(60));
    wait_state(&c, "test", "2.0.0", "SUCCESS");
    let r = c.rollout("test", "2.0.0").unwrap();
    assert_eq!(r["attempt"], 2, "{r}");
    assert!(
        r["trigger"].as_str().unwrap().contains("retry by ops"),
        "{r}"
    );
}

#[test]
fn rollback_by_a_responder_holds_until_a_new_commit_and_others_are_refused() {
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "");
    let policy = "rollout: { max_parallel: 1 }\n";
    f.pin_env("test", policy, &f.hello("1.0.0", &[]));
    let (hosts, _agents) = start_hosts(&f, &c, &["h1", "h2"], "test");
    wait_all(&hosts, "1.0.0", Duration::from_secs(60));
    wait_state(&c, "test", "1.0.0", "SUCCESS");
    f.pin_env("test", policy, &f.hello("2.0.0", &[]));
    wait_all(&hosts, "2.0.0", Duration::from_secs(60));
    wait_state(&c, "test", "2.0.0", "SUCCESS");
    // Approvers, viewers and agents may not roll back: 403, audited.
    for who in ["bob", "watcher", "fleet"] {
        let out = c.cli(who, &["rollback", "test", "hello"]);
        assert_eq!(out.code, 1, "{who}: {}", out.all());
    }
    let denied: Vec<String> = entries(&c.history(), "denied", None)
        .iter()
        .map(|e| e["actor"].as_str().unwrap().to_string())
        .collect();
    for who in ["bob", "watcher", "fleet"] {
        assert!(denied.iter().any(|d| d == who), "{who} in {denied:?}");
    }
    // On call rolls back: every host goes to 1.0.0, one at a time, no approval.
    let outage = Outage::watch(hosts.iter().map(|h| h.port).collect());
    let out = c.cli("pager", &["rollback", "test", "hello"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains("test/hello/1.0.0 RUNNING"),
        "{}",
        out.stdout
    );
    for h in &hosts {
        wait_for("the host back on 1.0.0", Duration::from_secs(60), || {
            (h.version().as_deref() == Some("1.0.0") && h.hello()["deploying"].is_null())
                .then_some(())
        });
    }
    assert_eq!(outage.most_down(), 1, "hosts down at once (max_parallel 1)");
    let out = c.cli("watcher", &["status"]);
    assert!(
        out.stdout
            .contains("rolled back from 2.0.0 to 1.0.0 by pager")
            && out.stdout.contains("Git still asks for 2.0.0"),
        "{}",
        out.stdout
    );
    // The agents do not redeploy 2.0.0 while the rollback holds.
    let deploys_of_two =
        |h: &drover_tests::host::Host| h.phases().iter().filter(|p| *p == "2.0.0:stop").count();
    let before: Vec<usize> = hosts.iter().map(deploys_of_two).collect();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(hosts.iter().map(deploys_of_two).collect::<Vec<_>>(), before);
    // A commit of a new version ends the rollback.
    f.pin_env("test", policy, &f.hello("3.0.0", &[]));
    wait_all(&hosts, "3.0.0", Duration::from_secs(60));
    assert!(c.status()["overrides"].as_array().unwrap().is_empty());
    let hist = c.history();
    assert_eq!(entries(&hist, "rollback", None).len(), 1);
    assert_eq!(entries(&hist, "override_ended", None).len(), 1);
}

#[test]
fn an_invalid_commit_moves_nothing_and_status_says_why() {
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "");
    let v1 = f.hello("1.0.0", &[]);
    f.pin_env("test", "", &v1);
    let (hosts, _agents) = start_hosts(&f, &c, &["h1"], "test");
    wait_all(&hosts, "1.0.0", Duration::from_secs(60));
    let v2 = f.hello("2.0.0", &[]);
    f.repo.write(
        "environments/test.yaml",
        &format!(
            "environment: test\nrollot: {{ max_parallel: 5 }}\nservices:\n  hello: {{ version: 2.0.0, sha256: {} }}\n",
            v2.sha256
        ),
    );
    let bad = f.repo.commit("a typo");
    wait_for("the commit to be refused", Duration::from_secs(30), || {
        (c.status()["refused"]["commit"] == bad.as_str()).then_some(())
    });
    let s = c.status();
    let problems = s["refused"]["problems"].to_string();
    assert!(
        problems.contains("environments/test.yaml:2:1") && problems.contains("rollot"),
        "{problems}"
    );
    assert!(c.rollout("test", "2.0.0").is_none(), "nothing moves");
    let out = c.cli("watcher", &["status"]);
    assert!(out.stdout.contains("REFUSED commit"), "{}", out.stdout);
    assert!(out.stdout.contains("rollot"), "{}", out.stdout);
    assert!(
        entries(&c.history(), "commit_refused", None)
            .iter()
            .any(|e| e["detail"].as_str().unwrap().contains("rollot"))
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(hosts[0].version().as_deref(), Some("1.0.0"));
    // Fixed: it moves.
    f.pin_env("test", "", &v2);
    wait_all(&hosts, "2.0.0", Duration::from_secs(60));
    assert!(c.status()["refused"].is_null());
}

#[test]
fn success_comes_only_after_every_host_reported_the_version_healthy() {
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "");
    let policy = "rollout: { max_parallel: 2 }\n";
    f.pin_env("test", policy, &f.hello("1.0.0", &[]));
    let names = ["host-1", "host-2", "host-3", "host-4", "host-5"];
    let (hosts, _agents) = start_hosts(&f, &c, &names, "test");
    wait_all(&hosts, "1.0.0", Duration::from_secs(120));
    f.pin_env("test", policy, &f.hello("2.0.0", &[]));
    wait_all(&hosts, "2.0.0", Duration::from_secs(120));
    wait_state(&c, "test", "2.0.0", "SUCCESS");
    let r = c.rollout("test", "2.0.0").unwrap();
    assert_eq!(r["reason"], "5 host(s) run it healthy", "{r}");
    let hist = c.history();
    let subject = Some("test/hello/2.0.0");
    let success = entries(&hist, "transition", subject)
        .into_iter()
        .find(|e| {
            e["detail"]
                .as_str()
                .unwrap()
                .starts_with("VERIFYING → SUCCESS")
        })
        .expect("a SUCCESS transition")["seq"]
        .as_u64()
        .unwrap();
    for h in names {
        let released = entries(&hist, "lease_released", subject)
            .into_iter()
            .find(|e| e["actor"] == h)
            .unwrap_or_else(|| panic!("{h} released"))["seq"]
            .as_u64()
            .unwrap();
        let verified = entries(&hist, "verified", subject)
            .into_iter()
            .find(|e| e["actor"] == h)
            .unwrap_or_else(|| panic!("{h} verified: {hist:?}"))["seq"]
            .as_u64()
            .unwrap();
        assert!(released < verified, "{h}: verified before its release");
        assert!(
            verified < success,
            "{h}: SUCCESS before its healthy heartbeat"
        );
    }
}
