use std::collections::BTreeMap;

use super::html::{self, Viewer};
use super::parse_time;
use crate::view::Filter;
use crate::wire::{
    AuditEntry, Chart, HostView, MetricSeries, Policy, Risk, RolloutKind, RolloutState,
    RolloutView, ServiceReport, Status, TrafficPoint,
};

fn viewer(role: &'static str, approve: bool) -> Viewer {
    Viewer {
        name: "alice".into(),
        role,
        may_approve: approve,
        groups: vec!["release-managers".into()],
        csrf: "c5rf".into(),
    }
}

fn host(i: usize, last_error: Option<&str>) -> HostView {
    HostView {
        host: format!("web-{i:05}"),
        environment: if i % 2 == 0 { "prod" } else { "staging" }.into(),
        labels: BTreeMap::from([("role".to_string(), "web".to_string())]),
        agent_version: Some("0.1.0".into()),
        services: vec![ServiceReport {
            service: "hello".into(),
            desired: Some("2.0".into()),
            actual: Some(if i % 10 == 0 { "1.0" } else { "2.0" }.into()),
            healthy: i % 7 != 0,
            phase: None,
            last_error: last_error.map(str::to_string),
            failed: None,
        }],
        last_seen_ms: 1_000,
        stale: false,
    }
}

/// A status of `n` hosts and one rollout waiting for approval.
pub(crate) fn status(n: usize) -> Status {
    Status {
        desired: None,
        refused: None,
        git_error: None,
        overrides: vec![],
        hosts: (0..n).map(|i| host(i, None)).collect(),
        rollouts: vec![rollout(RolloutState::ApprovalRequired)],
    }
}

fn rollout(state: RolloutState) -> RolloutView {
    RolloutView {
        id: 3,
        environment: "prod".into(),
        service: "hello".into(),
        version: "2.0".into(),
        kind: RolloutKind::Deploy,
        attempt: 1,
        trigger: "commit abc".into(),
        state,
        policy: Policy {
            max_parallel: 2,
            max_failures: 0,
            approval_required: true,
            approvers: vec!["release-managers".into()],
            approval_timeout_ms: 1000,
            promotion_requires: None,
            rollbacks_need_approval: false,
            approve_after_first_batch: false,
        },
        commit: "abcdef0123456789".into(),
        commit_time_ms: 0,
        leases: 1,
        succeeded: vec!["web-00002".into()],
        failed: vec![],
        reverted: vec![],
        verified: vec![],
        verdicts: BTreeMap::from([(
            "web-00002".to_string(),
            "medium: latency_p99 median 0.21 vs 0.18, p=0.04 <b>".to_string(),
        )]),
        charts: vec![Chart {
            host: "web-00002".into(),
            at_ms: 1_000,
            risk: Risk::Medium,
            metrics: vec![MetricSeries {
                name: "latency_p99".into(),
                judgement: "marginal".into(),
                median: Some(0.21),
                baseline_median: Some(0.18),
                p_value: Some(0.04),
                samples: vec![0.2, 0.21, 0.22, 0.21],
                baseline: vec![0.18, 0.17, 0.19],
            }],
        }],
        traffic: vec![
            TrafficPoint {
                at_ms: 1_000,
                host: "ecs-prod".into(),
                percent: 10,
            },
            TrafficPoint {
                at_ms: 61_000,
                host: "ecs-prod".into(),
                percent: 50,
            },
        ],
        decision: None,
        reason: Some("waits for release-managers".into()),
        waiting_for: None,
        created_at_ms: 0,
        updated_at_ms: 0,
        job: false,
    }
}

