//! The agent's Prometheus endpoint, scraped by a real Prometheus through a deploy and a
//! rollback; the sample rules file checked by promtool.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use drover_tests::host::Fleet;
use drover_tests::prometheus::Prometheus;
use drover_tests::{free_port, http_request, wait_for, workspace};

#[test]
fn prometheus_follows_a_deploy_and_a_rollback_on_the_agent() {
    let f = Fleet::new();
    let port = free_port();
    let token = f.dir.path().join("metrics-token");
    std::fs::write(&token, "scrape-s3cret\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let h = f.host_with(
        "h1",
        "test",
        &format!(
            "metrics: {{ listen: \"127.0.0.1:{port}\", token_file: {} }}\n",
            token.display()
        ),
    );
    f.pin(&f.hello("1.0.0", &[]));
    let agent = h.spawn(&[]);
    h.wait_current("1.0.0", Duration::from_secs(30));
    let prom = Prometheus::start_with(
        f.dir.path(),
        &format!(
            "  - job_name: drover-agent\n    authorization: {{ credentials_file: {} }}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
            token.display()
        ),
    );
    let q = |s: &str| s.replace("$", r#"service="hello""#);
    prom.wait_for_value(&q("drover_deploys_total{$,outcome=\"deployed\"}"), 1.0);
    prom.wait_for_value(&q("drover_service_converged{$}"), 1.0);
    prom.wait_for_value(
        &q("drover_service_running_version_info{$,version=\"1.0.0\"}"),
        1.0,
    );
    prom.wait_for_value(
        &q("drover_service_desired_version_info{$,version=\"1.0.0\"}"),
        1.0,
    );
    prom.wait_for_value(r#"up{job="drover-agent"}"#, 1.0);

    // A broken version: deployed, unhealthy, rolled back.
    f.pin(&f.hello("2.0.0", &["FAIL_HEALTH=1"]));
    prom.wait_for_value(&q("drover_deploys_total{$,outcome=\"rolled_back\"}"), 1.0);
    prom.wait_for_value(&q("drover_rollbacks_total{$}"), 1.0);
    prom.wait_for_value(
        &q("drover_service_failed_version_info{$,version=\"2.0.0\"}"),
        1.0,
    );
    prom.wait_for_value(
        &q("drover_service_desired_version_info{$,version=\"2.0.0\"}"),
        1.0,
    );
    prom.wait_for_value(
        &q("drover_service_running_version_info{$,version=\"1.0.0\"}"),
        1.0,
    );
    prom.wait_for_value(&q("drover_service_converged{$}"), 0.0);
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    // The phases of both deploys were timed: two fetches; a health check of each version.
    prom.wait_for_value(
        &q("drover_deploy_phase_duration_seconds_count{$,phase=\"fetch\"}"),
        2.0,
    );
    prom.wait_for_value(
        &q("drover_deploy_phase_duration_seconds_count{$,phase=\"rollback\"}"),
        1.0,
    );
    let p90 = prom.query(&q(
        "histogram_quantile(0.9, drover_deploy_phase_duration_seconds_bucket{$,phase=\"fetch\"})",
    ));
    assert!(
        p90.len() == 1 && p90[0].1 > 0.0 && p90[0].1 <= 600.0,
        "{p90:?}"
    );
    // Git: the commit's age is known, no fetch failed.
    let age = prom.query("time() - drover_git_commit_timestamp_seconds");
    assert!(
        age.len() == 1 && (0.0..600.0).contains(&age[0].1),
        "{age:?}"
    );
    prom.wait_for_value("drover_git_fetch_errors_total", 0.0);
    // No coordinator is configured: no coordinator series.
    assert!(prom.query("drover_agent_coordinator_up").is_empty());

    // Without the token, or with another one, nothing is served; other paths are not found.
    let (status, body) = http_request(port, "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(status, 401, "{body}");
    let wrong = vec!["Authorization: Bearer scrape-s3cre".to_string()];
    assert_eq!(
        http_request(port, "GET", "/metrics", &wrong, b"")
            .unwrap()
            .0,
        401
    );
    let right = vec!["Authorization: Bearer scrape-s3cret".to_string()];
    let (status, body) = http_request(port, "GET", "/metrics", &right, b"").unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("# TYPE drover_deploys_total counter"),
        "{body}"
    );
    assert!(!body.contains("scrape-s3cret"));
    assert_eq!(http_request(port, "GET", "/", &right, b"").unwrap().0, 404);
    assert_eq!(
        http_request(port, "POST", "/metrics", &right, b"")
            .unwrap()
            .0,
        405
    );
    drop(prom);
    assert_eq!(agent.stop(), 0);
}

#[test]
fn a_metrics_port_in_use_stops_the_daemon_with_a_clear_error() {
    let f = Fleet::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let h = f.host_with(
        "h1",
        "test",
        &format!("metrics: {{ listen: \"127.0.0.1:{port}\" }}\n"),
    );
    f.pin(&f.hello("1.0.0", &[]));
    let mut agent = h.spawn(&[]);
    wait_for("the agent to exit", Duration::from_secs(20), || {
        (!agent.alive()).then_some(())
    });
    let log = agent.log();
    assert!(
        log.contains(&format!("cannot listen on metrics.listen 127.0.0.1:{port}")),
        "{log}"
    );
    // Nothing was deployed by a daemon that could not start.
    assert_eq!(h.version(), None);
}

#[test]
fn the_sample_rules_pass_promtool_and_their_unit_tests() {
    let dir = workspace().join("examples/prometheus");
    let check = Command::new("promtool")
        .args(["check", "rules", "drover-agent.rules.yml"])
        .current_dir(&dir)
        .output()
        .expect("promtool runs (apt-get install prometheus)");
    assert!(check.status.success(), "{check:?}");
    let test = Command::new("promtool")
        .args(["test", "rules", "drover-agent.rules.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(test.status.success(), "{test:?}");
    // The check is not a no-op: a rule with a broken expression is refused.
    let t = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(dir.join("drover-agent.rules.yml"))
        .unwrap()
        .replace(
            "expr: drover_service_converged == 0",
            "expr: drover_service_converged ==",
        );
    std::fs::write(t.path().join("bad.yml"), text).unwrap();
    let bad = Command::new("promtool")
        .args(["check", "rules"])
        .arg(t.path().join("bad.yml"))
        .output()
        .unwrap();
    assert!(!bad.status.success(), "{bad:?}");
}
