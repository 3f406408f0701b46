use std::collections::BTreeMap;

use super::payload::{self, DELIVERY_HEADER, SIGNATURE_HEADER};
use super::*;

fn notice(event: Event) -> Notice {
    Notice {
        event,
        rollout: 7,
        environment: "prod".into(),
        service: "web".into(),
        version: "2.0".into(),
        commit: "0123456789abcdef0123".into(),
        state: RolloutState::Failed,
        hosts: vec!["h1".into(), "h2".into()],
        host_count: 3,
        reason: Some("2 host(s) failed <script>&".into()),
        approvers: None,
        at_ms: 1_000,
    }
}

fn kinds() -> BTreeMap<String, Kind> {
    [
        ("chat", Kind::Slack),
        ("pager", Kind::Pagerduty),
        ("jira", Kind::Jira),
        ("hook", Kind::Webhook),
    ]
    .into_iter()
    .map(|(n, k)| (n.to_string(), k))
    .collect()
}

fn route(on: &[Event], to: &[&str]) -> Route {
    Route {
        on: on.iter().copied().collect(),
        to: to.iter().map(|s| s.to_string()).collect(),
    }
}

fn ids() -> impl FnMut() -> String {
    let mut n = 0;
    move || {
        n += 1;
        format!("d{n}")
    }
}

fn sends(p: &Plan) -> Vec<(&str, &str)> {
    p.send
        .iter()
        .map(|(c, a, _)| (c.as_str(), a.name()))
        .collect()
}

#[test]
fn a_failure_pages_once_opens_one_issue_and_a_success_resolves_both() {
    let routes = vec![
        route(
            &[Event::Failed, Event::RolledBack],
            &["pager", "jira", "chat"],
        ),
        route(&[Event::Failed], &["chat", "hook", "nowhere"]),
    ];
    let mut incidents = BTreeMap::new();
    let p = plan(&notice(Event::Failed), &routes, &kinds(), &incidents, ids());
    assert_eq!(
        sends(&p),
        vec![
            ("pager", "trigger"),
            ("jira", "create_issue"),
            ("chat", "post"),
            ("hook", "post")
        ],
        "each channel once, in route order"
    );
    assert_eq!(p.unknown, vec!["nowhere".to_string()]);
    assert_eq!(
        p.send[0].1,
        Action::Trigger {
            dedup_key: "drover/prod/web/rollout-7".into()
        }
    );
    assert_eq!(p.open.len(), 2);
    let create_id = p.send[1].2.clone();
    assert_eq!(p.open[1].created_by.as_deref(), Some(create_id.as_str()));
    for i in p.open {
        incidents.insert(i.key(), i);
    }
    // Rolled back, same rollout: no second page; a comment waits for the issue's key.
    let p = plan(
        &notice(Event::RolledBack),
        &routes,
        &kinds(),
        &incidents,
        ids(),
    );
    assert_eq!(sends(&p), vec![("jira", "comment"), ("chat", "post")]);
    assert_eq!(
        p.send[0].1,
        Action::Comment {
            issue: None,
            after: Some(create_id.clone())
        }
    );
    assert!(p.open.is_empty() && p.close.is_empty());
    // The issue is known now; the service succeeds again: resolve and comment, though no
    // route names `succeeded`.
    incidents.get_mut("jira/prod/web").unwrap().issue = Some("OPS-1".into());
    let mut ok = notice(Event::Succeeded);
    ok.rollout = 8;
    let p = plan(&ok, &routes, &kinds(), &incidents, ids());
    assert_eq!(sends(&p), vec![("jira", "comment"), ("pager", "resolve")]);
    assert_eq!(
        p.send[1].1,
        Action::Resolve {
            dedup_key: "drover/prod/web/rollout-7".into()
        },
        "the alert the failure opened"
    );
    assert_eq!(
        p.send[0].1,
        Action::Comment {
            issue: Some("OPS-1".into()),
            after: None
        }
    );
    let mut closed = p.close.clone();
    closed.sort();
    assert_eq!(closed, vec!["jira/prod/web", "pager/prod/web"]);
}

#[test]
fn events_not_routed_reach_nobody_and_pagers_hear_no_chatter() {
    let routes = vec![route(
        &[Event::Started, Event::ApprovalRequired, Event::Succeeded],
        &["pager", "jira", "chat"],
    )];
    let none = BTreeMap::new();
    for e in [Event::Started, Event::ApprovalRequired, Event::Succeeded] {
        let p = plan(&notice(e), &routes, &kinds(), &none, ids());
        assert_eq!(sends(&p), vec![("chat", "post")], "{e}");
        assert!(p.open.is_empty());
    }
    let p = plan(&notice(Event::Failed), &routes, &kinds(), &none, ids());
    assert!(p.send.is_empty(), "failed is not routed: {p:?}");
    // Another service's incident is not resolved by this one's success.
    let mut incidents = BTreeMap::new();
    let i = Incident {
        channel: "pager".into(),
        environment: "prod".into(),
        service: "api".into(),
        rollout: 1,
        dedup_key: "k".into(),
        issue: None,
        created_by: None,
        opened_at_ms: 0,
    };
    incidents.insert(i.key(), i);
    let p = plan(&notice(Event::Succeeded), &[], &kinds(), &incidents, ids());
    assert!(p.send.is_empty() && p.close.is_empty(), "{p:?}");
}

