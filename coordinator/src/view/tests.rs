use std::collections::BTreeMap;

use super::*;

fn svc(service: &str, desired: &str, actual: &str, healthy: bool) -> ServiceReport {
    ServiceReport {
        service: service.into(),
        desired: Some(desired.into()),
        actual: Some(actual.into()),
        healthy,
        phase: None,
        last_error: None,
        failed: None,
    }
}

fn host(name: &str, env: &str, role: &str, services: Vec<ServiceReport>) -> HostView {
    HostView {
        host: name.into(),
        environment: env.into(),
        labels: BTreeMap::from([("role".to_string(), role.to_string())]),
        agent_version: None,
        services,
        last_seen_ms: 0,
        stale: false,
    }
}

const LONG_VERSION: &str = "1.0.0-rc.1+build.20261203.abcdef";
const ERROR: &str = "check: health check http://127.0.0.1:8080/health answered HTTP 500, expected 200, for 30s; rolled back to 1.0.0";

fn fleet() -> Status {
    let mut failed = svc("api", "2.0.0", "1.0.0", true);
    failed.failed = Some("2.0.0".into());
    failed.last_error = Some(ERROR.into());
    let mut busy = svc("web", LONG_VERSION, "1.0.0", true);
    busy.phase = Some("check".into());
    let mut stale = host("db-1", "prod", "db", vec![svc("db", "5", "5", true)]);
    stale.stale = true;
    Status {
        desired: Some(crate::wire::DesiredView {
            commit: "dfb27dc3e77c0123456789".into(),
            commit_time_ms: 1_764_700_000_000,
            fetched_at_ms: 1_764_700_001_000,
        }),
        refused: None,
        git_error: None,
        overrides: Vec::new(),
        hosts: vec![
            host("web-1", "prod", "web", vec![busy, failed]),
            host(
                "web-2",
                "staging",
                "web",
                vec![svc("web", "1.0.0", "1.0.0", true)],
            ),
            host(
                "web-3",
                "prod",
                "web",
                vec![svc("web", "1.0.0", "1.0.0", false)],
            ),
            stale,
        ],
        rollouts: Vec::new(),
    }
}

fn rows(s: &Status) -> Vec<String> {
    s.hosts
        .iter()
        .flat_map(|h| {
            h.services
                .iter()
                .map(|v| format!("{}/{}", h.host, v.service))
        })
        .collect()
}

#[test]
fn states_of_a_row() {
    let s = fleet();
    let of = |h: usize, v: usize| RowState::of(&s.hosts[h], &s.hosts[h].services[v]);
    assert_eq!(of(0, 0), [RowState::Deploying, RowState::Drifted]);
    assert_eq!(of(0, 1), [RowState::Failed, RowState::Drifted]);
    assert_eq!(of(1, 0), [RowState::Ok]);
    assert_eq!(of(2, 0), [RowState::Down]);
    assert_eq!(of(3, 0), [RowState::Stale]);
    assert_eq!("drifted".parse::<RowState>(), Ok(RowState::Drifted));
    let e = "broken".parse::<RowState>().unwrap_err();
    assert!(
        e.contains("use one of ok, deploying, failed, down, stale, drifted"),
        "{e}"
    );
}

#[test]
fn filters_combine_environment_service_label_and_state() {
    let s = fleet();
    let f = |f: Filter| rows(&filter(&s, &f));
    assert_eq!(f(Filter::default()).len(), 5);
    let prod = Filter {
        environments: vec!["prod".into()],
        ..Filter::default()
    };
    assert_eq!(f(prod), ["web-1/web", "web-1/api", "web-3/web", "db-1/db"]);
    let web_staging = Filter {
        environments: vec!["staging".into()],
        services: vec!["web".into()],
        ..Filter::default()
    };
    assert_eq!(f(web_staging), ["web-2/web"]);
    let db = Filter {
        labels: vec!["role=db".parse().unwrap()],
        ..Filter::default()
    };
    assert_eq!(f(db), ["db-1/db"]);
    let trouble = Filter {
        states: vec![RowState::Failed, RowState::Down],
        ..Filter::default()
    };
    assert_eq!(f(trouble), ["web-1/api", "web-3/web"]);
    let none = Filter {
        labels: vec!["role=web".parse().unwrap(), "zone=b".parse().unwrap()],
        ..Filter::default()
    };
    assert!(f(none).is_empty());
    assert!("role".parse::<Label>().unwrap_err().contains("KEY=VALUE"));
    assert!("=web".parse::<Label>().is_err());
}

#[test]
fn wrapping_keeps_every_word_within_the_width() {
    let text = "a bb ccc dddddddddddddddddddddddd e";
    let lines = wrap(text, Some(10));
    assert!(lines.iter().all(|l| l.chars().count() <= 10), "{lines:?}");
    assert_eq!(lines.concat().replace(' ', ""), text.replace(' ', ""));
    assert_eq!(wrap(text, None), [text]);
    assert_eq!(wrap("", Some(10)), [""]);
    assert_eq!(wrap("exactly-10 x", Some(10)), ["exactly-10", "x"]);
}

#[test]
fn the_table_fits_the_terminal_and_cuts_neither_versions_nor_reasons() {
    let s = fleet();
    for width in [50, 60, 100, 140] {
        let t = status_table(&s, Some(width));
        for l in t.lines() {
            assert!(l.chars().count() <= width, "{width}: {l:?}\n{t}");
        }
        assert!(t.contains(LONG_VERSION), "{t}");
        let words: String = t.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(words.contains(ERROR), "{width}: the reason whole:\n{t}");
    }
    // Not a terminal: one line per row, the reason whole on it.
    let t = status_table(&s, None);
    assert!(
        t.lines().any(|l| l.contains("web-1") && l.ends_with(ERROR)),
        "{t}"
    );
    // Narrower than the columns: a block per row.
    let t = status_table(&s, Some(50));
    assert!(
        t.contains("  web-1 (prod) web: ok\n      desired 1.0.0-rc.1"),
        "{t}"
    );
    // Wide enough: the note is a column.
    let t = status_table(&s, Some(200));
    assert!(
        t.lines()
            .any(|l| l.trim_start().starts_with("HOST") && l.ends_with("NOTE")),
        "{t}"
    );
}
