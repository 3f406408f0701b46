//! The coordinator with real agents: leases limit how many hosts deploy at once, a failing
//! rollout halts and reverts, approvals and promotion gate rollouts, crashes of the
//! coordinator or of an agent lose nothing, bad requests change nothing.

use std::time::{Duration, Instant};

use drover_tests::coordinator::{Coordinator, token};
use drover_tests::host::{Fleet, Host, Running};
use drover_tests::wait_for;
use serde_json::Value;

/// [start, end] of each host's deploy of `version`, from "stop" (the host is touched) to the
/// end of the deploy, from the agents' own event logs.
pub(crate) fn windows(hosts: &[Host], version: &str) -> Vec<(String, f64, f64)> {
    let ts = |e: &Value| {
        let s = e["at"].as_str().unwrap();
        // 2026-11-27T03:15:38.005Z → seconds of the day with millis (tests run within a day;
        // a deploy spanning midnight would only make the check more lenient).
        let t = &s[11..23];
        let h: f64 = t[0..2].parse().unwrap();
        let m: f64 = t[3..5].parse().unwrap();
        let sec: f64 = t[6..].parse().unwrap();
        h * 3600.0 + m * 60.0 + sec
    };
    let mut out = Vec::new();
    for h in hosts {
        let mut start = None;
        for e in h.events() {
            if e["version"] != version {
                continue;
            }
            match e["phase"].as_str().unwrap() {
                "stop" => start = Some(ts(&e)),
                "deployed" | "rolled_back" | "broken" => {
                    if let Some(s) = start.take() {
                        out.push((h.name.clone(), s, ts(&e)));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// The most windows open at the same moment.
pub(crate) fn max_overlap(w: &[(String, f64, f64)]) -> usize {
    let mut points: Vec<(f64, i32)> = w.iter().flat_map(|(_, s, e)| [(*s, 1), (*e, -1)]).collect();
    // Ends before starts at the same millisecond: a released slot is reusable.
    points.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap().then(a.1.cmp(&b.1)));
    let (mut cur, mut max) = (0, 0);
    for (_, d) in points {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}

pub(crate) fn start_hosts(
    f: &Fleet,
    c: &Coordinator,
    names: &[&str],
    env: &str,
) -> (Vec<Host>, Vec<Running>) {
    let hosts: Vec<Host> = names
        .iter()
        .map(|n| f.host_with(n, env, &c.agent_config()))
        .collect();
    let agents = hosts.iter().map(|h| h.spawn(&[])).collect();
    (hosts, agents)
}

pub(crate) fn wait_all(hosts: &[Host], version: &str, limit: Duration) {
    for h in hosts {
        h.wait_current(version, limit);
    }
}

#[test]
fn ten_agents_deploy_two_at_a_time() {
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "");
    let names: Vec<String> = (1..=10).map(|i| format!("host-{i:02}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    f.pin_env(
        "test",
        "rollout: { max_parallel: 2 }\n",
        &f.hello("1.0.0", &[]),
    );
    let (hosts, agents) = start_hosts(&f, &c, &names, "test");
    wait_all(&hosts, "1.0.0", Duration::from_secs(120));
    let v2 = f.hello("2.0.0", &[]);
    let t0 = Instant::now();
    f.pin_env("test", "rollout: { max_parallel: 2 }\n", &v2);
    wait_all(&hosts, "2.0.0", Duration::from_secs(120));
    eprintln!("commit → 10 hosts on 2.0.0: {:?}", t0.elapsed());
    for v in ["1.0.0", "2.0.0"] {
        let w = windows(&hosts, v);
        assert_eq!(w.len(), 10, "{v}: every host deployed once: {w:?}");
        let max = max_overlap(&w);
        assert!(
            max <= 2,
            "{v}: {max} hosts were between stop and healthy at once: {w:?}"
        );
    }
    // The coordinator agrees: leases granted and released, the rollout succeeded.
    wait_for("the rollout to succeed", Duration::from_secs(30), || {
        (c.state("test", "2.0.0").as_deref() == Some("SUCCESS")).then_some(())
    });
    let hist = c.history();
    let granted = hist
        .iter()
        .filter(|e| e["action"] == "lease_granted" && e["subject"] == "test/hello/2.0.0")
        .count();
    assert_eq!(granted, 10);
    let out = c.cli("watcher", &["status"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains("test/hello/2.0.0 SUCCESS"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("host-10"), "{}", out.stdout);
    drop(agents);
}

#[test]
fn a_failing_rollout_halts_and_the_upgraded_hosts_revert() {
    let f = Fleet::new();
    // h3..h5 are stopped while h1 and h2 take 2.0.0, yet they are part of the fleet: a long
    // heartbeat interval keeps them from going stale (3 intervals) however slow the machine,
    // so the rollout cannot end before they have taken their turn.
    let c = Coordinator::start(f.dir.path(), "heartbeat_interval: 60s\n");
    let policy = "rollout: { max_parallel: 2, max_failures: 0 }\n";
    f.pin_env("test", policy, &f.hello("1.0.0", &[]));
    let (first, _a1) = start_hosts(&f, &c, &["h1", "h2"], "test");
    let (later, later_agents) = start_hosts(&f, &c, &["h3", "h4", "h5"], "test");
    wait_all(&first, "1.0.0", Duration::from_secs(60));
    wait_all(&later, "1.0.0", Duration::from_secs(60));
    // h3..h5 sit out the first part, so h1 and h2 are the first batch.
    for a in later_agents {
        assert_eq!(a.stop(), 0);
    }
    // 2.0.0 fails its health check on h3 only.
    f.pin_env("test", policy, &f.hello("2.0.0", &["FAIL_ON_HOSTS=h3"]));
    wait_all(&first, "2.0.0", Duration::from_secs(60));
    let third = &later[0..1];
    let _a3: Vec<Running> = third.iter().map(|h| h.spawn(&[])).collect();
    wait_for("the rollout to fail", Duration::from_secs(60), || {
        matches!(
            c.state("test", "2.0.0").as_deref(),
            Some("ROLLING_BACK" | "ABORTED")
        )
        .then_some(())
    });
    let rest = &later[1..];
    let _a4: Vec<Running> = rest.iter().map(|h| h.spawn(&[])).collect();
    // h1 and h2 are told to revert, and do; h3 rolled back by itself; h4, h5 never touch 2.0.0.
    wait_all(&first, "1.0.0", Duration::from_secs(60));
    wait_all(third, "1.0.0", Duration::from_secs(60));
    for h in rest {
        wait_for("the host to give 2.0.0 up", Duration::from_secs(60), || {
            (h.hello()["failed"]["version"] == "2.0.0").then_some(())
        });
    }
    wait_for(
        "the rollout to be rolled back",
        Duration::from_secs(30),
        || (c.state("test", "2.0.0").as_deref() == Some("ABORTED")).then_some(()),
    );
    let r = c.rollout("test", "2.0.0").unwrap();
    assert_eq!(r["reason"], "rolled back");
    assert_eq!(r["reverted"], serde_json::json!(["h1", "h2"]));
    assert_eq!(r["failed"], serde_json::json!(["h3"]));
    for h in rest {
        assert!(
            !h.phases()
                .iter()
                .any(|p| ["stop", "switch", "start", "check", "rollback"]
                    .iter()
                    .any(|phase| p == &format!("2.0.0:{phase}"))),
            "{} touched 2.0.0: {:?}",
            h.name,
            h.phases()
        );
        assert_eq!(h.hello()["failed"]["version"], "2.0.0");
    }
    for h in first.iter().chain(&later) {
        assert_eq!(h.version().as_deref(), Some("1.0.0"), "{}", h.name);
    }
    let hist = c.history();
    assert!(
        hist.iter().any(|e| e["action"] == "lease_granted"
            && e["detail"].as_str().unwrap().starts_with("revert"))
    );
    // The reverts also respected max_parallel.
    let w: Vec<_> = windows(&first, "2.0.0");
    assert!(max_overlap(&w) <= 2);

    // `drover status` filters: by state, environment, service, label.
    let hosts = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["status", "--json"];
        all.extend_from_slice(args);
        let out = c.cli("watcher", &all);
        assert_eq!(out.code, 0, "{}", out.all());
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let mut names: Vec<String> = v["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["host"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    wait_for(
        "the hosts' reports of 2.0.0 failing",
        Duration::from_secs(30),
        || (hosts(&["--state", "failed"]).len() >= 3).then_some(()),
    );
    let failed = hosts(&["--state", "failed"]);
    assert!(failed.contains(&"h3".to_string()), "{failed:?}");
    // h3..h5 run 1.0.0 while Git asks them for 2.0.0: drifted. h1 and h2 are ok while the
    // coordinator holds them on 1.0.0, drifted once it lets them follow Git again.
    let drifted = hosts(&["--state", "drifted", "--env", "test"]);
    let ok = hosts(&["--state", "ok"]);
    for h in ["h3", "h4", "h5"] {
        assert!(
            drifted.contains(&h.to_string()) && !ok.contains(&h.to_string()),
            "{h}: {drifted:?} {ok:?}"
        );
    }
    for h in ["h1", "h2"] {
        assert!(
            drifted.contains(&h.to_string()) || ok.contains(&h.to_string()),
            "{h}: {drifted:?} {ok:?}"
        );
    }
    assert!(hosts(&["--env", "prod"]).is_empty());
    assert!(hosts(&["--service", "nope"]).is_empty());
    assert!(hosts(&["--label", "role=db"]).is_empty());
    assert_eq!(hosts(&["--service", "hello", "--env", "test"]).len(), 5);
    let out = c.cli("watcher", &["status", "--state", "broken"]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr
            .contains("unknown state `broken`: use one of ok, deploying, failed"),
        "{}",
        out.stderr
    );
    let out = c.cli("watcher", &["status", "--label", "role"]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("is not KEY=VALUE"), "{}", out.stderr);
    // The table, filtered: h3's reason whole on its line (not a terminal: no wrapping).
    let out = c.cli(
        "watcher",
        &["status", "--state", "failed", "--service", "hello"],
    );
    let row = out
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("h3 "))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(row.contains("2.0.0") && row.contains("1.0.0"), "{row}");
    assert!(out.stdout.contains("did not pass within"), "{}", out.stdout);
    // On a 60-column terminal (a pseudo-terminal from `script`), every line fits.
    assert!(c.ca.is_none(), "plain http coordinator");
    let line = format!(
        "stty cols 60 && '{}' --url '{}' --token-file '{}' status",
        drover_tests::bin("drover").display(),
        c.url(),
        c.token_file("watcher").display()
    );
    let out: drover_tests::host::Out = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &line, "/dev/null"])
        .output()
        .expect("script (util-linux) runs")
        .into();
    assert_eq!(out.code, 0, "{}", out.all());
    let text = out.stdout.replace('\r', "");
    assert!(text.contains("h3"), "{text}");
    for l in text.lines() {
        assert!(
            l.chars().count() <= 60,
            "{l:?} is wider than the terminal:\n{text}"
        );
    }
}

#[test]
fn approvals_gate_the_rollout_and_wrong_roles_are_refused() {
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "");
    let policy = "approval: { required: true, approvers: [release-managers], timeout: 3s }\n";
    f.pin_env("prod", policy, &f.hello("1.0.0", &[]));
    let (hosts, _agents) = start_hosts(&f, &c, &["p1", "p2"], "prod");
    wait_for(
        "the rollout to wait for approval",
        Duration::from_secs(30),
        || (c.state("prod", "1.0.0").as_deref() == Some("APPROVAL_REQUIRED")).then_some(()),
    );
    for h in &hosts {
        // Each agent has asked for a lease and been told to wait (a loaded machine may take
        // a while to get there: wait for it rather than sleep a fixed time).
        wait_for(
            "the agent to be told the rollout waits for approval",
            Duration::from_secs(30),
            || {
                h.hello()["last_error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("approval_required")
                    .then_some(())
            },
        );
        assert!(
            h.hello()["current"].is_null(),
            "{} moved before approval",
            h.name
        );
        assert!(!h.phases().iter().any(|p| p == "1.0.0:stop"));
    }
    // Wrong roles and groups: 403, audited.
    for who in ["fleet", "watcher", "ops", "bob"] {
        let out = c.cli(who, &["approve", "prod", "hello", "1.0.0"]);
        assert_eq!(out.code, 1, "{who} must not approve: {}", out.all());
        assert!(out.stderr.contains("error:"), "{}", out.stderr);
    }
    let denied: Vec<Value> = c
        .history()
        .into_iter()
        .filter(|e| e["action"] == "denied")
        .collect();
    assert!(denied.len() >= 4, "{denied:?}");
    assert!(
        denied
            .iter()
            .any(|e| e["actor"] == "bob"
                && e["detail"].as_str().unwrap().contains("release-managers"))
    );
    let out = c.cli("alice", &["approve", "prod", "hello", "1.0.0"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains("RUNNING") && out.stdout.contains("approved by alice"),
        "{}",
        out.stdout
    );
    wait_all(&hosts, "1.0.0", Duration::from_secs(60));
    let hist = c.history();
    assert!(
        hist.iter()
            .any(|e| e["action"] == "approve" && e["actor"] == "alice")
    );

    // A rejection aborts: nobody deploys 1.1.0.
    f.pin_env("prod", policy, &f.hello("1.1.0", &[]));
    wait_for("1.1.0 to wait", Duration::from_secs(30), || {
        (c.state("prod", "1.1.0").as_deref() == Some("APPROVAL_REQUIRED")).then_some(())
    });
    let out = c.cli("alice", &["reject", "prod", "hello", "1.1.0"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("ABORTED"), "{}", out.stdout);
    for h in &hosts {
        wait_for("the host to give 1.1.0 up", Duration::from_secs(30), || {
            (h.hello()["failed"]["version"] == "1.1.0").then_some(())
        });
        assert_eq!(h.version().as_deref(), Some("1.0.0"));
    }
    // Nobody answers: the approval times out.
    f.pin_env("prod", policy, &f.hello("1.2.0", &[]));
    wait_for("1.2.0 to time out", Duration::from_secs(30), || {
        (c.state("prod", "1.2.0").as_deref() == Some("ABORTED")).then_some(())
    });
    assert!(
        c.rollout("prod", "1.2.0").unwrap()["reason"]
            .as_str()
            .unwrap()
            .contains("approval timed out")
    );
    for h in &hosts {
        assert_eq!(h.version().as_deref(), Some("1.0.0"));
    }
}

#[test]
fn prod_waits_for_a_success_in_staging() {
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "");
    let v1 = f.hello("1.0.0", &[]);
    f.pin_env("prod", "promotion: { requires: staging }\n", &v1);
    f.repo.write(
        "environments/staging.yaml",
        "environment: staging\nservices: {}\n",
    );
    f.repo.commit("staging, empty");
    let (prod, _a) = start_hosts(&f, &c, &["p1"], "prod");
    wait_for("prod to wait for staging", Duration::from_secs(30), || {
        prod[0].hello()["last_error"]
            .as_str()
            .filter(|e| e.contains("has not succeeded in staging yet"))
            .map(str::to_string)
    });
    assert!(prod[0].hello()["current"].is_null());
    f.pin_env("staging", "", &v1);
    let (staging, _b) = start_hosts(&f, &c, &["s1"], "staging");
    wait_all(&staging, "1.0.0", Duration::from_secs(60));
    wait_all(&prod, "1.0.0", Duration::from_secs(60));
    assert_eq!(c.state("staging", "1.0.0").as_deref(), Some("SUCCESS"));
}

#[test]
fn a_coordinator_crash_mid_rollout_loses_and_doubles_nothing() {
    let f = Fleet::new();
    let mut c = Coordinator::start(f.dir.path(), "");
    // A slow drain keeps each host in its deploy for a while.
    f.repo.write(
        "services/hello.yaml",
        &drover_tests::host::SERVICE.replace(
            "  before_stop: bin/drain\n",
            "  before_stop: { command: [bin/slow], timeout: 10s }\n",
        ),
    );
    let policy = "rollout: { max_parallel: 1 }\n";
    f.pin_env("test", policy, &f.hello("1.0.0", &[]));
    let (hosts, _agents) = start_hosts(&f, &c, &["h1", "h2", "h3", "h4"], "test");
    wait_all(&hosts, "1.0.0", Duration::from_secs(90));
    f.pin_env("test", policy, &f.hello("2.0.0", &[]));
    wait_for("a lease on 2.0.0", Duration::from_secs(30), || {
        c.rollout("test", "2.0.0")
            .filter(|r| r["leases"] == 1)
            .map(|_| ())
    });
    c.kill();
    std::thread::sleep(Duration::from_secs(2));
    c.restart();
    wait_all(&hosts, "2.0.0", Duration::from_secs(120));
    let w = windows(&hosts, "2.0.0");
    assert_eq!(w.len(), 4, "{w:?}");
    assert_eq!(max_overlap(&w), 1, "{w:?}");
    let hist = c.history();
    let granted: Vec<&Value> = hist
        .iter()
        .filter(|e| e["action"] == "lease_granted" && e["subject"] == "test/hello/2.0.0")
        .collect();
    assert_eq!(
        granted.len(),
        4,
        "one lease per host, none doubled: {granted:?}"
    );
    assert!(
        !hist.iter().any(|e| e["action"] == "lease_expired"),
        "no lease lost"
    );
}

#[test]
fn a_dead_agent_loses_its_lease_after_the_ttl() {
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "lease_ttl: 2s\n");
    f.repo.write(
        "services/hello.yaml",
        &drover_tests::host::SERVICE.replace(
            "  before_stop: bin/drain\n",
            "  before_stop: { command: [bin/hang], timeout: 5m }\n",
        ),
    );
    let policy = "rollout: { max_parallel: 1 }\n";
    f.pin_env("test", policy, &f.hello("1.0.0", &[]));
    let (hosts, mut agents) = start_hosts(&f, &c, &["h1", "h2"], "test");
    wait_all(&hosts, "1.0.0", Duration::from_secs(60));
    f.pin_env("test", policy, &f.hello("2.0.0", &[]));
    // One of them takes the lease and hangs in its hook.
    let holder = wait_for("a lease holder", Duration::from_secs(30), || {
        hosts
            .iter()
            .position(|h| h.phases().contains(&"2.0.0:stop".to_string()))
    });
    assert_eq!(c.rollout("test", "2.0.0").unwrap()["leases"], 1);
    agents.remove(holder).kill();
    wait_for("the lease to expire", Duration::from_secs(20), || {
        c.history()
            .iter()
            .any(|e| e["action"] == "lease_expired")
            .then_some(())
    });
    // The other host gets the slot now (it then hangs in the same hook: the point is the slot).
    let other = &hosts[1 - holder];
    wait_for("the other host to start", Duration::from_secs(30), || {
        other
            .phases()
            .contains(&"2.0.0:stop".to_string())
            .then_some(())
    });
}

/// The rollouts of a status, without what only the passing of time changes (what a rollout
/// waits for, shown once it has waited a while).
fn settled(status: &Value) -> Value {
    let mut r = status["rollouts"].clone();
    for x in r.as_array_mut().into_iter().flatten() {
        x.as_object_mut().map(|o| o.remove("waiting_for"));
    }
    r
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let f = Fleet::new();
    let commit = f.pin_raw("1.0", &"a".repeat(64));
    let c = Coordinator::start(f.dir.path(), "");
    c.wait_commit(&commit);
    let agent = token("fleet");
    let acquire = format!(
        r#"{{"host":"h1","environment":"test","service":"hello","version":"1.0","purpose":"deploy","commit":"{commit}"}}"#
    );
    let (s, body) = c.http("POST", "/v1/leases", Some(&agent), &acquire, true);
    assert_eq!(s, 200, "{body}");
    let id = body["lease"]["id"].as_str().unwrap().to_string();
    let before = c.status();
    /// (what, path, token, body, protocol header, status, kind).
    type Case<'a> = (&'a str, String, Option<String>, String, bool, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            "/v1/leases".into(),
            Some(agent.clone()),
            "{\"host\": ".into(),
            true,
            400,
            "bad_request",
        ),
        (
            "unknown field",
            "/v1/leases".into(),
            Some(agent.clone()),
            acquire.replace("\"purpose\"", "\"porpoise\""),
            true,
            400,
            "bad_request",
        ),
        (
            "a policy sent by an agent (the coordinator reads it from Git)",
            "/v1/leases".into(),
            Some(agent.clone()),
            acquire.replace(
                "\"purpose\"",
                r#""policy":{"max_parallel":1000,"max_failures":0,"approval_required":false,"approval_timeout_ms":1},"purpose""#,
            ),
            true,
            400,
            "bad_request",
        ),
        (
            "a commit time sent by an agent (Git's is used)",
            "/v1/leases".into(),
            Some(agent.clone()),
            acquire.replace("\"purpose\"", r#""commit_time_ms":99999999999999,"purpose""#),
            true,
            400,
            "bad_request",
        ),
        (
            "unknown rollout",
            "/v1/rollouts/test/hello/9.9/approve".into(),
            Some(token("alice")),
            String::new(),
            true,
            404,
            "not_found",
        ),
        (
            "stale lease",
            "/v1/leases/0000dead/release".into(),
            Some(agent.clone()),
            r#"{"outcome":"success"}"#.into(),
            true,
            410,
            "lease_lost",
        ),
        (
            "oversized body",
            "/v1/leases".into(),
            Some(agent.clone()),
            format!("{{\"host\": \"{}\"}}", "x".repeat(300 << 10)),
            true,
            413,
            "payload_too_large",
        ),
        (
            "missing token",
            "/v1/leases".into(),
            None,
            acquire.clone(),
            true,
            401,
            "unauthorized",
        ),
        (
            "wrong token",
            "/v1/leases".into(),
            Some("nope".into()),
            acquire.clone(),
            true,
            401,
            "unauthorized",
        ),
        (
            "no protocol header",
            "/v1/leases".into(),
            Some(agent.clone()),
            acquire.clone(),
            false,
            400,
            "protocol",
        ),
        (
            "viewer acquiring",
            "/v1/leases".into(),
            Some(token("watcher")),
            acquire.clone(),
            true,
            403,
            "forbidden",
        ),
        (
            "agent pausing",
            "/v1/rollouts/test/hello/pause".into(),
            Some(agent.clone()),
            String::new(),
            true,
            403,
            "forbidden",
        ),
    ];
    for (what, path, tok, body, proto, status, kind) in cases {
        let (s, b) = c.http("POST", &path, tok.as_deref(), &body, proto);
        assert_eq!(s, status, "{what}: {b}");
        assert_eq!(b["kind"], kind, "{what}: {b}");
        assert!(
            !b["message"].as_str().unwrap_or("").is_empty(),
            "{what}: {b}"
        );
    }
    assert_eq!(settled(&c.status()), settled(&before), "state unchanged");
    // A release, then the same release replayed.
    let (s, _) = c.http(
        "POST",
        &format!("/v1/leases/{id}/release"),
        Some(&agent),
        r#"{"outcome":"success"}"#,
        true,
    );
    assert_eq!(s, 200);
    let after = c.status();
    let (s, b) = c.http(
        "POST",
        &format!("/v1/leases/{id}/release"),
        Some(&agent),
        r#"{"outcome":"failure"}"#,
        true,
    );
    assert_eq!((s, b["kind"].as_str()), (410, Some("lease_lost")));
    assert_eq!(
        settled(&c.status()),
        settled(&after),
        "a replayed release changes nothing"
    );
    let denied = c
        .history()
        .iter()
        .filter(|e| e["action"] == "denied")
        .count();
    // The two calls of known tokens with the wrong role are audited; the two without a valid
    // token are not stored at all (a flood of them cannot grow the store), only counted.
    assert_eq!(denied, 2, "every denied call of a known token is audited");
    let (s, m) = c.http("GET", "/metrics", Some(&token("watcher")), "", true);
    assert_eq!(s, 200, "{m}");
    assert!(
        m.as_str()
            .unwrap_or("")
            .contains("drover_coordinator_unauthenticated_total 2\n"),
        "{m}"
    );
    let (s, _) = c.http("GET", "/metrics", None, "", true);
    assert_eq!(s, 401, "/metrics needs a token that may read");
}

#[test]
fn an_unreachable_coordinator_keeps_the_running_version() {
    let f = Fleet::new();
    let mut c = Coordinator::start(f.dir.path(), "");
    f.pin(&f.hello("1.0.0", &[]));
    let h = f.host_with("h1", "test", &c.agent_config());
    let agent = h.spawn(&[]);
    h.wait_current("1.0.0", Duration::from_secs(60));
    let pid = h.app_pids()[0];
    c.kill();
    f.pin(&f.hello("2.0.0", &[]));
    wait_for(
        "the agent to report the coordinator unreachable",
        Duration::from_secs(30),
        || {
            h.hello()["last_error"]
                .as_str()
                .filter(|e| e.contains("unreachable"))
                .map(str::to_string)
        },
    );
    assert_eq!(h.app_pids(), vec![pid]);
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    c.restart();
    h.wait_current("2.0.0", Duration::from_secs(60));
    drop(agent);

    // With `required: false` an unreachable coordinator does not block deploys.
    let lax = f.host_with(
        "h2",
        "test",
        &c.agent_config()
            .replace("heartbeat_interval", "required: false, heartbeat_interval"),
    );
    c.kill();
    let out = lax.once();
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stderr.contains("deploying without a lease"),
        "{}",
        out.stderr
    );
}

/// HMAC-SHA256 of `body` with `key`, hex, computed by openssl (not by drover's code).
pub(crate) fn openssl_hmac(key: &str, body: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", key])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl runs");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.rsplit("= ").next().unwrap().trim().to_string()
}

/// A Git webhook asks the coordinator to fetch now: with a 10-minute poll it sees a commit at
/// once when GitHub's signature or GitLab's token checks out, and not at all otherwise.
#[test]
fn a_signed_push_webhook_makes_the_coordinator_fetch_at_once_and_a_forged_one_does_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fleet::new();
    let first = f.pin_raw("1.0.0", &"a".repeat(64));
    let secret = |name: &str, text: &str| {
        let p = f.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p.display().to_string()
    };
    let (gh, gl) = (
        secret("gh.secret", "gh-s3cret\n"),
        secret("gl.secret", "gl-t0ken"),
    );
    let mut c = Coordinator::prepare(
        f.dir.path(),
        &format!("webhook: {{ github_secret_file: {gh}, gitlab_token_file: {gl} }}\n"),
    );
    // Served by git daemon (a local path would be watched, and fetched at each change).
    let repos = f.dir.path().join("repos");
    std::fs::create_dir_all(&repos).unwrap();
    f.repo.bare_clone(&repos.join("fleet.git"));
    let daemon = drover_tests::git::GitDaemon::start(&repos);
    let cfg = std::fs::read_to_string(c.config()).unwrap();
    let url = format!("git://127.0.0.1:{}/fleet.git", daemon.port);
    let cfg = cfg
        .replace(&f.repo.dir.display().to_string(), &url)
        .replace("poll_interval: 1s", "poll_interval: 10m");
    std::fs::write(c.config(), cfg).unwrap();
    c.restart();
    c.wait_commit(&first);

    let post = |headers: &[String], body: &[u8]| {
        drover_tests::http_request(c.port, "POST", "/v1/webhooks/git", headers, body)
            .expect("an answer")
    };
    let body = br#"{"ref":"refs/heads/main","after":"0000"}"#;
    let second = f.pin_raw("2.0.0", &"b".repeat(64));
    f.repo.push();
    // Forged, unsigned, signed for another body, a wrong GitLab token, a forge not set up:
    // 401, and no fetch.
    for (what, headers) in [
        (
            "another secret",
            vec![format!(
                "X-Hub-Signature-256: sha256={}",
                openssl_hmac("guess", body)
            )],
        ),
        ("unsigned", vec!["X-GitHub-Event: push".to_string()]),
        (
            "another body",
            vec![format!(
                "X-Hub-Signature-256: sha256={}",
                openssl_hmac("gh-s3cret", b"{}")
            )],
        ),
        ("wrong token", vec!["X-Gitlab-Token: gl-t0ke".to_string()]),
        (
            "gitea not set up",
            vec![format!(
                "X-Gitea-Signature: {}",
                openssl_hmac("gh-s3cret", body)
            )],
        ),
    ] {
        let (status, answer) = post(&headers, body);
        assert_eq!(status, 401, "{what}: {answer}");
        assert!(answer.contains("unauthorized"), "{what}: {answer}");
    }
    // Over 1 MiB: refused before any check.
    let big = vec![b' '; (1 << 20) + 1];
    let (status, answer) = post(
        &[format!(
            "X-Hub-Signature-256: sha256={}",
            openssl_hmac("gh-s3cret", &big)
        )],
        &big,
    );
    assert_eq!(status, 413, "{answer}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        c.status()["desired"]["commit"],
        first.as_str(),
        "a refused webhook fetched"
    );
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(
        !log.contains("gh-s3cret") && !log.contains("gl-t0ken"),
        "a secret in the log"
    );

    // Signed by GitHub (as openssl computes it): fetched at once.
    let (status, answer) = post(
        &[
            "X-GitHub-Event: push".to_string(),
            format!(
                "X-Hub-Signature-256: sha256={}",
                openssl_hmac("gh-s3cret", body)
            ),
        ],
        body,
    );
    assert_eq!(status, 202, "{answer}");
    c.wait_commit(&second);
    // GitLab's token, for the next commit.
    let third = f.pin_raw("3.0.0", &"c".repeat(64));
    f.repo.push();
    let (status, answer) = post(&["X-Gitlab-Token: gl-t0ken".to_string()], body);
    assert_eq!(status, 202, "{answer}");
    c.wait_commit(&third);
    let (s, m) = c.http("GET", "/metrics", Some(&token("watcher")), "", false);
    assert_eq!(s, 200, "{m}");
    let m = m.as_str().unwrap_or("");
    assert!(
        m.contains("drover_coordinator_git_webhooks_total{result=\"verified\"} 2\n")
            && m.contains("drover_coordinator_git_webhooks_total{result=\"refused\"} 5\n"),
        "{m}"
    );

    // Bodies are read before they can be verified: eight slow senders at once hold all the
    // room there is; a ninth is told to retry, and once they go, webhooks are served again.
    let slow: Vec<std::net::TcpStream> = (0..8)
        .map(|_| {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(("127.0.0.1", c.port)).unwrap();
            write!(
                s,
                "POST /v1/webhooks/git HTTP/1.1\r\nHost: x\r\nX-Gitlab-Token: guess\r\nContent-Length: 1000\r\n\r\n{{"
            )
            .unwrap();
            s
        })
        .collect();
    // Once the server reads all eight (as its gauge says), a ninth is refused.
    wait_for(
        "the slow senders to hold every slot",
        Duration::from_secs(20),
        || {
            let (_, m) = c.http("GET", "/metrics", Some(&token("watcher")), "", false);
            m.as_str()?
                .contains("drover_coordinator_git_webhooks_reading 8\n")
                .then_some(())
        },
    );
    let (status, answer) = post(&["X-Gitlab-Token: gl-t0ken".to_string()], body);
    assert_eq!(status, 429, "{answer}");
    assert!(answer.contains("retry"), "{answer}");
    drop(slow);
    wait_for(
        "webhooks to be served again",
        Duration::from_secs(10),
        || {
            let (status, _) = post(&["X-Gitlab-Token: gl-t0ken".to_string()], body);
            (status == 202).then_some(())
        },
    );

    // A coordinator with no webhook secrets has no such endpoint.
    c.kill();
    let plain = Coordinator::start(f.dir.path(), "");
    let (status, answer) = drover_tests::http_request(
        plain.port,
        "POST",
        "/v1/webhooks/git",
        &["X-Gitlab-Token: gl-t0ken".to_string()],
        body,
    )
    .unwrap();
    assert_eq!(status, 404, "{answer}");
    assert!(answer.contains("webhook:"), "{answer}");
}