#[test]
fn text_from_hosts_and_git_is_escaped_everywhere() {
    let evil = "<script>alert(1)</script><img src=x onerror=alert(2)>\"'&";
    let mut s = status(3);
    s.hosts[0] = host(0, Some(evil));
    s.hosts[1].host = "<b>h</b>".into();
    s.rollouts[0].reason = Some(evil.into());
    s.rollouts[0].charts[0].host = evil.into();
    s.rollouts[0].charts[0].metrics[0].name = evil.into();
    s.rollouts[0].charts[0].metrics[0].judgement = evil.into();
    s.rollouts[0].traffic[0].host = evil.into();
    let v = viewer("admin", true);
    let pages = [
        html::fleet(&s, &Filter::default(), 1, &v, 2_000),
        html::rollouts(&s, &v),
        html::approvals(&s, &v, Some(evil)),
        html::verification(&s.rollouts, &v),
        html::rollout(
            &s.rollouts[0],
            &s,
            &[AuditEntry {
                seq: 1,
                at_ms: 0,
                actor: evil.into(),
                action: "x".into(),
                subject: "prod/hello/2.0".into(),
                detail: evil.into(),
            }],
            &v,
        ),
        html::login(Some(evil)),
    ];
    for p in &pages {
        assert!(!p.contains("<script>alert"), "{p}");
        assert!(!p.contains("<img src=x"), "{p}");
        assert!(!p.contains("<b>h</b>"));
        assert!(!p.contains("0.04 <b>"), "verdict markup escaped");
        // The one script is the asset; no inline script or style anywhere.
        assert_eq!(p.matches("<script").count(), 1);
        assert!(p.contains("<script src=\"/ui/assets/live.js\" defer></script>"));
        assert!(!p.contains("style=") && !p.contains("<style") && !p.contains("onclick"));
    }
    assert!(pages[0].contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert_eq!(html::esc("a\"b'c"), "a&quot;b&#39;c");
}

#[test]
fn the_fleet_is_counted_whole_and_shown_a_page_at_a_time() {
    let s = status(250);
    let v = viewer("viewer", false);
    let p1 = html::fleet(&s, &Filter::default(), 1, &v, 2_000);
    assert!(p1.contains("<b>250</b> hosts"));
    assert!(p1.contains("Rows 1–100 of 250, page 1 of 3"));
    assert!(p1.contains("web-00099") && !p1.contains("web-00100"));
    assert!(p1.contains("href=\"/ui/fleet?page=2\">Next"));
    let p3 = html::fleet(&s, &Filter::default(), 9, &v, 2_000);
    assert!(p3.contains("Rows 201–250 of 250, page 3 of 3"), "clamped");
    // 1 in 7 hosts is down, 1 in 10 drifted (of 250: 36 down, 25 drifted).
    assert!(
        p1.contains("<li class=\"st-down\"><b>36</b> down</li>"),
        "{p1}"
    );
    assert!(p1.contains("<li class=\"st-drifted\"><b>25</b> drifted</li>"));
    let f = Filter {
        environments: vec!["prod".into()],
        ..Filter::default()
    };
    let prod = html::fleet(&s, &f, 1, &v, 2_000);
    assert!(prod.contains("<b>125</b> hosts"));
    assert!(prod.contains("href=\"/ui/fleet?env=prod&page=2\""));
}

#[test]
fn only_those_who_may_decide_get_buttons() {
    let s = status(1);
    let with = |v: &Viewer| html::approvals(&s, v, None);
    assert!(with(&viewer("approver", true)).contains("/ui/approvals/prod/hello/2.0/approve"));
    assert!(with(&viewer("approver", true)).contains("name=\"csrf\" value=\"c5rf\""));
    assert!(!with(&viewer("viewer", false)).contains("<button type=\"submit\" class=\"primary\""));
    let mut other = viewer("approver", true);
    other.groups = vec!["qa".into()];
    assert!(
        !with(&other).contains("/approve\""),
        "another group's approver"
    );
    assert!(with(&viewer("admin", true)).contains("/approve\""));
}

#[test]
fn the_machine_marks_where_the_rollout_is() {
    let m = html::machine(RolloutState::Running);
    assert!(m.contains("<li class=\"past\">PENDING</li>"));
    assert!(m.contains("<li class=\"now\">RUNNING</li>"));
    assert!(m.contains("<li class=\"\">SUCCESS</li>"));
    let f = html::machine(RolloutState::RollingBack);
    assert!(f.contains("<li class=\"now bad\">ROLLING_BACK</li>"));
}

#[test]
fn history_exports_are_safe_for_spreadsheets() {
    let e = AuditEntry {
        seq: 7,
        at_ms: 1_795_742_138_005,
        actor: "=HYPERLINK(\"x\")".into(),
        action: "transition".into(),
        subject: "prod/hello/2.0".into(),
        detail: "a \"quoted\", text".into(),
    };
    assert_eq!(
        html::history_csv(&[e]),
        "seq,time,actor,action,subject,detail\r\n7,\"2026-11-27T01:15:38.005Z\",\"'=HYPERLINK(\"\"x\"\")\",\"transition\",\"prod/hello/2.0\",\"a \"\"quoted\"\", text\"\r\n"
    );
}

#[test]
fn history_times_are_read_as_utc() {
    assert_eq!(parse_time("1970-01-01"), Some(0));
    assert_eq!(parse_time("2026-11-27T01:15:38"), Some(1_795_742_138_000));
    assert_eq!(parse_time("2026-11-27 01:15"), Some(1_795_742_100_000));
    assert_eq!(parse_time("2000-02-29"), Some(951_782_400_000));
    for bad in [
        "",
        "yesterday",
        "2026-13-01",
        "2026-11-27T25:00",
        "2026-11",
        "1969-12-31",
    ] {
        assert_eq!(parse_time(bad), None, "{bad}");
    }
    let f = html::HistoryFilter {
        env: "prod".into(),
        service: "hello".into(),
        since_ms: Some(10),
        ..Default::default()
    };
    let e = |subject: &str, at_ms| AuditEntry {
        seq: 1,
        at_ms,
        actor: "a".into(),
        action: "x".into(),
        subject: subject.into(),
        detail: String::new(),
    };
    assert!(f.keeps(&e("prod/hello/2.0", 10)));
    assert!(!f.keeps(&e("prod/hello/2.0", 9)));
    assert!(!f.keeps(&e("staging/hello/2.0", 10)));
    assert!(!f.keeps(&e("prod/api/2.0", 10)));
}

#[test]
fn traffic_is_drawn_as_a_step_line_and_listed() {
    let s = status(1);
    let p = html::rollouts(&s, &viewer("viewer", false));
    // 10 % at 1 s, 50 % at 61 s: a move to 10 %, a step up to 50 %, held to the right edge.
    let svg = super::chart::traffic(&s.rollouts[0].traffic);
    assert!(p.contains(&svg));
    let d = svg
        .split("<path class=\"weight s0\" d=\"")
        .nth(1)
        .and_then(|x| x.split('"').next())
        .unwrap();
    // y of 10 % = 8 + 120 − 12 = 116; of 50 % = 68; x of the second point = 52 + 60/66 × 480.
    assert_eq!(
        d, "M52.0,116.0 L488.4,116.0 L488.4,68.0 L532.0,68.0",
        "{svg}"
    );
    assert!(svg.contains("<li>1970-01-01 00:00:01 10%</li><li>1970-01-01 00:01:01 50%</li>"));
    assert!(svg.contains(">00:00:01</text>") && svg.contains(">00:01:01</text>"));
    // No traffic, no chart.
    assert_eq!(super::chart::traffic(&[]), "");
}

#[test]
fn a_metric_is_drawn_against_its_baseline_with_medians_and_p_value() {
    let s = status(1);
    let m = &s.rollouts[0].charts[0].metrics[0];
    let svg = super::chart::series(m);
    let polyline = |class: &str| {
        svg.split(&format!("<polyline class=\"{class}\" points=\""))
            .nth(1)
            .and_then(|x| x.split('"').next())
            .unwrap()
            .split(' ')
            .count()
    };
    assert_eq!(polyline("new"), 4);
    assert_eq!(polyline("base"), 3);
    assert!(svg.contains("<line class=\"new-median\""));
    assert!(svg.contains("<line class=\"base-median\""));
    assert!(
        svg.contains("new</span> median 0.21 (4 samples)")
            && svg.contains("baseline</span> median 0.18 (3 samples)")
            && svg.contains("p-value 4.00e-2"),
        "{svg}"
    );
    // The verification page and the rollout's page both draw it.
    let v = viewer("viewer", false);
    assert!(html::verification(&s.rollouts, &v).contains(&svg));
    assert!(html::rollout(&s.rollouts[0], &s, &[], &v).contains(&svg));
    // Degenerate input draws without NaN: all samples equal, no baseline, no medians.
    let flat = MetricSeries {
        name: "x".into(),
        judgement: "inconclusive".into(),
        median: None,
        baseline_median: None,
        p_value: None,
        samples: vec![3.0; 5],
        baseline: vec![],
    };
    let svg = super::chart::series(&flat);
    assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    assert!(!svg.contains("class=\"base\" points") && !svg.contains("median\" x1"));
    let one = MetricSeries {
        samples: vec![],
        ..flat
    };
    assert!(!super::chart::series(&one).contains("NaN"));
}

#[test]
fn failed_logins_past_ten_a_minute_make_logins_wait_for_the_next_minute() {
    let mut f = super::Failures::default();
    let t0 = 1_000_000;
    for i in 0..super::MAX_FAILED_LOGINS {
        assert_eq!(f.wait(t0 + u64::from(i)), None);
        f.add(t0 + u64::from(i));
    }
    assert_eq!(f.wait(t0 + 10), Some(59_990));
    assert_eq!(f.wait(t0 + 59_999), Some(1));
    // A new minute starts afresh.
    assert_eq!(f.wait(t0 + 60_000), None);
    f.add(t0 + 60_000);
    assert_eq!(f.count, 1);
    assert_eq!(f.wait(t0 + 60_001), None);
}
