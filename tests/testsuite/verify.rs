//! Metric verification against a real Prometheus scraping the hello apps: the new version
//! (on h2) is compared with the old one (still on h1) over the same window.

use std::time::Duration;

use drover_tests::coordinator::Coordinator;
use drover_tests::host::{Fleet, Host, SERVICE};
use drover_tests::prometheus::{ERROR_RATE, Prometheus, Traffic};
use drover_tests::wait_for;
use serde_json::Value;

const LATENCY: &str = r#"sum(rate(hello_http_request_duration_seconds_sum{version="{version}"}[4s])) / sum(rate(hello_http_request_duration_seconds_count{version="{version}"}[4s]))"#;

fn service(extra: &str, error_query: &str) -> String {
    format!(
        "{SERVICE}verify:\n  duration: 8s\n  interval: 1s\n  prometheus: \"{{prom}}\"\n  min_points: 5\n{extra}  metrics:\n    - name: error_rate\n      query: '{error_query}'\n      max: 0.02\n      compare: baseline\n      tolerance_abs: 0.005\n    - name: latency\n      query: '{LATENCY}'\n      compare: baseline\n      tolerance: 0.5\n"
    )
}

struct Setup {
    f: Fleet,
    h1: Host,
    h2: Host,
    prom: Prometheus,
    coordinator: Option<Coordinator>,
}

/// h1 and h2 run 1.0.0 (5 ms latency), scraped by Prometheus; `extra` goes into `verify:`.
/// With `coordinated`, h2 works with a coordinator.
fn setup(extra: &str, error_query: &str, coordinated: bool) -> Setup {
    let f = Fleet::new();
    f.repo
        .write("services/hello.yaml", &service(extra, error_query));
    let coordinator = coordinated.then(|| Coordinator::start(f.dir.path(), ""));
    let h1 = f.host("h1");
    let h2 = f.host_with(
        "h2",
        "test",
        &coordinator
            .as_ref()
            .map(|c| c.agent_config())
            .unwrap_or_default(),
    );
    let prom = Prometheus::start(f.dir.path(), &[h1.port, h2.port]);
    for h in [&h1, &h2] {
        let d = h.config.with_file_name("agent.d");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("10-prom.yaml"),
            format!("vars: {{ prom: \"{}\" }}\n", prom.url()),
        )
        .unwrap();
    }
    f.pin(&f.hello("1.0.0", &["LATENCY_MS=5"]));
    for h in [&h1, &h2] {
        let out = h.once();
        // 1.0.0 itself is verified too: with no old version the baseline is "before the
        // switch", where there is nothing — inconclusive, kept (medium, pause).
        assert_eq!(out.code, 0, "{}", out.all());
        assert_eq!(h.version().as_deref(), Some("1.0.0"));
    }
    Setup {
        f,
        h1,
        h2,
        prom,
        coordinator,
    }
}

fn verdict(h: &Host) -> Value {
    h.hello()["verdict"].clone()
}

#[test]
fn a_good_version_passes_and_a_slightly_slower_one_within_tolerance_too() {
    let s = setup("", ERROR_RATE, false);
    let _traffic = Traffic::start(&[s.h1.port, s.h2.port], 40);
    s.prom.wait_for_data(&LATENCY.replace("{version}", "1.0.0"));
    // 20% slower, tolerance 50%.
    s.f.pin(&s.f.hello("2.0.0", &["LATENCY_MS=6"]));
    let out = s.h2.once();
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains("deployed 2.0.0 (was 1.0.0)"),
        "{}",
        out.stdout
    );
    let v = verdict(&s.h2);
    assert_eq!(v["risk"], "low", "{v}");
    assert_eq!(v["version"], "2.0.0");
    let metrics = v["metrics"].as_array().unwrap();
    assert_eq!(metrics.len(), 2);
    for m in metrics {
        assert_eq!(m["judgement"], "pass", "{m}");
        assert!(m["canary_points"].as_u64().unwrap() >= 5, "{m}");
        assert!(m["baseline_points"].as_u64().unwrap() >= 5, "{m}");
    }
    let lat = &metrics[1];
    let (c, b) = (
        lat["canary"].as_f64().unwrap(),
        lat["baseline"].as_f64().unwrap(),
    );
    assert!(c > b, "the new version is measurably slower ({c} vs {b})");
    assert!(s.h2.phases().contains(&"2.0.0:verified".to_string()));
}