#[test]
fn backoff_doubles_to_a_cap_and_honours_retry_after() {
    let s = Duration::from_secs;
    assert_eq!(backoff(1, None), s(1));
    assert_eq!(backoff(2, None), s(2));
    assert_eq!(backoff(5, None), s(16));
    assert_eq!(backoff(30, None), RETRY_MAX);
    assert_eq!(backoff(1, Some(s(7))), s(7));
    assert_eq!(backoff(1, Some(s(86_400))), RETRY_AFTER_MAX);
    assert_eq!(classify(200, None), Verdict::Ok);
    assert_eq!(classify(202, None), Verdict::Ok);
    assert_eq!(classify(429, Some("3")), Verdict::Retry(Some(s(3))));
    assert_eq!(
        classify(429, Some("Wed, 21 Oct 2015 07:28:00 GMT")),
        Verdict::Retry(None)
    );
    assert_eq!(classify(500, None), Verdict::Retry(None));
    assert_eq!(classify(503, Some("1")), Verdict::Retry(Some(s(1))));
    assert_eq!(classify(400, None), Verdict::Refused);
    assert_eq!(classify(404, None), Verdict::Refused);
    assert_eq!(
        classify(301, None),
        Verdict::Refused,
        "redirects are not followed"
    );
}

fn delivery(event: Event, channel: &str, action: Action) -> Delivery {
    Delivery {
        id: "abc123".into(),
        channel: channel.into(),
        action,
        notice: notice(event),
        created_at_ms: 1_000,
        attempts: 0,
        next_at_ms: 1_000,
        last_error: None,
        failed_at_ms: None,
    }
}

fn channel(name: &str, target: Target) -> Channel {
    Channel {
        name: name.into(),
        target,
        give_up_after: Duration::from_secs(3600),
    }
}

fn header<'a>(r: &'a payload::Request, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn body(r: &payload::Request) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[test]
fn slack_messages_are_block_kit_with_a_fallback_and_buttons_for_approvals() {
    let slack = channel(
        "chat",
        Target::Slack {
            post: SlackPost::Webhook("https://hooks.example/T/B/X".into()),
            signing_secret: Some(b"s".to_vec()),
            users: BTreeMap::new(),
            response_url_base: "https://hooks.example/".into(),
        },
    );
    let mut d = delivery(Event::ApprovalRequired, "chat", Action::Post);
    d.notice.approvers = Some("release-managers".into());
    let r = payload::build(&slack, &d, "https://drover.example");
    assert_eq!(r.url, "https://hooks.example/T/B/X");
    assert_eq!(header(&r, DELIVERY_HEADER), Some("abc123"));
    let b = body(&r);
    let text = b["text"].as_str().unwrap();
    for part in [
        "prod/web/2.0 waits for approval",
        "environment prod",
        "service web",
        "version 2.0",
        "commit 0123456789ab",
        "hosts: h1, h2 and 1 more",
        "https://drover.example/ui/rollouts/7",
        "&lt;script&gt;&amp;",
    ] {
        assert!(text.contains(part), "{part} in {text}");
    }
    assert!(!text.contains("<script>"));
    let blocks = b["blocks"].as_array().unwrap();
    assert_eq!(blocks[0]["type"], "header");
    assert_eq!(blocks[0]["text"]["type"], "plain_text");
    assert_eq!(blocks[1]["type"], "section");
    let fields: Vec<&str> = blocks[1]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        vec![
            "*Environment*\nprod",
            "*Service*\nweb",
            "*Version*\n2.0",
            "*Commit*\n0123456789ab",
            "*Hosts*\nh1, h2 and 1 more",
            "*Approvers*\nrelease-managers"
        ]
    );
    let actions = blocks
        .iter()
        .find(|b| b["type"] == "actions")
        .expect("buttons");
    let buttons = actions["elements"].as_array().unwrap();
    assert_eq!(buttons[0]["action_id"], "drover_approve");
    assert_eq!(buttons[0]["value"], "prod/web/2.0");
    assert_eq!(buttons[0]["style"], "primary");
    assert_eq!(buttons[1]["action_id"], "drover_reject");
    assert_eq!(buttons[1]["style"], "danger");
    // No buttons on other events, nor without a signing secret to verify clicks with.
    let d = delivery(Event::Failed, "chat", Action::Post);
    let b = body(&payload::build(&slack, &d, "https://drover.example"));
    assert!(
        !b["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["type"] == "actions")
    );
    // A bot posts to chat.postMessage with its token and channel.
    let bot = channel(
        "chat",
        Target::Slack {
            post: SlackPost::Bot {
                base_url: "https://slack.example/api/".into(),
                token: "xoxb-1".into(),
                channel: "C123".into(),
            },
            signing_secret: None,
            users: BTreeMap::new(),
            response_url_base: "https://hooks.example/".into(),
        },
    );
    let r = payload::build(&bot, &d, "https://drover.example");
    assert_eq!(r.url, "https://slack.example/api/chat.postMessage");
    assert_eq!(header(&r, "Authorization"), Some("Bearer xoxb-1"));
    assert_eq!(body(&r)["channel"], "C123");
    assert!(!format!("{r:?}").contains("xoxb"), "no secret in Debug");
}

