//! Pipelines with real agents and a real coordinator: freeze windows hold new rollouts (not
//! rollbacks) until they end or an admin lets one through, and a gate after the first batch
//! holds the rest of the fleet until approved.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_tests::coordinator::Coordinator;
use drover_tests::host::Fleet;
use drover_tests::wait_for;

use crate::coordinator::{start_hosts, wait_all};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `secs` since the epoch in RFC 3339 UTC, as `date` writes it.
fn rfc3339(secs: u64) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date runs");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// An environment policy frozen from a minute ago until `until` (seconds since the epoch).
fn frozen_until(until: u64) -> String {
    format!(
        "rollout: {{ max_parallel: 2 }}\nfreeze:\n  - {{ from: {}, to: {} }}\n  - {{ cron: \"0 18 * * FRI\", duration: 62h, timezone: Europe/Berlin }}\n",
        rfc3339(unix_now() - 60),
        rfc3339(until)
    )
}

#[test]
fn a_freeze_holds_new_rollouts_lets_rollbacks_through_and_ends() {
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "");
    let open = "rollout: { max_parallel: 2 }\n";
    f.pin_env("prod", open, &f.hello("1.0.0", &[]));
    let (hosts, _agents) = start_hosts(&f, &c, &["p1", "p2"], "prod");
    wait_all(&hosts, "1.0.0", Duration::from_secs(120));
    f.pin_env("prod", open, &f.hello("2.0.0", &[]));
    wait_all(&hosts, "2.0.0", Duration::from_secs(120));
    wait_for("2.0.0 to succeed", Duration::from_secs(60), || {
        (c.state("prod", "2.0.0").as_deref() == Some("SUCCESS")).then_some(())
    });

    // A long freeze: 3.0.0 waits, it is not aborted; the agents and status say until when.
    let long = frozen_until(unix_now() + 3600);
    f.pin_env("prod", &long, &f.hello("3.0.0", &[]));
    for h in &hosts {
        wait_for(
            "the agent to be told prod is frozen",
            Duration::from_secs(60),
            || {
                h.hello()["last_error"]
                    .as_str()
                    .filter(|e| e.contains("frozen") && e.contains("prod is frozen until"))
                    .map(str::to_string)
            },
        );
    }
    assert_eq!(c.state("prod", "3.0.0").as_deref(), Some("PENDING"));
    let out = c.cli("watcher", &["status"]);
    assert!(out.stdout.contains("frozen until"), "{}", out.all());
    for h in &hosts {
        assert_eq!(h.version().as_deref(), Some("2.0.0"));
        assert!(!h.phases().iter().any(|p| p == "3.0.0:stop"), "{}", h.name);
    }

    // A git revert to 1.0.0 during the freeze is a rollback: it goes through.
    f.pin_env("prod", &long, &f.hello("1.0.0", &[]));
    wait_all(&hosts, "1.0.0", Duration::from_secs(120));
    assert_eq!(
        c.rollout("prod", "1.0.0").unwrap()["kind"].as_str(),
        Some("rollback")
    );

    // An approver may not let a rollout through; an admin may, for that one rollout.
    f.pin_env("prod", &long, &f.hello("3.0.0", &[]));
    wait_for("3.0.0 to wait", Duration::from_secs(60), || {
        (c.state("prod", "3.0.0").as_deref() == Some("PENDING")).then_some(())
    });
    let out = c.cli(
        "alice",
        &["approve", "--during-freeze", "prod", "hello", "3.0.0"],
    );
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("for admins"), "{}", out.stderr);
    let out = c.cli(
        "root",
        &["approve", "--during-freeze", "prod", "hello", "3.0.0"],
    );
    assert_eq!(out.code, 0, "{}", out.all());
    wait_all(&hosts, "3.0.0", Duration::from_secs(120));
    let hist = c.history();
    assert!(
        hist.iter()
            .any(|e| e["action"] == "freeze_lifted" && e["actor"] == "root"),
        "{hist:?}"
    );

    // A short freeze holds 4.0.0 and lets it go when it ends.
    let end = unix_now() + 12;
    f.pin_env("prod", &frozen_until(end), &f.hello("4.0.0", &[]));
    wait_for(
        "4.0.0 to wait for the freeze",
        Duration::from_secs(30),
        || (c.state("prod", "4.0.0").as_deref() == Some("PENDING")).then_some(()),
    );
    wait_all(&hosts, "4.0.0", Duration::from_secs(120));
    for h in &hosts {
        let started = h
            .events()
            .into_iter()
            .find(|e| e["version"] == "4.0.0" && e["phase"] == "stop")
            .expect("a stop of 4.0.0");
        let at = started["at"].as_str().unwrap().to_string();
        assert!(
            at[..19] >= *rfc3339(end).trim_end_matches('Z'),
            "{} stopped for 4.0.0 at {at}, before the freeze ended at {}",
            h.name,
            rfc3339(end)
        );
    }
}

#[test]
fn a_gate_after_the_first_batch_holds_the_rest_until_approved() {
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "");
    f.pin_env("prod", "", &f.hello("1.0.0", &[]));
    let (hosts, _agents) = start_hosts(&f, &c, &["g1", "g2", "g3"], "prod");
    wait_all(&hosts, "1.0.0", Duration::from_secs(120));
    let gated = "rollout: { max_parallel: 1 }\napproval: { after_first_batch: true, approvers: [release-managers] }\n";
    f.pin_env("prod", gated, &f.hello("2.0.0", &[]));
    wait_for(
        "the rollout to stop after its first batch",
        Duration::from_secs(120),
        || (c.state("prod", "2.0.0").as_deref() == Some("APPROVAL_REQUIRED")).then_some(()),
    );
    let on_two: Vec<&str> = hosts
        .iter()
        .filter(|h| h.version().as_deref() == Some("2.0.0"))
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(on_two.len(), 1, "one host in the first batch: {on_two:?}");
    let rest: Vec<_> = hosts.iter().filter(|h| h.name != on_two[0]).collect();
    for h in &rest {
        wait_for(
            "the agent to be told the rollout waits for approval",
            Duration::from_secs(60),
            || {
                h.hello()["last_error"]
                    .as_str()
                    .filter(|e| e.contains("after its first batch"))
                    .map(str::to_string)
            },
        );
        assert_eq!(h.version().as_deref(), Some("1.0.0"), "{}", h.name);
    }
    let r = c.rollout("prod", "2.0.0").unwrap();
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("its first batch ({}) succeeded", on_two[0])),
        "{r}"
    );
    // bob is not a release manager.
    let out = c.cli("bob", &["approve", "prod", "hello", "2.0.0"]);
    assert_eq!(out.code, 1, "{}", out.all());
    let out = c.cli("alice", &["approve", "prod", "hello", "2.0.0"]);
    assert_eq!(out.code, 0, "{}", out.all());
    wait_all(&hosts, "2.0.0", Duration::from_secs(120));
    wait_for("2.0.0 to succeed", Duration::from_secs(60), || {
        (c.state("prod", "2.0.0").as_deref() == Some("SUCCESS")).then_some(())
    });
    let hist = c.history();
    assert!(hist.iter().any(|e| {
        e["action"] == "approve"
            && e["actor"] == "alice"
            && e["detail"]
                .as_str()
                .unwrap()
                .contains("approved after the first batch")
    }));
}