#[test]
fn the_coordinator_keeps_a_verdicts_samples_for_the_dashboards_charts() {
    let s = setup("", ERROR_RATE, true);
    let c = s.coordinator.as_ref().unwrap();
    let _traffic = Traffic::start(&[s.h1.port, s.h2.port], 40);
    s.prom.wait_for_data(&LATENCY.replace("{version}", "1.0.0"));
    s.f.pin(&s.f.hello("2.0.0", &["LATENCY_MS=6"]));
    let out = s.h2.once();
    assert_eq!(out.code, 0, "{}", out.all());
    let r = wait_for("2.0.0's verdict", Duration::from_secs(30), || {
        c.rollout("test", "2.0.0")
            .filter(|r| r["verdicts"]["h2"].is_string())
    });
    // The lists carry no samples; the rollout's own view does.
    assert!(r.get("charts").is_none(), "{r}");
    let (status, v) = c.http(
        "GET",
        &format!("/v1/rollouts/{}", r["id"]),
        Some(&drover_tests::coordinator::token("ops")),
        "",
        true,
    );
    assert_eq!(status, 200, "{v}");
    let charts = v["rollout"]["charts"].as_array().unwrap();
    assert_eq!(charts.len(), 1, "{v}");
    assert_eq!(charts[0]["host"], "h2");
    assert_eq!(charts[0]["risk"], "low");
    let metrics = charts[0]["metrics"].as_array().unwrap();
    let local = verdict(&s.h2);
    assert_eq!(metrics.len(), 2);
    for (m, l) in metrics.iter().zip(local["metrics"].as_array().unwrap()) {
        // The same numbers the host judged, and every sample of them (≤ 120 a side).
        assert_eq!(m["name"], l["name"]);
        assert_eq!(m["judgement"], l["judgement"]);
        assert_eq!(m["median"], l["canary"], "{m}");
        assert_eq!(m["baseline_median"], l["baseline"], "{m}");
        assert_eq!(m["p_value"], l["p_value"], "{m}");
        assert_eq!(
            m["samples"].as_array().unwrap().len() as u64,
            l["canary_points"].as_u64().unwrap().min(120)
        );
        assert_eq!(
            m["baseline"].as_array().unwrap().len() as u64,
            l["baseline_points"].as_u64().unwrap().min(120)
        );
        assert!(m["samples"].as_array().unwrap().len() >= 5, "{m}");
    }
}

#[test]
fn five_percent_errors_are_high_risk_and_roll_back() {
    let s = setup("", ERROR_RATE, false);
    let _traffic = Traffic::start(&[s.h1.port, s.h2.port], 40);
    s.prom.wait_for_data(&LATENCY.replace("{version}", "1.0.0"));
    s.f.pin(&s.f.hello("2.0.0", &["LATENCY_MS=5", "ERROR_RATE=0.05"]));
    let out = s.h2.once();
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout.contains(
            "2.0.0 failed and was rolled back to 1.0.0: verify: metric verification: risk high"
        ),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("error_rate: fail"), "{}", out.stdout);
    assert_eq!(s.h2.version().as_deref(), Some("1.0.0"));
    let v = verdict(&s.h2);
    assert_eq!(v["risk"], "high");
    let er = &v["metrics"][0];
    assert!(er["canary"].as_f64().unwrap() > 0.02, "{er}");
    assert_eq!(s.h2.hello()["failed"]["version"], "2.0.0");
}

#[test]
fn no_traffic_is_inconclusive_never_a_pass() {
    let s = setup("", ERROR_RATE, false);
    s.f.pin(&s.f.hello("2.0.0", &["LATENCY_MS=5"]));
    let out = s.h2.once();
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains("kept for a human to decide"),
        "{}",
        out.stdout
    );
    let v = verdict(&s.h2);
    assert_eq!(v["risk"], "medium", "{v}");
    assert_eq!(v["metrics"][0]["judgement"], "inconclusive");
    assert!(
        v["summary"].as_str().unwrap().contains("is there traffic"),
        "{v}"
    );
    // With `on_medium: rollback` the same situation rolls back.
    s.f.repo.write(
        "services/hello.yaml",
        &service("  on_medium: rollback\n", ERROR_RATE),
    );
    s.f.pin(&s.f.hello("3.0.0", &["LATENCY_MS=5"]));
    let out = s.h2.once();
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout.contains("rolled back to 2.0.0"),
        "{}",
        out.stdout
    );
}

#[test]
fn prometheus_down_or_a_bad_query_stops_the_rollout_unless_fail_open() {
    let mut s = setup("", "sum(rate(oops[", false);
    s.f.pin(&s.f.hello("2.0.0", &["LATENCY_MS=5"]));
    let out = s.h2.once();
    assert_eq!(out.code, 0, "{}", out.all());
    let v = verdict(&s.h2);
    assert_eq!(v["risk"], "medium", "{v}");
    let summary = v["summary"].as_str().unwrap();
    assert!(
        summary.contains("metric `error_rate`: query rejected: bad_data"),
        "{summary}"
    );
    assert!(summary.contains("missing data is not a pass"), "{summary}");

    s.prom.stop();
    s.f.repo
        .write("services/hello.yaml", &service("", ERROR_RATE));
    s.f.pin(&s.f.hello("3.0.0", &["LATENCY_MS=5"]));
    let out = s.h2.once();
    let v = verdict(&s.h2);
    assert_eq!(v["risk"], "medium", "{}\n{v}", out.all());
    assert!(
        v["summary"].as_str().unwrap().contains("cannot reach"),
        "{v}"
    );

    s.f.repo.write(
        "services/hello.yaml",
        &service("  fail_open: true\n", ERROR_RATE),
    );
    s.f.pin(&s.f.hello("4.0.0", &["LATENCY_MS=5"]));
    let out = s.h2.once();
    assert_eq!(out.code, 0, "{}", out.all());
    let v = verdict(&s.h2);
    assert_eq!(v["risk"], "low", "{v}");
    assert!(
        v["summary"]
            .as_str()
            .unwrap()
            .contains("ignored: fail_open"),
        "{v}"
    );
}