#[test]
fn pagerduty_events_follow_the_events_api_v2() {
    let pd = channel(
        "pager",
        Target::Pagerduty {
            base_url: "https://pd.example/".into(),
            routing_key: "R0UTING".into(),
        },
    );
    let d = delivery(
        Event::Failed,
        "pager",
        Action::Trigger {
            dedup_key: "k7".into(),
        },
    );
    let r = payload::build(&pd, &d, "https://drover.example");
    assert_eq!(r.url, "https://pd.example/v2/enqueue");
    let b = body(&r);
    assert_eq!(b["routing_key"], "R0UTING");
    assert_eq!(b["event_action"], "trigger");
    assert_eq!(b["dedup_key"], "k7");
    assert_eq!(b["payload"]["severity"], "critical");
    assert_eq!(b["payload"]["source"], "drover/prod/web");
    assert!(
        b["payload"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("prod/web/2.0 failed: 2 host(s) failed")
    );
    assert_eq!(
        b["payload"]["custom_details"]["commit"],
        "0123456789abcdef0123"
    );
    assert_eq!(b["payload"]["custom_details"]["hosts"][1], "h2");
    assert_eq!(
        b["links"][0]["href"],
        "https://drover.example/ui/rollouts/7"
    );
    let d = delivery(
        Event::Succeeded,
        "pager",
        Action::Resolve {
            dedup_key: "k7".into(),
        },
    );
    let b = body(&payload::build(&pd, &d, "https://drover.example"));
    assert_eq!(
        b,
        serde_json::json!({ "routing_key": "R0UTING", "event_action": "resolve", "dedup_key": "k7" })
    );
}

#[test]
fn jira_issues_and_comments_follow_rest_v2() {
    let jira = channel(
        "jira",
        Target::Jira {
            base_url: "https://jira.example".into(),
            project: "OPS".into(),
            issue_type: "Bug".into(),
            auth: JiraAuth::Basic {
                email: "ops@example.com".into(),
                token: "t0k".into(),
            },
        },
    );
    let d = delivery(Event::Failed, "jira", Action::CreateIssue);
    let r = payload::build(&jira, &d, "https://drover.example");
    assert_eq!(r.url, "https://jira.example/rest/api/2/issue");
    // base64("ops@example.com:t0k")
    assert_eq!(
        header(&r, "Authorization"),
        Some("Basic b3BzQGV4YW1wbGUuY29tOnQwaw==")
    );
    let b = body(&r);
    assert_eq!(b["fields"]["project"]["key"], "OPS");
    assert_eq!(b["fields"]["issuetype"]["name"], "Bug");
    assert_eq!(b["fields"]["summary"], "prod/web/2.0 failed");
    let desc = b["fields"]["description"].as_str().unwrap();
    assert!(desc.contains("Commit: 0123456789ab"), "{desc}");
    assert!(desc.contains("Rollout: https://drover.example/ui/rollouts/7"));
    let d = delivery(
        Event::Succeeded,
        "jira",
        Action::Comment {
            issue: Some("OPS-9".into()),
            after: None,
        },
    );
    let r = payload::build(&jira, &d, "https://drover.example");
    assert_eq!(r.url, "https://jira.example/rest/api/2/issue/OPS-9/comment");
    assert!(
        body(&r)["body"]
            .as_str()
            .unwrap()
            .starts_with("prod/web/2.0 succeeded")
    );
}

#[test]
fn webhooks_are_signed_like_github() {
    let hook = channel(
        "hook",
        Target::Webhook {
            url: "https://hook.example/in".into(),
            secret: b"It's a Secret to Everybody".to_vec(),
        },
    );
    let d = delivery(Event::RolledBack, "hook", Action::Post);
    let r = payload::build(&hook, &d, "https://drover.example");
    let sig = header(&r, SIGNATURE_HEADER).unwrap();
    assert_eq!(
        sig,
        format!(
            "sha256={}",
            crate::webhook::hmac_hex(b"It's a Secret to Everybody", &r.body)
        )
    );
    assert!(crate::webhook::hmac_matches(
        b"It's a Secret to Everybody",
        &r.body,
        sig.strip_prefix("sha256=").unwrap()
    ));
    assert_eq!(header(&r, "X-Drover-Event"), Some("rolled_back"));
    let b = body(&r);
    assert_eq!(b["delivery"], "abc123");
    assert_eq!(b["event"], "rolled_back");
    assert_eq!(b["rollout"]["id"], 7);
    assert_eq!(b["rollout"]["version"], "2.0");
    assert_eq!(b["host_count"], 3);
}

#[test]
fn slack_signatures_are_checked_with_their_timestamp() {
    let secret = b"8f742231b10e8888abcd99yyyzzz85a5";
    let body = b"token=x&payload=%7B%7D";
    let now = 1_531_420_618;
    let sig = |ts: &str| {
        let mut base = format!("v0:{ts}:").into_bytes();
        base.extend_from_slice(body);
        format!("v0={}", crate::webhook::hmac_hex(secret, &base))
    };
    let ts = now.to_string();
    assert_eq!(
        slack::verify(secret, Some(&ts), Some(&sig(&ts)), body, now),
        Ok(())
    );
    assert_eq!(
        slack::verify(secret, Some(&ts), Some(&sig(&ts)), body, now + 299),
        Ok(())
    );
    assert_eq!(
        slack::verify(secret, Some(&ts), Some(&sig(&ts)), body, now + 301),
        Err(slack::Refused::Stale)
    );
    assert_eq!(
        slack::verify(b"other", Some(&ts), Some(&sig(&ts)), body, now),
        Err(slack::Refused::Mismatch)
    );
    assert_eq!(
        slack::verify(secret, Some(&ts), Some(&sig(&ts)), b"token=y", now),
        Err(slack::Refused::Mismatch)
    );
    // The timestamp is signed: moving it breaks the signature.
    let later = (now + 10).to_string();
    assert_eq!(
        slack::verify(secret, Some(&later), Some(&sig(&ts)), body, now),
        Err(slack::Refused::Mismatch)
    );
    assert_eq!(
        slack::verify(secret, None, Some(&sig(&ts)), body, now),
        Err(slack::Refused::Unsigned)
    );
    assert_eq!(
        slack::verify(secret, Some("soon"), Some(&sig(&ts)), body, now),
        Err(slack::Refused::Stale)
    );
    assert_eq!(
        slack::verify(
            secret,
            Some(&ts),
            Some(sig(&ts).trim_start_matches("v0=")),
            body,
            now
        ),
        Err(slack::Refused::Mismatch)
    );
}

fn form(payload: serde_json::Value) -> Vec<u8> {
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", &payload.to_string())
        .finish()
        .into_bytes()
}

#[test]
fn slack_clicks_are_read_strictly() {
    let ok = serde_json::json!({
        "type": "block_actions",
        "user": { "id": "U0123", "username": "alice" },
        "actions": [ { "action_id": "drover_approve", "value": "prod/web/2.0", "type": "button" } ],
        "response_url": "https://hooks.example/actions/1",
        "message": { "blocks": [] }
    });
    let c = slack::parse(&form(ok.clone())).unwrap();
    assert_eq!(
        c,
        slack::Click {
            user: "U0123".into(),
            approve: true,
            environment: "prod".into(),
            service: "web".into(),
            version: "2.0".into(),
            response_url: Some("https://hooks.example/actions/1".into()),
        }
    );
    let with = |path: &str, v: serde_json::Value| {
        let mut p = ok.clone();
        *p.pointer_mut(path).unwrap() = v;
        slack::parse(&form(p)).unwrap_err()
    };
    assert!(with("/type", "view_submission".into()).contains("block_actions"));
    assert!(with("/actions/0/action_id", "other".into()).contains("not drover's"));
    assert!(with("/actions/0/value", "prod/web".into()).contains("environment/service/version"));
    assert!(
        with("/actions/0/value", "prod/../web/2".into()).contains("environment/service/version")
    );
    assert!(with("/actions/0/value", "prod/we b/2".into()).contains("not a valid name"));
    assert!(with("/actions", serde_json::json!([])).contains("0 actions"));
    assert!(
        slack::parse(b"payload=%7Bnot json")
            .unwrap_err()
            .contains("not Slack's JSON")
    );
    assert!(
        slack::parse(b"nothing=1")
            .unwrap_err()
            .contains("no `payload`")
    );
    // Reject.
    let mut p = ok;
    p["actions"][0]["action_id"] = "drover_reject".into();
    assert!(!slack::parse(&form(p)).unwrap().approve);
}
