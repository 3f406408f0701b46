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
    // Beside the window, a weekly cron window that is never open while the test runs: noon
    // (UTC) three days from today. (A fixed "Friday 18:00 for 62 h" froze weekend runs.)
    let dow = (unix_now() / 86_400 + 4 + 3) % 7; // 1970-01-01 was a Thursday (4)
    format!(
        "rollout: {{ max_parallel: 2 }}\nfreeze:\n  - {{ from: {}, to: {} }}\n  - {{ cron: \"0 12 * * {dow}\", duration: 1h, timezone: Europe/Berlin }}\n",
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
    // 1.0.0 must have succeeded (its hosts reported it healthy) to be a version a revert goes
    // back to without waiting: a commit before that supersedes it, and it never succeeded.
    wait_for("1.0.0 to succeed", Duration::from_secs(60), || {
        (c.state("prod", "1.0.0").as_deref() == Some("SUCCESS")).then_some(())
    });
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
    let limit = std::time::Instant::now() + Duration::from_secs(120);
    for h in &hosts {
        while h.hello()["current"] != "1.0.0" || !h.hello()["deploying"].is_null() {
            if std::time::Instant::now() > limit {
                let logs: Vec<String> = _agents.iter().map(|a| a.log()).collect();
                panic!(
                    "{} does not run 1.0.0: {:#}\nrollouts: {:#}\nagent logs:\n{}",
                    h.name,
                    h.status(),
                    c.status()["rollouts"],
                    logs.join("\n----\n")
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
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

/// `services/<name>.yaml`: hello under another name, on hosts labelled `role: <name>`.
fn hello_as(name: &str) -> String {
    drover_tests::host::SERVICE
        .replacen(
            "service: hello\n",
            &format!("service: {name}\ntargets: {{ role: {name} }}\n"),
            1,
        )
        .replace("{base}/hello", &format!("{{base}}/{name}"))
}

/// The migration job's artifact `version`: `bin/migrate` appends "host version" to `log`,
/// or fails (exit 3) while `fail` exists.
fn migration(f: &Fleet, version: &str) -> drover_tests::artifact::Built {
    use drover_tests::artifact::{Entry, sha256, tar_gz};
    let script = b"#!/bin/sh\nif [ -e \"$FAIL_FILE\" ]; then echo \"schema conflict in $DROVER_VERSION\" >&2; exit 3; fi\nsleep 1\necho \"$DROVER_HOST $DROVER_VERSION\" >> \"$LOG\"\necho migrated\n";
    let bytes = tar_gz(&[
        Entry::Dir("bin/"),
        Entry::File("bin/migrate", script, 0o755),
    ]);
    let path = f.artifacts().join(format!("migrate-{version}.tar.gz"));
    std::fs::write(&path, &bytes).unwrap();
    drover_tests::artifact::Built {
        path,
        sha256: sha256(&bytes),
        version: version.into(),
    }
}

/// Commits prod: the job at `job`, api after it at `api`, web after api at `web`.
fn pipeline(
    f: &Fleet,
    job: &drover_tests::artifact::Built,
    api: &drover_tests::artifact::Built,
    web: &drover_tests::artifact::Built,
) {
    f.repo.write(
        "environments/prod.yaml",
        &format!(
            "environment: prod\nrollout: {{ max_parallel: 2 }}\nservices:\n  migrate: {{ version: \"{}\", sha256: {} }}\n  api: {{ version: {}, sha256: {}, after: [migrate] }}\n  web: {{ version: {}, sha256: {}, after: [api] }}\n",
            job.version, job.sha256, api.version, api.sha256, web.version, web.sha256
        ),
    );
    f.repo.commit(&format!(
        "prod: migrate {}, api {}, web {}",
        job.version, api.version, web.version
    ));
}

/// The state of the newest rollout of (prod, `service`, `version`).
fn state_of(c: &Coordinator, service: &str, version: &str) -> Option<String> {
    c.status()["rollouts"]
        .as_array()?
        .iter()
        .rev()
        .find(|r| r["service"] == service && r["version"] == version)
        .and_then(|r| r["state"].as_str().map(str::to_string))
}

fn wait_state(c: &Coordinator, service: &str, version: &str, want: &str) {
    let limit = std::time::Instant::now() + Duration::from_secs(120);
    while state_of(c, service, version).as_deref() != Some(want) {
        if std::time::Instant::now() > limit {
            panic!(
                "timed out waiting for {service} {version} to be {want}; rollouts: {:#}",
                c.status()["rollouts"]
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The audit sequence number of the first transition of (prod, `service`, `version`) into `to`.
fn seq_of(hist: &[serde_json::Value], service: &str, version: &str, to: &str) -> u64 {
    hist.iter()
        .find(|h| {
            h["action"] == "transition"
                && h["subject"] == format!("prod/{service}/{version}")
                && h["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains(&format!("→ {to}")))
        })
        .and_then(|h| h["seq"].as_u64())
        .unwrap_or_else(|| panic!("no transition of {service} {version} to {to}: {hist:?}"))
}

#[test]
fn a_migration_job_runs_once_on_one_host_then_the_api_rolls_then_the_web() {
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "");
    let log = f.dir.path().join("migrations.log");
    let fail = f.dir.path().join("fail");
    f.repo.write("services/api.yaml", &hello_as("api"));
    f.repo.write("services/web.yaml", &hello_as("web"));
    f.repo.write(
        "services/migrate.yaml",
        &format!(
            "service: migrate\nkind: job\ntargets: {{ role: api }}\nartifact: {{ url: \"{{art}}/migrate-{{version}}.tar.gz\" }}\ninstall: {{ root: \"{{base}}/migrate\" }}\nrun:\n  command: [bin/migrate]\n  env: {{ LOG: \"{}\", FAIL_FILE: \"{}\" }}\ntimeout: 1m\n",
            log.display(),
            fail.display()
        ),
    );
    let hosts: Vec<_> = [("a1", "api"), ("a2", "api"), ("w1", "web")]
        .iter()
        .map(|(n, role)| {
            f.host_with(
                n,
                "prod",
                &format!("labels: {{ role: {role} }}\n{}", c.agent_config()),
            )
        })
        .collect();
    let one = f.hello("1.0.0", &[]);
    pipeline(&f, &migration(&f, "5"), &one, &one);
    let _agents: Vec<_> = hosts.iter().map(|h| h.spawn(&[])).collect();

    // The job first, once, on one api host; then api; then web.
    wait_state(&c, "web", "1.0.0", "SUCCESS");
    let ran = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = ran.lines().collect();
    assert_eq!(lines.len(), 1, "the job ran once: {ran}");
    assert!(
        lines[0] == "a1 5" || lines[0] == "a2 5",
        "on an api host: {ran}"
    );
    assert_eq!(state_of(&c, "migrate", "5").as_deref(), Some("SUCCESS"));
    let hist = c.history();
    let job_done = seq_of(&hist, "migrate", "5", "SUCCESS");
    let api_start = seq_of(&hist, "api", "1.0.0", "RUNNING");
    let api_done = seq_of(&hist, "api", "1.0.0", "SUCCESS");
    let web_start = seq_of(&hist, "web", "1.0.0", "RUNNING");
    assert!(
        job_done < api_start && api_done < web_start,
        "job {job_done}, api {api_start}..{api_done}, web {web_start}"
    );
    let granted = hist
        .iter()
        .filter(|h| h["action"] == "lease_granted" && h["subject"] == "prod/migrate/5")
        .count();
    assert_eq!(granted, 1, "one lease for the job");
    for h in &hosts[..2] {
        let st = h.status();
        assert_eq!(st["services"]["api"]["current"], "1.0.0", "{st}");
    }
    assert_eq!(hosts[2].status()["services"]["web"]["current"], "1.0.0");
    // The host that did not run it knows where it ran.
    let other = if lines[0] == "a1 5" {
        &hosts[1]
    } else {
        &hosts[0]
    };
    let plan = other.run_cmd(&["plan"], &[]);
    assert!(
        plan.stdout.contains("migrate: job 5 — done"),
        "{}",
        plan.all()
    );
    let done = &other.status()["jobs"]["migrate"]["done"];
    assert!(
        done["elsewhere"].as_str().unwrap().contains("ran on a"),
        "{done}"
    );
    let runner = if lines[0] == "a1 5" {
        &hosts[0]
    } else {
        &hosts[1]
    };
    let done = &runner.status()["jobs"]["migrate"]["done"];
    assert_eq!(
        (done["version"].as_str(), done["output"].as_str()),
        (Some("5"), Some("migrated")),
        "{done}"
    );
    let table = runner.run_cmd(&["status"], &[]);
    assert!(table.stdout.contains("job 5 ran here"), "{}", table.stdout);

    // A failing migration holds the api behind it, reverting nothing; retry runs it again.
    std::fs::write(&fail, "").unwrap();
    let two = f.hello("2.0.0", &[]);
    pipeline(&f, &migration(&f, "6"), &two, &one);
    wait_state(&c, "migrate", "6", "FAILED");
    let job = c.status()["rollouts"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|r| r["service"] == "migrate" && r["version"] == "6")
        .cloned()
        .unwrap();
    assert!(
        job["reason"]
            .as_str()
            .unwrap()
            .contains("schema conflict in 6"),
        "{job}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(state_of(&c, "api", "2.0.0").as_deref(), Some("PENDING"));
    for h in &hosts[..2] {
        assert_eq!(h.status()["services"]["api"]["current"], "1.0.0");
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
    std::fs::remove_file(&fail).unwrap();
    let out = c.cli("ops", &["retry", "prod", "migrate"]);
    assert_eq!(out.code, 0, "{}", out.all());
    wait_state(&c, "api", "2.0.0", "SUCCESS");
    let ran = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        ran.lines().filter(|l| l.ends_with(" 6")).count(),
        1,
        "6 ran once, after the retry: {ran}"
    );
    for h in &hosts[..2] {
        assert_eq!(h.status()["services"]["api"]["current"], "2.0.0");
    }
    // A job is not rolled back.
    let out = c.cli("ops", &["rollback", "prod", "migrate"]);
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(out.stderr.contains("is a job"), "{}", out.all());
}

#[test]
fn a_job_cut_off_by_a_crash_fails_and_is_not_run_again_by_itself() {
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "");
    let log = f.dir.path().join("migrations.log");
    f.repo.write(
        "services/migrate.yaml",
        &format!(
            "service: migrate\nkind: job\nartifact: {{ url: \"{{art}}/migrate-{{version}}.tar.gz\" }}\ninstall: {{ root: \"{{base}}/migrate\" }}\nrun:\n  command: [bin/migrate]\n  env: {{ LOG: \"{}\", FAIL_FILE: /nonexistent }}\n",
            log.display()
        ),
    );
    let job = migration(&f, "5");
    f.repo.write(
        "environments/prod.yaml",
        &format!(
            "environment: prod\nservices:\n  migrate: {{ version: \"5\", sha256: {} }}\n",
            job.sha256
        ),
    );
    let commit = f.repo.commit("migrate 5");
    // The coordinator has read it (else the lease is refused as stale and nothing runs).
    c.wait_commit(&commit);
    let h = f.host_with("a1", "prod", &c.agent_config());
    // Killed as the command is about to run (the run is recorded first).
    let out = h.once_with(&[("DROVER_FAILPOINTS", "job:run=kill")]);
    assert_eq!(out.code, -1, "{}", out.all());
    // The restart cannot know whether it ran: the job fails, saying so, and does not run.
    let out = h.once();
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout
            .contains("the agent stopped while the job ran: its outcome is unknown"),
        "{}",
        out.stdout
    );
    wait_state(&c, "migrate", "5", "FAILED");
    assert!(!log.exists(), "it did not run");
    // Nor on the next pass.
    let out = h.once();
    assert!(out.stdout.contains("failed here before"), "{}", out.stdout);
    assert!(!log.exists());
    // drover retry runs it.
    let out = c.cli("ops", &["retry", "prod", "migrate"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let out = h.once();
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("job 5 ran here"), "{}", out.stdout);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "a1 5\n");
    wait_state(&c, "migrate", "5", "SUCCESS");
}
