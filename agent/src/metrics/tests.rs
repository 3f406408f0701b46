use super::*;
use crate::report::tests::status;
use crate::vm::VmFailure;

fn line<'a>(text: &'a str, start: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no line starting {start}:\n{text}"))
}

#[test]
fn deploy_endings_are_counted_by_outcome_and_waiting_is_not_a_deploy() {
    let m = Metrics::default();
    let deployed = Reconciled::Deployed {
        version: "2".into(),
        from: Some("1".into()),
        note: None,
    };
    let rolled = Reconciled::RolledBack {
        version: "3".into(),
        to: Some("2".into()),
        error: "health".into(),
    };
    m.ended("hello", &deployed);
    m.ended("hello", &rolled);
    m.ended("hello", &rolled);
    for quiet in [
        Reconciled::UpToDate {
            version: "2".into(),
        },
        Reconciled::Waiting {
            version: "3".into(),
            reason: "approval".into(),
            retry_after_ms: 1000,
        },
        Reconciled::SkippedFailed {
            version: "3".into(),
            reason: "failed".into(),
        },
    ] {
        m.ended("hello", &quiet);
    }
    let c = m.snapshot();
    assert_eq!(c.deploys.get(&("hello".into(), "deployed")), Some(&1));
    assert_eq!(c.deploys.get(&("hello".into(), "rolled_back")), Some(&2));
    assert_eq!(c.deploys.len(), 2);
    assert_eq!(c.rollbacks.get("hello"), Some(&2));
    assert!(c.last_success.contains_key("hello"));
}

#[test]
fn histograms_are_cumulative_and_end_with_the_count() {
    let m = Metrics::default();
    for secs in [0.05, 0.7, 0.7, 45.0, 9999.0] {
        m.phase("hello", "fetch", secs);
    }
    let text = render(&status(), &m.snapshot());
    let b = |le: &str| {
        line(
            &text,
            &format!(
                "drover_deploy_phase_duration_seconds_bucket{{service=\"hello\",phase=\"fetch\",le=\"{le}\"}}"
            ),
        )
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string()
    };
    assert_eq!(b("0.1"), "1");
    assert_eq!(b("0.5"), "1");
    assert_eq!(b("1"), "3");
    assert_eq!(b("60"), "4");
    assert_eq!(b("600"), "4");
    assert_eq!(b("+Inf"), "5");
    assert!(text.contains(
        "drover_deploy_phase_duration_seconds_count{service=\"hello\",phase=\"fetch\"} 5\n"
    ));
    assert!(text.contains(
        "drover_deploy_phase_duration_seconds_sum{service=\"hello\",phase=\"fetch\"} 10045.450\n"
    ));
}

#[test]
fn the_state_gives_running_failed_and_converged() {
    let mut st = status();
    let m = Metrics::default();
    // hello runs 1.0 and rolls back from 2.0; it is asked for 2.0.
    m.desired([("hello", "2.0"), ("other", "5")]);
    let text = render(&st, &m.snapshot());
    assert!(
        text.contains("drover_service_desired_version_info{service=\"hello\",version=\"2.0\"} 1\n")
    );
    assert!(
        text.contains("drover_service_running_version_info{service=\"hello\",version=\"1.0\"} 1\n")
    );
    assert!(text.contains("drover_service_converged{service=\"hello\"} 0\n"));
    assert!(text.contains("drover_service_deploying{service=\"hello\"} 1\n"));
    // A desired service with no state yet is not converged; an unreadable one is left out.
    assert!(text.contains("drover_service_converged{service=\"other\"} 0\n"));
    assert!(!text.contains("service=\"odd\""), "{text}");
    assert!(
        !text.contains("drover_service_failed_version_info{"),
        "{text}"
    );
    // The rollback ends: 2.0 is marked failed; asked for 1.0, the host has converged.
    if let Entry::Read(s) = st.services.get_mut("hello").unwrap() {
        s.deploying = None;
        s.failed = Some(VmFailure {
            version: "2.0".into(),
            sha256: crate::spec::Digest::parse(&"a".repeat(64)).unwrap(),
            reason: "health".into(),
            at: "2026-12-02T10:00:00.000Z".into(),
        });
    }
    m.desired([("hello", "1.0")]);
    let text = render(&st, &m.snapshot());
    assert!(
        text.contains("drover_service_failed_version_info{service=\"hello\",version=\"2.0\"} 1\n")
    );
    assert!(text.contains("drover_service_converged{service=\"hello\"} 1\n"));
    assert!(text.contains("drover_service_deploying{service=\"hello\"} 0\n"));
    assert!(!text.contains("service=\"other\""), "{text}");
}

#[test]
fn git_and_coordinator_series_appear_once_known() {
    let m = Metrics::default();
    let text = render(&status(), &m.snapshot());
    assert!(text.contains("drover_git_fetch_errors_total 0\n"));
    assert!(!text.contains("drover_git_commit_timestamp_seconds "));
    assert!(!text.contains("drover_agent_coordinator_up"));
    m.fetched(1_700_000_000_500);
    m.fetch_failed();
    m.coordinator(true);
    m.coordinator(false);
    let text = render(&status(), &m.snapshot());
    assert!(text.contains("drover_git_fetch_errors_total 1\n"));
    assert!(text.contains("drover_git_commit_timestamp_seconds 1700000000.500\n"));
    assert!(line(&text, "drover_git_last_fetch_timestamp_seconds ").len() > 40);
    assert!(text.contains("drover_agent_coordinator_up 0\n"));
    assert!(text.contains("drover_agent_coordinator_failures_total 1\n"));
    assert!(
        line(
            &text,
            "drover_agent_coordinator_last_contact_timestamp_seconds "
        )
        .len()
            > 50
    );
}

#[test]
fn label_values_are_escaped_and_every_family_is_typed() {
    let mut st = status();
    st.host = "a\"b\\c\nd".into();
    let m = Metrics::default();
    m.phase("hello", "fetch", 1.0);
    let text = render(&st, &m.snapshot());
    assert!(text.contains("host=\"a\\\"b\\\\c\\nd\""), "{text}");
    // Every sample line belongs to a family announced by # TYPE just before its samples.
    let mut family = String::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            family = rest.split(' ').next().unwrap().to_string();
        } else if !l.starts_with('#') {
            assert!(l.starts_with(&family), "{l} outside its family {family}");
            let value = l.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{l}");
        }
    }
}

#[test]
fn series_from_git_are_bounded() {
    let m = Metrics::default();
    for i in 0..(MAX_SERIES + 10) {
        m.phase(&format!("s{i}"), "fetch", 1.0);
    }
    assert_eq!(m.snapshot().phases.len(), MAX_SERIES);
    // An existing series still counts.
    m.phase("s0", "fetch", 1.0);
    assert_eq!(
        m.snapshot().phases[&("s0".to_string(), "fetch".to_string())].count,
        2
    );
}
