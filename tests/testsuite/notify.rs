//! Notifications against a local receiver that checks each service's format (Slack, PagerDuty,
//! Jira, signed webhooks): a failing rollout pages once and opens one issue, both resolved on
//! recovery; an approval reaches Slack and a signed click moves the fleet while forged, stale
//! and unmapped ones change nothing; deliveries survive a kill -9 of the coordinator and are
//! retried through 500 and 429; a dead receiver is given up, audited.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_tests::coordinator::{Coordinator, token};
use drover_tests::host::{Fleet, Running};
use drover_tests::receiver::{self, PD_KEY, Receiver, SLACK_SIGNING};
use drover_tests::{free_port, wait_for};
use serde_json::Value;

use crate::coordinator::{openssl_hmac, start_hosts, wait_all};

fn bodies(reqs: &[Value]) -> Vec<&Value> {
    reqs.iter().map(|r| &r["body"]).collect()
}

/// The accepted requests under `prefix` (2xx).
fn accepted(r: &Receiver, prefix: &str) -> Vec<Value> {
    r.on(prefix)
        .into_iter()
        .filter(|q| (200..300).contains(&q["status"].as_u64().unwrap_or(0)))
        .collect()
}

#[test]
fn a_failing_rollout_pages_once_opens_one_jira_issue_and_both_are_resolved_on_recovery() {
    let f = Fleet::new();
    let r = Receiver::start(f.dir.path(), free_port());
    let c = Coordinator::start(
        f.dir.path(),
        &format!(
            "heartbeat_interval: 60s\n{}",
            receiver::channels(f.dir.path(), &r.url(), "1h")
        ),
    );
    let policy = "rollout: { max_parallel: 1, max_failures: 0 }\nnotify:\n  - { on: [failed, rolled_back], to: [prod-pager, ops-jira, audit-hook] }\n  - { on: [succeeded], to: [audit-hook] }\n";
    f.pin_env("test", policy, &f.hello("1.0.0", &[]));
    let (hosts, _agents): (_, Vec<Running>) = start_hosts(&f, &c, &["h1", "h2"], "test");
    wait_all(&hosts, "1.0.0", Duration::from_secs(60));
    // 2.0.0 fails on h2 (h1 takes it first): h1 reverts.
    let bad = f.pin_env("test", policy, &f.hello("2.0.0", &["FAIL_ON_HOSTS=h2"]));
    wait_for("2.0.0 to be rolled back", Duration::from_secs(90), || {
        (c.state("test", "2.0.0").as_deref() == Some("ABORTED")).then_some(())
    });
    let failed = c.rollout("test", "2.0.0").unwrap();
    wait_for(
        "the failure and the rollback to reach the webhook",
        Duration::from_secs(30),
        || (accepted(&r, "/hook/").len() >= 3).then_some(()),
    );
    wait_for(
        "Jira's comment on the rollback",
        Duration::from_secs(30),
        || (accepted(&r, "/jira/rest/api/2/issue/OPS-1/comment").len() == 1).then_some(()),
    );
    // One page, one issue, for the failure and its rollback.
    let pages = accepted(&r, "/pd/");
    assert_eq!(pages.len(), 1, "{:?}", bodies(&pages));
    let page = &pages[0]["body"];
    let dedup = page["dedup_key"].as_str().unwrap().to_string();
    assert_eq!(page["event_action"], "trigger");
    assert_eq!(page["routing_key"], PD_KEY);
    assert_eq!(page["payload"]["severity"], "critical");
    assert_eq!(page["payload"]["source"], "drover/test/hello");
    assert!(
        dedup.ends_with(&format!("rollout-{}", failed["id"])),
        "{dedup}"
    );
    let details = &page["payload"]["custom_details"];
    assert_eq!(details["environment"], "test");
    assert_eq!(details["service"], "hello");
    assert_eq!(details["version"], "2.0.0");
    assert_eq!(details["commit"], bad.as_str());
    assert_eq!(details["hosts"], serde_json::json!(["h2"]));
    assert!(
        details["reason"]
            .as_str()
            .unwrap()
            .contains("max_failures 0"),
        "{details}"
    );
    let link = page["links"][0]["href"].as_str().unwrap();
    assert_eq!(
        link,
        format!("https://drover.test/ui/rollouts/{}", failed["id"])
    );
    let issues = accepted(&r, "/jira/rest/api/2/issue");
    let created: Vec<&Value> = issues
        .iter()
        .filter(|q| q["path"] == "/jira/rest/api/2/issue")
        .collect();
    assert_eq!(created.len(), 1);
    let fields = &created[0]["body"]["fields"];
    assert_eq!(fields["project"]["key"], "OPS");
    assert_eq!(fields["issuetype"]["name"], "Bug");
    assert_eq!(fields["summary"], "test/hello/2.0.0 failed");
    let desc = fields["description"].as_str().unwrap();
    for part in [
        "Environment: test",
        "Version: 2.0.0",
        &format!("Commit: {}", &bad[..12]),
        "Hosts: h2",
        link,
    ] {
        assert!(desc.contains(part), "{part} in {desc}");
    }
    // The link is the dashboard's page of that rollout; the API has it too.
    let (status, v) = c.http(
        "GET",
        &format!("/v1/rollouts/{}", failed["id"]),
        Some(&token("watcher")),
        "",
        true,
    );
    assert_eq!(
        (status, &v["rollout"]["version"]),
        (200, &Value::from("2.0.0"))
    );

    // 3.0.0 succeeds: the page is resolved, the issue hears of it, the webhook too.
    f.pin_env("test", policy, &f.hello("3.0.0", &[]));
    wait_all(&hosts, "3.0.0", Duration::from_secs(60));
    wait_for("the page to be resolved", Duration::from_secs(60), || {
        (accepted(&r, "/pd/").len() == 2).then_some(())
    });
    let resolve = &accepted(&r, "/pd/")[1]["body"];
    assert_eq!(
        resolve,
        &serde_json::json!({ "routing_key": PD_KEY, "event_action": "resolve", "dedup_key": dedup })
    );
    wait_for(
        "Jira's comment on the recovery",
        Duration::from_secs(30),
        || (accepted(&r, "/jira/rest/api/2/issue/OPS-1/comment").len() == 2).then_some(()),
    );
    let comment = &accepted(&r, "/jira/rest/api/2/issue/OPS-1/comment")[1]["body"]["body"];
    assert!(
        comment
            .as_str()
            .unwrap()
            .starts_with("test/hello/3.0.0 succeeded"),
        "{comment}"
    );
    wait_for(
        "the webhook to hear of 3.0.0",
        Duration::from_secs(30),
        || {
            accepted(&r, "/hook/")
                .iter()
                .any(|q| {
                    q["body"]["event"] == "succeeded" && q["body"]["rollout"]["version"] == "3.0.0"
                })
                .then_some(())
        },
    );
    let events: Vec<(String, String)> = accepted(&r, "/hook/")
        .iter()
        .map(|q| {
            (
                q["body"]["event"].as_str().unwrap().to_string(),
                q["body"]["rollout"]["version"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    for e in [
        ("succeeded", "1.0.0"),
        ("failed", "2.0.0"),
        ("rolled_back", "2.0.0"),
        ("succeeded", "3.0.0"),
    ] {
        assert!(
            events.contains(&(e.0.to_string(), e.1.to_string())),
            "{e:?} in {events:?}"
        );
    }
    // Still one page and one issue in all; nothing waits; every request was well formed.
    assert_eq!(
        accepted(&r, "/jira/rest/api/2/issue")
            .iter()
            .filter(|q| q["path"] == "/jira/rest/api/2/issue")
            .count(),
        1
    );
    r.assert_well_formed();
    // A receiver has a request before the coordinator has stored its answer: wait for that.
    let mut out = c.cli("watcher", &["notifications"]);
    let limit = std::time::Instant::now() + Duration::from_secs(20);
    while !out.stdout.contains("no notification waits or failed")
        && std::time::Instant::now() < limit
    {
        assert_eq!(out.code, 0, "{}", out.all());
        std::thread::sleep(Duration::from_millis(200));
        out = c.cli("watcher", &["notifications"]);
    }
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains("no notification waits or failed"),
        "{}",
        out.stdout
    );
    let metrics = c
        .http("GET", "/metrics", Some(&token("watcher")), "", false)
        .1;
    let m = metrics.as_str().unwrap();
    assert!(
        m.contains("drover_coordinator_notifications{state=\"waiting\"} 0"),
        "{m}"
    );
}

/// A Slack click: the form body and its headers, signed with `secret` at `ts`.
fn click(
    user: &str,
    action: &str,
    value: &str,
    response_url: &str,
    secret: &str,
    ts: u64,
) -> (Vec<String>, String) {
    let payload = serde_json::json!({
        "type": "block_actions",
        "user": { "id": user, "username": user.to_lowercase(), "team_id": "T000" },
        "api_app_id": "A000",
        "actions": [ { "action_id": action, "block_id": "drover_approval", "value": value,
                       "type": "button", "action_ts": ts.to_string() } ],
        "response_url": response_url,
        "trigger_id": "1.2.3",
    });
    let body = format!("payload={}", receiver::form_encode(&payload.to_string()));
    let base = format!("v0:{ts}:{body}");
    let sig = openssl_hmac(secret, base.as_bytes());
    (
        vec![
            format!("X-Slack-Request-Timestamp: {ts}"),
            format!("X-Slack-Signature: v0={sig}"),
        ],
        body,
    )
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn an_approval_reaches_slack_and_only_a_signed_click_by_an_approver_moves_the_fleet() {
    let f = Fleet::new();
    let r = Receiver::start(f.dir.path(), free_port());
    let c = Coordinator::start(
        f.dir.path(),
        &receiver::channels(f.dir.path(), &r.url(), "1h"),
    );
    // The webhook hangs on every request: a dead receiver must not slow anything else.
    r.script("/hook/", &[(0, None); 20]);
    let policy = "approval: { required: true, approvers: [release-managers], timeout: 10m }\nnotify:\n  - { on: [approval_required, succeeded], to: [deploys-slack] }\n  - { on: [approval_required, started, succeeded], to: [audit-hook] }\n";
    f.pin_env("prod", policy, &f.hello("1.0.0", &[]));
    let (hosts, _agents): (_, Vec<Running>) = start_hosts(&f, &c, &["p1", "p2"], "prod");
    wait_for(
        "the approval request in Slack",
        Duration::from_secs(60),
        || accepted(&r, "/slack/hook/").into_iter().next(),
    );
    assert_eq!(
        c.state("prod", "1.0.0").as_deref(),
        Some("APPROVAL_REQUIRED")
    );
    let msg = &accepted(&r, "/slack/hook/")[0]["body"];
    assert!(
        msg["text"]
            .as_str()
            .unwrap()
            .starts_with("prod/hello/1.0.0 waits for approval"),
        "{msg}"
    );
    let blocks = msg["blocks"].as_array().unwrap();
    let buttons = &blocks
        .iter()
        .find(|b| b["type"] == "actions")
        .expect("Approve and Reject buttons")["elements"];
    assert_eq!(buttons[0]["action_id"], "drover_approve");
    assert_eq!(buttons[1]["action_id"], "drover_reject");
    let value = buttons[0]["value"].as_str().unwrap();
    assert_eq!(value, "prod/hello/1.0.0");
    assert!(
        blocks[1]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["text"] == "*Approvers*\nrelease-managers")
    );
    let respond = format!("{}/slack/response/1", r.url());
    let post = |headers: Vec<String>, body: String| {
        drover_tests::http_request(
            c.port,
            "POST",
            "/v1/integrations/slack/actions",
            &headers,
            body.as_bytes(),
        )
        .expect("coordinator answers")
    };
    let still_waiting = || {
        assert_eq!(
            c.state("prod", "1.0.0").as_deref(),
            Some("APPROVAL_REQUIRED")
        )
    };
    // Forged (another secret), stale (6 minutes old), unsigned: 401, nothing happens.
    let (h, b) = click(
        "U0ALICE",
        "drover_approve",
        value,
        &respond,
        "not-the-secret",
        now_s(),
    );
    assert_eq!(post(h, b).0, 401);
    let (h, b) = click(
        "U0ALICE",
        "drover_approve",
        value,
        &respond,
        SLACK_SIGNING,
        now_s() - 360,
    );
    let (status, text) = post(h, b);
    assert_eq!(status, 401);
    assert!(text.contains("stale"), "{text}");
    let (_, b) = click(
        "U0ALICE",
        "drover_approve",
        value,
        &respond,
        SLACK_SIGNING,
        now_s(),
    );
    assert_eq!(post(vec![], b).0, 401);
    still_waiting();
    // Signed, but by a Slack user drover does not know, a viewer, and an approver of another
    // group: answered in Slack (to them only), audited, nothing moves.
    for user in ["U0NOBODY", "U0WATCH", "U0BOB"] {
        let (h, b) = click(
            user,
            "drover_approve",
            value,
            &respond,
            SLACK_SIGNING,
            now_s(),
        );
        assert_eq!(post(h, b).0, 200, "{user}");
    }
    wait_for("three answers in Slack", Duration::from_secs(20), || {
        (r.on("/slack/response/").len() == 3).then_some(())
    });
    for q in r.on("/slack/response/") {
        assert_eq!(q["body"]["response_type"], "ephemeral", "{q}");
        assert!(
            q["body"]["text"]
                .as_str()
                .unwrap()
                .starts_with("drover: not done."),
            "{q}"
        );
    }
    still_waiting();
    let denied: Vec<Value> = c
        .history()
        .into_iter()
        .filter(|e| e["action"] == "denied")
        .collect();
    let who: BTreeSet<&str> = denied
        .iter()
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert!(
        who.contains("slack:U0NOBODY") && who.contains("watcher") && who.contains("bob"),
        "{denied:?}"
    );
    // Alice approves from Slack: the fleet moves; the message says who approved.
    let (h, b) = click(
        "U0ALICE",
        "drover_approve",
        value,
        &respond,
        SLACK_SIGNING,
        now_s(),
    );
    let (status, _) = post(h.clone(), b.clone());
    assert_eq!(status, 200);
    wait_all(&hosts, "1.0.0", Duration::from_secs(60));
    let approved = c
        .history()
        .into_iter()
        .find(|e| e["action"] == "approve")
        .expect("an approval in the audit");
    assert_eq!(approved["actor"], "alice");
    let answer = wait_for("the message to be updated", Duration::from_secs(20), || {
        r.on("/slack/response/")
            .into_iter()
            .find(|q| q["body"]["replace_original"] == true)
    });
    let text = answer["body"]["text"].as_str().unwrap();
    assert!(
        text.contains("prod/hello/1.0.0: approved by alice (from Slack)"),
        "{text}"
    );
    // A replay of the same click within the 5 minutes approves nothing twice.
    assert_eq!(post(h, b).0, 200);
    let approvals = c
        .history()
        .into_iter()
        .filter(|e| e["action"] == "approve")
        .count();
    assert_eq!(approvals, 1);
    wait_for("the success in Slack", Duration::from_secs(60), || {
        accepted(&r, "/slack/hook/")
            .iter()
            .any(|q| {
                q["body"]["text"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("prod/hello/1.0.0 succeeded")
            })
            .then_some(())
    });
    r.assert_well_formed();
}

/// The pending deliveries, by id, from `drover notifications --json`.
fn pending(c: &Coordinator) -> BTreeMap<String, Value> {
    let out = c.cli("watcher", &["notifications", "--json"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    v["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["id"].as_str().unwrap().to_string(), d.clone()))
        .collect()
}

#[test]
fn deliveries_survive_a_kill_are_retried_through_500_and_429_and_a_dead_receiver_is_given_up() {
    let f = Fleet::new();
    // Nothing listens on the receiver's port yet.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let dead = free_port();
    let mut extra = receiver::channels(f.dir.path(), &url, "1h");
    receiver::secret_file(&f.dir.path().join("dead-secret"), "s");
    extra.push_str(&format!(
        "  - {{ name: dead-hook, type: webhook, url: \"http://127.0.0.1:{dead}/hook\", secret_file: {}, give_up_after: 3s }}\n",
        f.dir.path().join("dead-secret").display()
    ));
    let mut c = Coordinator::start(f.dir.path(), &extra);
    let policy = "approval: { required: true, timeout: 10m }\nnotify:\n  - { on: [approval_required], to: [audit-hook] }\n";
    f.pin_env("prod", policy, &f.hello("1.0.0", &[]));
    f.pin_env("staging", policy, &f.hello("1.0.0", &[]));
    let ids = wait_for(
        "two deliveries tried and waiting",
        Duration::from_secs(60),
        || {
            let p = pending(&c);
            (p.len() == 2 && p.values().all(|d| d["attempts"].as_u64() >= Some(1))).then_some(p)
        },
    );
    for d in ids.values() {
        assert!(
            d["last_error"]
                .as_str()
                .unwrap()
                .contains("error sending request"),
            "{d}"
        );
    }
    let text = c.cli("watcher", &["notifications"]).stdout;
    assert!(
        text.contains("audit-hook") && text.contains("last error:"),
        "{text}"
    );

    // A dead receiver is given up after its channel's give_up_after, audited, listed.
    f.pin_env(
        "qa",
        "notify:\n  - { on: [started], to: [dead-hook] }\n",
        &f.hello("1.0.0", &[]),
    );
    let gave_up = wait_for("the dead hook given up", Duration::from_secs(60), || {
        pending(&c)
            .into_values()
            .find(|d| d["channel"] == "dead-hook" && !d["failed_at_ms"].is_null())
    });
    assert!(
        gave_up["last_error"]
            .as_str()
            .unwrap()
            .contains("gave up after"),
        "{gave_up}"
    );
    let audited = c
        .history()
        .into_iter()
        .find(|e| e["action"] == "notification_failed")
        .expect("audited");
    assert!(
        audited["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("delivery {}", gave_up["id"].as_str().unwrap())),
        "{audited}"
    );
    assert!(
        c.cli("watcher", &["notifications"])
            .stdout
            .contains("FAILED")
    );

    // kill -9 with the two deliveries undelivered; the receiver comes up answering 500, then
    // 429 with Retry-After: 1, then normally.
    c.kill();
    let r = Receiver::start(f.dir.path(), port);
    r.script("/hook/", &[(500, None), (429, Some("1"))]);
    c.restart();
    wait_for("both delivered", Duration::from_secs(60), || {
        (accepted(&r, "/hook/").len() == 2).then_some(())
    });
    // Each delivery id reached the receiver once; the refused attempts were retried.
    let got: Vec<String> = accepted(&r, "/hook/")
        .iter()
        .map(|q| {
            q["headers"]["x-drover-delivery"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let want: Vec<String> = ids.keys().cloned().collect();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, want, "each stored delivery exactly once");
    let all = r.on("/hook/");
    let statuses: Vec<u64> = all.iter().map(|q| q["status"].as_u64().unwrap()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        1,
        "{statuses:?}"
    );
    // The 429's delivery came back no sooner than its Retry-After.
    let refused = all.iter().find(|q| q["status"] == 429).unwrap();
    let id = refused["headers"]["x-drover-delivery"].as_str().unwrap();
    let retried = all
        .iter()
        .find(|q| {
            q["headers"]["x-drover-delivery"] == id && q["at"].as_f64() > refused["at"].as_f64()
        })
        .expect("retried");
    assert!(
        retried["at"].as_f64().unwrap() - refused["at"].as_f64().unwrap() >= 0.95,
        "Retry-After honoured"
    );
    for q in &all {
        assert_eq!(q["body"]["event"], "approval_required");
    }
    r.assert_well_formed();
    wait_for("the outbox to empty", Duration::from_secs(20), || {
        pending(&c)
            .values()
            .all(|d| d["channel"] == "dead-hook")
            .then_some(())
    });
}