#[test]
fn a_medium_verdict_pauses_the_rollout_on_the_coordinator() {
    let s = setup("", ERROR_RATE, true);
    let c = s.coordinator.as_ref().unwrap();
    // h2 deploys 2.0.0 with no traffic: inconclusive → the rollout pauses.
    s.f.pin(&s.f.hello("2.0.0", &["LATENCY_MS=5"]));
    let out = s.h2.once();
    assert_eq!(out.code, 0, "{}", out.all());
    wait_for("the rollout to pause", Duration::from_secs(30), || {
        (c.state("test", "2.0.0").as_deref() == Some("PAUSED")).then_some(())
    });
    let r = c.rollout("test", "2.0.0").unwrap();
    assert!(
        r["verdicts"]["h2"].as_str().unwrap().starts_with("medium"),
        "{r}"
    );
    let hist = c.history();
    assert!(
        hist.iter()
            .any(|e| e["action"] == "verification" && e["actor"] == "h2")
    );
    let out = c.cli("ops", &["status"]);
    assert!(
        out.stdout.contains("verification on h2: medium"),
        "{}",
        out.stdout
    );
    let out = c.cli("ops", &["resume", "test", "hello"]);
    assert_eq!(out.code, 0, "{}", out.all());
    // Its only host is done: resumed, it completes at once.
    assert!(
        out.stdout.contains("test/hello/2.0.0 SUCCESS"),
        "{}",
        out.stdout
    );
    assert!(c.history().iter().any(|e| {
        e["detail"]
            .as_str()
            .unwrap()
            .starts_with("PAUSED → RUNNING: resumed by ops")
    }));
}

/// Publishes, to moto's CloudWatch until killed, what an app would report per version every
/// half second: `Hello/Requests` (10) and `Hello/Errors` (10 × its ratio; none when 0, as
/// CloudWatch gets no zero counts) with the dimension `Version`.
fn publish(moto: &drover_tests::ecs::Moto, ratios: &[(&str, f64)]) -> drover_tests::Killed {
    let script = format!(
        r#"
import time, boto3
cw = boto3.client("cloudwatch", endpoint_url="{}", region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
while True:
    data = []
    for version, ratio in {:?}:
        dims = [{{"Name": "Version", "Value": version}}]
        data.append({{"MetricName": "Requests", "Dimensions": dims, "Value": 10}})
        if ratio > 0:
            data.append({{"MetricName": "Errors", "Dimensions": dims, "Value": round(10 * ratio)}})
    cw.put_metric_data(Namespace="Hello", MetricData=data)
    time.sleep(0.5)
"#,
        moto.url(),
        ratios
    );
    drover_tests::Killed(
        std::process::Command::new("python3")
            .args(["-c", &script])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("python3 runs"),
    )
}

/// A vm service verified from CloudWatch: its own metric, a ratio selected by `{version}`,
/// with the old version (still published by the other hosts) as the baseline.
#[test]
fn a_vm_version_whose_cloudwatch_error_ratio_is_high_rolls_back() {
    let f = Fleet::new();
    let moto = drover_tests::ecs::Moto::start(f.dir.path());
    f.repo.write(
        "services/hello.yaml",
        &format!(
            "{SERVICE}verify:\n  duration: 6s\n  interval: 1s\n  cloudwatch: {{ region: us-east-1 }}\n  metrics:\n    - name: error_ratio\n      cloudwatch:\n        namespace: Hello\n        metric: Errors\n        stat: Sum\n        dimensions: {{ Version: \"{{version}}\" }}\n        divide_by: {{ metric: Requests }}\n      compare: baseline\n      tolerance_abs: 0.01\n"
        ),
    );
    let h = f.host("h1");
    let _feed = publish(&moto, &[("1.0.0", 0.0), ("2.0.0", 0.3)]);
    let aws = [
        ("AWS_ENDPOINT_URL", moto.url()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ];
    let env: Vec<(&str, &str)> = aws.iter().map(|(k, v)| (*k, v.as_str())).collect();
    f.pin(&f.hello("1.0.0", &[]));
    let out = h.once_with(&env);
    // Judged against its own history before the switch, as far as there is one (kept).
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    f.pin(&f.hello("2.0.0", &[]));
    let out = h.once_with(&env);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stdout.contains("error_ratio: fail"), "{}", out.stdout);
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    let v = verdict(&h);
    assert_eq!(v["risk"], "high");
    let m = &v["metrics"][0];
    assert!((m["canary"].as_f64().unwrap() - 0.3).abs() < 1e-9, "{m}");
    assert_eq!(m["baseline"].as_f64(), Some(0.0), "{m}");
}
