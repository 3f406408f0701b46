//! ECS mode against moto_server: blue-green and canary by listener weights, rollback in one
//! call, crash at every state, bad resources, throttling. A scheduler stand-in registers the
//! new tasks' targets (moto starts no tasks), or withholds them for a broken version.

use std::time::{Duration, Instant};

use drover_tests::ecs::{Ecs, SERVICE, image};
use drover_tests::{Killed, wait_for};
use serde_json::Value;

fn green_name() -> String {
    format!("{SERVICE}-green")
}

/// The ECS services moto holds, by name.
fn service_names(state: &Value) -> Vec<String> {
    state["services"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

/// The revisions' container definitions, images aside.
fn without_image(td: &Value) -> Value {
    let mut td = td.clone();
    for c in td["containerDefinitions"].as_array_mut().unwrap() {
        c.as_object_mut().unwrap().remove("image");
    }
    td
}

#[test]
fn blue_green_shifts_10_50_100_and_deletes_blue() {
    let e = Ecs::new("");
    let out = e.agent(&["once"], &[]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains("web: 1.0.0 running (up to date)"),
        "{}",
        out.stdout
    );
    e.proxy.clear();
    e.pin("2.0.0");
    let plan = e.agent(&["plan"], &[]);
    assert!(
        plan.stdout
            .contains("elbv2:ModifyListener blue 90 / green 10"),
        "{}",
        plan.stdout
    );
    assert!(
        e.proxy.calls_of("ModifyListener").is_empty(),
        "plan changes nothing"
    );
    e.proxy.clear();
    let t0 = Instant::now();
    let out = e.agent(&["once"], &[]);
    let took = t0.elapsed();
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains("web: deployed 2.0.0 (was 1.0.0)"),
        "{}",
        out.stdout
    );
    eprintln!(
        "blue-green against moto, zero waits: {took:?}, {} API calls",
        e.proxy.calls().len()
    );
    // The weights went through exactly these steps (green attached at 0 first).
    assert_eq!(e.weight_calls(), [(100, 0), (90, 10), (50, 50), (0, 100)]);
    let state = e.inspect(None);
    assert_eq!(e.weights(), (0, 100));
    // Blue is gone; green runs revision 2, which differs from revision 1 only in the image.
    assert_eq!(service_names(&state), [green_name()], "{state}");
    // Green has blue's settings, tags and autoscaling; blue's scalable target went with it.
    // (moto keeps neither deploymentConfiguration nor healthCheckGracePeriodSeconds, which
    // drover carries the same way as propagateTags.)
    let green = &state["services"][green_name()];
    assert_eq!(green["propagate_tags"], "SERVICE", "{green}");
    assert_eq!(
        green["tags"],
        serde_json::json!({"team": "payments", "cost-centre": "42"}),
        "{green}"
    );
    assert_eq!(
        green["scaling"],
        serde_json::json!([{"min": 2, "max": 8}]),
        "{green}"
    );
    assert_eq!(
        green["policies"],
        serde_json::json!([{"name": "cpu60", "type": "TargetTrackingScaling", "target": 60.0}]),
        "{green}"
    );
    let cluster = e.arns["cluster"].as_str().unwrap();
    assert_eq!(
        state["scaling_targets"],
        serde_json::json!([format!("service/{cluster}/{}", green_name())]),
        "{state}"
    );
    let revs = state["revisions"].as_array().unwrap();
    assert_eq!(revs.len(), 2, "{state}");
    assert_eq!(without_image(&revs[0]), without_image(&revs[1]));
    assert_eq!(revs[1]["containerDefinitions"][0]["image"], image("2.0.0"));
    assert_eq!(
        revs[1]["containerDefinitions"][0]["environment"][0]["value"],
        "production"
    );
    // Roles swap: the next version goes to the blue side.
    e.proxy.clear();
    e.pin("3.0.0");
    assert_eq!(e.agent(&["once"], &[]).code, 0);
    assert_eq!(e.weight_calls(), [(0, 100), (10, 90), (50, 50), (100, 0)]);
    let state = e.inspect(None);
    assert_eq!(service_names(&state), [format!("{SERVICE}-blue")]);
    // And back: the settings and autoscaling follow the live side.
    let blue = &state["services"][format!("{SERVICE}-blue")];
    assert_eq!(blue["tags"]["team"], "payments", "{blue}");
    assert_eq!(blue["policies"][0]["name"], "cpu60", "{blue}");
    assert_eq!(
        state["scaling_targets"],
        serde_json::json!([format!("service/{cluster}/{SERVICE}-blue")]),
        "{state}"
    );
    let status = e.agent(&["status", "--json"], &[]);
    let v: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["ecs"]["web"]["current"]["version"], "3.0.0");
    assert_eq!(v["ecs"]["web"]["current"]["colour"], "blue");
}

#[test]
fn canary_uses_its_step_list() {
    let e = Ecs::new("  strategy: canary\n");
    e.pin("2.0.0");
    let out = e.agent(&["once"], &[]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(
        e.weight_calls(),
        [(100, 0), (90, 10), (75, 25), (50, 50), (0, 100)]
    );
}

#[test]
fn a_green_that_never_gets_healthy_is_rolled_back_in_one_call() {
    let e = Ecs::new("  health_timeout: 3s\n");
    e.break_version("2.0.0");
    e.pin("2.0.0");
    let out = e.agent(&["once"], &[]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout.contains("2.0.0 failed and was rolled back to"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("0/2 healthy targets"), "{}", out.stdout);
    // Green was attached at 0, never got traffic; the rollback is one weight call.
    assert_eq!(e.weight_calls(), [(100, 0), (100, 0)]);
    assert_eq!(e.weights(), (100, 0));
    let state = e.inspect(None);
    assert_eq!(
        service_names(&state),
        [format!("{SERVICE}-blue")],
        "green removed"
    );
    // Not retried until the version (or its definition) changes.
    e.proxy.clear();
    let out = e.agent(&["once"], &[]);
    assert!(out.stdout.contains("not retried"), "{}", out.stdout);
    assert!(e.proxy.calls_of("RegisterTaskDefinition").is_empty());
}

#[test]
fn a_failure_at_50_percent_puts_all_traffic_back_on_blue() {
    // A long bake at 50 %, so that a loaded machine still sees it (the failure ends it early).
    let e = Ecs::new("  steps: [{ weight: 10, wait: 1s }, { weight: 50, wait: 60s }, 100]\n");
    e.pin("2.0.0");
    let agent = {
        let mut cmd = e.agent_cmd(&["once"]);
        std::thread::spawn(move || cmd.output().unwrap())
    };
    // At 50 %, the new tasks start failing their target health checks.
    wait_for("traffic at 50%", Duration::from_secs(30), || {
        (e.weights() == (50, 50)).then_some(())
    });
    e.break_version("2.0.0");
    let out = agent.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("at 50% only 0/2 targets"), "{stdout}");
    let calls = e.weight_calls();
    assert_eq!(calls.last(), Some(&(100, 0)), "{calls:?}");
    assert_eq!(&calls[..3], [(100, 0), (90, 10), (50, 50)]);
    assert_eq!(calls.len(), 4, "one call puts everything back: {calls:?}");
    assert_eq!(e.weights(), (100, 0));
}

#[test]
fn a_kill_in_any_state_converges_on_restart() {
    for point in [
        "ecs:creating_green",
        "ecs:provisioning",
        "ecs:health_check",
        "ecs:traffic_shift",
        "ecs:monitoring",
        "ecs:stable_green",
        "ecs:deleting_blue",
        "ecs:complete",
    ] {
        let e = Ecs::new("");
        e.pin("2.0.0");
        let out = e.agent(
            &["once"],
            &[("DROVER_FAILPOINTS", &format!("{point}=kill"))],
        );
        assert_eq!(out.code, -1, "{point}: killed: {}", out.all());
        let out = e.agent(&["once"], &[]);
        assert_eq!(out.code, 0, "{point}: {}", out.all());
        assert!(
            out.stdout.contains("deployed 2.0.0") || out.stdout.contains("2.0.0 running"),
            "{point}: {}",
            out.stdout
        );
        assert_eq!(
            e.weights(),
            (0, 100),
            "{point}: all traffic on the new side"
        );
        let state = e.inspect(None);
        assert_eq!(
            service_names(&state),
            [green_name()],
            "{point}: only the new side remains"
        );
    }
    // Killed while rolling back: the restart finishes the rollback.
    let e = Ecs::new("  health_timeout: 3s\n");
    e.break_version("2.0.0");
    e.pin("2.0.0");
    let out = e.agent(&["once"], &[("DROVER_FAILPOINTS", "ecs:rolling_back=kill")]);
    assert_eq!(out.code, -1, "{}", out.all());
    // The restart finishes the rollback (before its pass, which then skips the failed version).
    let out = e.agent(&["once"], &[]);
    assert!(
        out.stdout.contains("2.0.0 failed here before"),
        "{}",
        out.all()
    );
    assert_eq!(e.weights(), (100, 0));
    let state = e.inspect(None);
    assert_eq!(
        service_names(&state),
        [format!("{SERVICE}-blue")],
        "the new side was removed"
    );
}

#[test]
fn split_traffic_with_no_record_is_put_back_on_one_side() {
    let e = Ecs::new("");
    e.inspect(Some((70, 30)));
    let out = e.agent(&["once"], &[]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(
        e.weights(),
        (100, 0),
        "the majority side gets everything back"
    );
}

#[test]
fn bad_resources_are_clear_errors_and_traffic_is_untouched() {
    let e = Ecs::new("");
    let cases = [
        (
            format!(
                "  listener_arn: \"{}-nope\"\n",
                e.arns["listener"].as_str().unwrap()
            ),
            "listener does not exist",
        ),
        (
            format!(
                "  listener_arn: \"{}\"\n",
                e.arns["other_listener"].as_str().unwrap()
            ),
            "forwards to neither target group",
        ),
        (
            format!(
                "  target_groups: {{ blue: \"{}\", green: \"{}-nope\" }}\n",
                e.arns["blue"].as_str().unwrap(),
                e.arns["green"].as_str().unwrap()
            ),
            "target group does not exist",
        ),
    ];
    for (i, (extra, want)) in cases.iter().enumerate() {
        e.write_service(extra);
        e.pin(&format!("2.0.{i}"));
        e.proxy.clear();
        let out = e.agent(&["once"], &[]);
        assert_eq!(out.code, 1, "{want}: {}", out.all());
        assert!(out.stdout.contains(want), "want `{want}` in {}", out.stdout);
        assert!(
            e.proxy.calls_of("ModifyListener").is_empty(),
            "{want}: traffic untouched"
        );
        assert!(
            e.proxy.calls_of("CreateService").is_empty(),
            "{want}: nothing created"
        );
        assert_eq!(e.weights(), (100, 0));
    }
    // A cluster that does not exist.
    e.write_service("");
    std::fs::write(
        &e.config,
        std::fs::read_to_string(&e.config).unwrap().replace(
            &format!("cluster: {}", e.arns["cluster"].as_str().unwrap()),
            "cluster: nope-cluster",
        ),
    )
    .unwrap();
    e.write_service("  cluster: nope-cluster\n");
    e.pin("2.1.0");
    let out = e.agent(&["once"], &[]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout
            .contains("ECS cluster does not exist: nope-cluster"),
        "{}",
        out.stdout
    );
    assert_eq!(e.weights(), (100, 0));
    // An image without `{version}` is refused by validation.
    e.write_service("  image: \"repo/web:latest\"\n");
    let out = e.agent(&["once"], &[]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("must use `{version}`"),
        "{}",
        out.stderr
    );
}

#[test]
fn throttling_is_retried_and_persistent_throttling_touches_nothing() {
    let e = Ecs::new("");
    // Two throttled weight changes: the SDK retries them.
    e.proxy.throttle("ModifyListener", 2);
    e.pin("2.0.0");
    let out = e.agent(&["once"], &[]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(e.weights(), (0, 100));
    // Reading the listener always throttled: a clear error, and nothing changes.
    e.proxy.throttle("DescribeListeners", u32::MAX);
    e.proxy.clear();
    e.pin("3.0.0");
    let out = e.agent(&["once"], &[]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout.contains("elbv2:DescribeListeners failed") && out.stdout.contains("Throttling"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("(will retry)"), "{}", out.stdout);
    assert!(e.proxy.calls_of("ModifyListener").is_empty());
    e.proxy.throttle("DescribeListeners", 0);
    assert_eq!(e.weights(), (0, 100));
}

#[test]
fn ecs_rollouts_wait_for_their_lease_and_approval() {
    let e = Ecs::new("");
    let c = drover_tests::coordinator::Coordinator::start(e.dir.path(), "");
    std::fs::write(
        &e.config,
        format!(
            "{}{}",
            std::fs::read_to_string(&e.config).unwrap(),
            c.agent_config()
        ),
    )
    .unwrap();
    e.repo.write(
        "environments/prod.yaml",
        &format!("environment: prod\napproval: {{ required: true }}\nservices:\n  {SERVICE}: {{ version: 2.0.0 }}\n"),
    );
    e.repo.commit("2.0.0, approval required");
    let out = e.agent(&["once"], &[]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stdout.contains("approval_required"), "{}", out.stdout);
    assert!(
        e.proxy.calls_of("RegisterTaskDefinition").is_empty(),
        "nothing moved before approval"
    );
    assert_eq!(e.weights(), (100, 0));
    let out = c.cli("alice", &["approve", "prod", SERVICE, "2.0.0"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let out = e.agent(&["once"], &[]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(e.weights(), (0, 100));
    let hist = c.history();
    assert!(hist.iter().any(|h| h["action"] == "lease_released"
        && h["subject"] == format!("prod/{SERVICE}/2.0.0")
        && h["detail"] == "success"));
}

/// A hello app standing in for one side's tasks (moto runs no containers), and its port.
fn app(dir: &std::path::Path, version: &str, error_rate: &str) -> (Killed, u16) {
    let port = drover_tests::free_port();
    let child = std::process::Command::new(drover_tests::bin("hello"))
        .args(["--port", &port.to_string()])
        .current_dir(dir)
        .env("VERSION", version)
        .env("ERROR_RATE", error_rate)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("hello starts");
    drover_tests::wait_port(port, Duration::from_secs(10));
    (Killed(child), port)
}

/// Blue (1.0.0) and green (2.0.0, answering `green_errors` of requests with 500) as hello
/// apps under traffic, scraped by a real Prometheus; the service verifies the error rate
/// against the old version at each traffic step. Returns the agent's `once` for 2.0.0.
fn deploy_with_verification(green_errors: &str) -> (Ecs, drover_tests::host::Out) {
    use drover_tests::prometheus::{ERROR_RATE, Prometheus, Traffic};
    let e = Ecs::new("");
    let (_blue, blue_port) = app(e.dir.path(), "1.0.0", "0");
    let (_green, green_port) = app(e.dir.path(), "2.0.0", green_errors);
    let prom = Prometheus::start(e.dir.path(), &[blue_port, green_port]);
    e.write_service_with(
        "",
        &format!(
            "verify:\n  duration: 5s\n  interval: 1s\n  prometheus: \"{}\"\n  min_points: 4\n  metrics:\n    - name: error_rate\n      query: '{ERROR_RATE}'\n      max: 0.02\n      compare: baseline\n      tolerance_abs: 0.005\n",
            prom.url()
        ),
    );
    let _traffic = Traffic::start(&[blue_port, green_port], 40);
    prom.wait_for_data(&ERROR_RATE.replace("{version}", "2.0.0"));
    let out = deploy_2_over_live_1(&e);
    (e, out)
}

/// With 1.0.0 live (checked), pins 2.0.0 and deploys it, the proxy's calls from then on only;
/// the agent's `once`.
fn deploy_2_over_live_1(e: &Ecs) -> drover_tests::host::Out {
    let out = e.agent(&["once"], &[]);
    assert_eq!(out.code, 0, "1.0.0 is already live: {}", out.all());
    e.proxy.clear();
    e.pin("2.0.0");
    e.agent(&["once"], &[])
}

#[test]
fn metric_analysis_at_each_step_lets_a_good_version_through() {
    let (e, out) = deploy_with_verification("0");
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains("web: deployed 2.0.0 (was 1.0.0)"),
        "{}",
        out.stdout
    );
    assert_eq!(e.weight_calls(), [(100, 0), (90, 10), (50, 50), (0, 100)]);
    // Each step's verdict is in the agent's event log.
    let events = std::fs::read_to_string(e.dir.path().join("state/events.jsonl")).unwrap();
    for p in [10, 50, 100] {
        assert!(
            events.contains(&format!("at {p}%: risk low")),
            "no low verdict at {p}%: {events}"
        );
    }
}

#[test]
fn a_failed_analysis_at_the_first_step_puts_traffic_back_in_one_call() {
    let (e, out) = deploy_with_verification("0.05");
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.all().contains("error_rate"), "{}", out.all());
    let events = std::fs::read_to_string(e.dir.path().join("state/events.jsonl")).unwrap();
    assert!(events.contains("at 10%: risk high"), "{events}");
    // 10 % went to green, the analysis failed, one call put everything back on blue.
    assert_eq!(e.weight_calls(), [(100, 0), (90, 10), (100, 0)]);
    assert_eq!(e.weights(), (100, 0));
    let state = e.inspect(None);
    assert!(
        !service_names(&state).contains(&green_name()),
        "green is removed: {state}"
    );
}

/// Blue (1.0.0, no errors) and green (2.0.0, failing `green_5xx` of its requests) under the
/// traffic the listener's weights give them, as an ALB reports it to CloudWatch (moto, fed by
/// tests/ecs/alb_metrics.py); the canary is verified with the default CloudWatch metrics (5xx
/// ratio and response time per target group, against the other colour). Returns the agent's
/// `once` for 2.0.0.
fn deploy_with_cloudwatch(green_5xx: &str) -> (Ecs, drover_tests::host::Out) {
    let e = Ecs::new("  strategy: canary\n  steps: [10, 50, 100]\n");
    // Half-second publishing, judged per second (a real ALB publishes per minute: the default
    // interval is 60s).
    e.write_service_with(
        "  strategy: canary\n  steps: [10, 50, 100]\n",
        "verify:\n  duration: 8s\n  interval: 1s\n  cloudwatch: {}\n",
    );
    let a = &e.arns;
    let _feed = Killed(
        std::process::Command::new("python3")
            .arg(drover_tests::workspace().join("tests/ecs/alb_metrics.py"))
            .args([
                &e.moto.url(),
                a["listener"].as_str().unwrap(),
                a["blue"].as_str().unwrap(),
                "0",
                a["green"].as_str().unwrap(),
                green_5xx,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(e.dir.path().join("alb_metrics.log")).expect("log"))
            .spawn()
            .expect("alb_metrics.py starts"),
    );
    let out = deploy_2_over_live_1(&e);
    (e, out)
}

#[test]
fn a_canary_judged_by_cloudwatch_goes_through_when_its_alb_metrics_match_the_baseline() {
    let (e, out) = deploy_with_cloudwatch("0");
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(e.weight_calls(), [(100, 0), (90, 10), (50, 50), (0, 100)]);
    let events = std::fs::read_to_string(e.dir.path().join("state/events.jsonl")).unwrap();
    for p in [10, 50, 100] {
        assert!(
            events.contains(&format!("at {p}%: risk low: 5xx_ratio: pass")),
            "no low verdict at {p}%: {events}"
        );
    }
    // Each analysis asks CloudWatch once per metric and side (through the agent's endpoint).
    assert!(
        e.proxy.calls_of("GetMetricData").len() >= 3 * 4,
        "{:?}",
        e.proxy.calls_of("GetMetricData").len()
    );
}

#[test]
fn a_canary_whose_cloudwatch_5xx_ratio_is_high_is_rolled_back() {
    let (e, out) = deploy_with_cloudwatch("0.3");
    assert_eq!(out.code, 1, "{}", out.all());
    let events = std::fs::read_to_string(e.dir.path().join("state/events.jsonl")).unwrap();
    assert!(
        events.contains("at 10%: risk high: 5xx_ratio: fail"),
        "{events}"
    );
    assert!(out.all().contains("5xx_ratio"), "{}", out.all());
    // 10 % went to green, its 5xx ratio was judged against blue's, one call put all back.
    assert_eq!(e.weight_calls(), [(100, 0), (90, 10), (100, 0)]);
    assert_eq!(e.weights(), (100, 0));
    let state = e.inspect(None);
    assert!(
        !service_names(&state).contains(&green_name()),
        "green is removed: {state}"
    );
}

/// `drover rollback` of an ECS service: after a completed deploy, a blue-green back to the
/// old version; during a deploy, one weight call puts all traffic back on the old side.
#[test]
fn a_fleet_rollback_of_ecs_redeploys_the_old_version_or_puts_traffic_back_in_one_call() {
    let e = Ecs::new("");
    let (c, _agent) = with_coordinator(&e, Ecs::pin);
    let state = |version: &str, want: &str| {
        rollout_state(&c, version, want);
    };
    state("1.0.0", "SUCCESS");
    e.pin("2.0.0");
    state("2.0.0", "SUCCESS");
    assert_eq!(e.weights(), (0, 100));

    // Done deploying: the rollback is a blue-green back to 1.0.0 (from 1.0.0's commit).
    e.proxy.clear();
    let out = c.cli("pager", &["rollback", "prod", SERVICE]);
    assert_eq!(out.code, 0, "{}", out.all());
    wait_for("1.0.0 live on blue again", Duration::from_secs(60), || {
        (e.weights() == (100, 0)).then_some(())
    });
    assert_eq!(
        e.weight_calls(),
        vec![(0, 100), (10, 90), (50, 50), (100, 0)],
        "a blue-green to the old version"
    );
    let live = e.inspect(None);
    assert!(live.to_string().contains(&image("1.0.0")), "{live}");

    // Deploying with long bakes: the rollback stops the deploy in flight.
    e.write_service("  step_wait: 60s\n");
    e.pin("3.0.0");
    wait_for("3.0.0 at 10%", Duration::from_secs(60), || {
        (e.weights() == (90, 10)).then_some(())
    });
    e.proxy.clear();
    let t0 = std::time::Instant::now();
    let out = c.cli("pager", &["rollback", "prod", SERVICE]);
    assert_eq!(out.code, 0, "{}", out.all());
    wait_for("traffic back on blue", Duration::from_secs(30), || {
        (e.weights() == (100, 0)).then_some(())
    });
    let took = t0.elapsed();
    assert_eq!(
        e.weight_calls(),
        vec![(100, 0)],
        "one weight call puts the traffic back"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    state("1.0.0", "SUCCESS");
    let agent = e.agent(&["status", "--json"], &[]);
    assert!(
        agent.stdout.contains("stopped by the coordinator"),
        "{}",
        agent.stdout
    );
}

/// The cluster agent running against a coordinator, with 1.0.0 pinned by `pin` and live.
/// Returns the coordinator and the agent (killed when dropped).
fn with_coordinator(
    e: &Ecs,
    pin: fn(&Ecs, &str),
) -> (drover_tests::coordinator::Coordinator, Killed) {
    let c = drover_tests::coordinator::Coordinator::start(e.dir.path(), "");
    std::fs::write(
        &e.config,
        format!(
            "{}{}",
            std::fs::read_to_string(&e.config).unwrap(),
            c.agent_config()
        ),
    )
    .unwrap();
    pin(e, "1.0.0");
    let log = std::fs::File::create(e.dir.path().join("agent.log")).unwrap();
    let agent = Killed(
        e.agent_cmd(&["run"])
            .stderr(log)
            .spawn()
            .expect("agent starts"),
    );
    rollout_state(&c, "1.0.0", "SUCCESS");
    (c, agent)
}

/// [`with_coordinator`] with prod's approvals given to release-managers.
fn gated(e: &Ecs) -> (drover_tests::coordinator::Coordinator, Killed) {
    with_coordinator(e, pin_gated)
}

/// Pins `version` in prod, whose approvals are release-managers'.
fn pin_gated(e: &Ecs, version: &str) {
    e.repo.write(
        "environments/prod.yaml",
        &format!("environment: prod\napproval: {{ approvers: [release-managers], timeout: 1h }}\nservices:\n  {SERVICE}: {{ version: {version} }}\n"),
    );
    e.repo.commit(&format!("{SERVICE} {version}"));
}

/// The green weights a rollout's ECS agent reported, in order.
fn traffic(r: &Value) -> Vec<u64> {
    r["traffic"]
        .as_array()
        .map(|t| t.iter().map(|p| p["percent"].as_u64().unwrap()).collect())
        .unwrap_or_default()
}

/// Waits for the newest rollout of `version` to be in state `want`; returns it.
fn rollout_state(c: &drover_tests::coordinator::Coordinator, version: &str, want: &str) -> Value {
    wait_for(
        &format!("{SERVICE} {version} to be {want}"),
        Duration::from_secs(90),
        || {
            c.status()["rollouts"]
                .as_array()
                .unwrap()
                .iter()
                .rev()
                .find(|r| r["service"] == SERVICE && r["version"] == version)
                .filter(|r| r["state"] == want)
                .cloned()
        },
    )
}

#[test]
fn a_canary_bakes_each_step_its_own_time_and_waits_for_an_approval_at_10_percent() {
    let e = Ecs::new(
        "  strategy: canary\n  steps: [{ weight: 10, wait: 1s, approval: true }, { weight: 50, wait: 3s }, 100]\n",
    );
    e.pin("2.0.0");
    let plan = e.agent(&["plan"], &[]);
    assert!(
        plan.stdout
            .contains("green 10, then bake 1s, then wait for an approval")
            && plan.stdout.contains("green 50, then bake 3s\n"),
        "{}",
        plan.stdout
    );
    let (c, _agent) = gated(&e);
    e.proxy.clear();
    pin_gated(&e, "2.0.0");
    let r = rollout_state(&c, "2.0.0", "APPROVAL_REQUIRED");
    assert!(
        r["reason"].as_str().unwrap().contains("waiting at 10%"),
        "{r}"
    );
    assert!(
        r["waiting_for"]
            .as_str()
            .unwrap()
            .contains("an approval at 10% (release-managers): drover approve prod web 2.0.0"),
        "{r}"
    );
    // Traffic stays where it is while nobody answers.
    assert_eq!(e.weights(), (90, 10));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(e.weights(), (90, 10));
    assert_eq!(e.weight_calls(), [(100, 0), (90, 10)]);
    // An approver of another group may not; alice may.
    let out = c.cli("bob", &["approve", "prod", SERVICE, "2.0.0"]);
    assert_ne!(out.code, 0, "{}", out.all());
    let approved = Instant::now();
    let out = c.cli("alice", &["approve", "prod", SERVICE, "2.0.0"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let r = rollout_state(&c, "2.0.0", "SUCCESS");
    assert_eq!(e.weights(), (0, 100));
    // The coordinator has each weight the agent set (the dashboard draws them).
    assert_eq!(traffic(&r), [10, 50, 100], "{r}");
    let calls = e.timed_weight_calls();
    let steps: Vec<(u32, u32)> = calls.iter().map(|(w, _)| *w).collect();
    assert_eq!(steps, [(100, 0), (90, 10), (50, 50), (0, 100)]);
    // The 10 % step held until the approval; the 50 % step baked its own 3 s.
    assert!(calls[2].1 >= approved, "50% came after the approval");
    let bake = calls[3].1 - calls[2].1;
    assert!(bake >= Duration::from_secs(3), "50% baked {bake:?}");
    let hist = c.history();
    assert!(
        hist.iter()
            .any(|h| h["action"] == "approve" && h["detail"] == "approved at 10% by alice"),
        "{hist:?}"
    );
    assert!(
        hist.iter()
            .any(|h| h["action"] == "denied" && h["actor"] == "bob")
    );
}

#[test]
fn a_step_rejected_while_waiting_puts_traffic_back_in_one_call() {
    let e = Ecs::new("  steps: [{ weight: 10, approval: true }, 100]\n");
    let (c, _agent) = gated(&e);
    pin_gated(&e, "2.0.0");
    rollout_state(&c, "2.0.0", "APPROVAL_REQUIRED");
    assert_eq!(e.weights(), (90, 10));
    e.proxy.clear();
    let out = c.cli("alice", &["reject", "prod", SERVICE, "2.0.0"]);
    assert_eq!(out.code, 0, "{}", out.all());
    wait_for("traffic back on blue", Duration::from_secs(30), || {
        (e.weights() == (100, 0)).then_some(())
    });
    assert_eq!(
        e.weight_calls(),
        [(100, 0)],
        "one weight call puts the traffic back"
    );
    let r = rollout_state(&c, "2.0.0", "ABORTED");
    assert_eq!(traffic(&r), [10, 0], "{r}");
    let hist = c.history();
    assert!(
        hist.iter().any(|h| h["action"] == "transition"
            && h["detail"]
                .as_str()
                .unwrap()
                .contains("FAILED: rejected at 10% by alice")),
        "{hist:?}"
    );
    wait_for("the green service to go", Duration::from_secs(30), || {
        (service_names(&e.inspect(None)) == [format!("{SERVICE}-blue")]).then_some(())
    });
    let agent = e.agent(&["status", "--json"], &[]);
    assert!(
        agent.stdout.contains("rejected at 10% by alice"),
        "{}",
        agent.stdout
    );
}

#[test]
fn a_target_that_turns_unhealthy_mid_bake_rolls_back_at_once() {
    // A 10-minute bake at 10 %, no coordinator.
    let e = Ecs::new("  steps: [{ weight: 10, wait: 10m }, 100]\n");
    e.pin("2.0.0");
    let agent = Once::start(&e);
    wait_for("2.0.0 at 10%", Duration::from_secs(60), || {
        (e.weights() == (90, 10)).then_some(())
    });
    // The new side's targets go (its tasks die): the bake notices before its 10 minutes.
    e.break_version("2.0.0");
    let out = agent.finish();
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout.contains("failed and was rolled back"),
        "{}",
        out.stdout
    );
    assert!(
        out.all()
            .contains("at 10% only 0/2 targets of web-green are healthy"),
        "{}",
        out.all()
    );
    assert_eq!(e.weights(), (100, 0));
}

#[test]
fn a_canary_at_10_percent_runs_about_a_tenth_of_the_tasks() {
    let e = Ecs::new(
        "  strategy: canary\n  desired_count: 10\n  steps: [{ weight: 10, wait: 3s }, { weight: 50, wait: 1s }, 100]\n",
    );
    e.pin("2.0.0");
    let plan = e.agent(&["plan"], &[]);
    assert!(
        plan.stdout
            .contains("ecs:CreateService web-green (desired 1,")
            && plan
                .stdout
                .contains("ecs:UpdateService web-green desired 5, wait healthy; "),
        "{}",
        plan.stdout
    );
    e.proxy.clear();
    let out = e.agent(&["once"], &[]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(e.weight_calls(), [(100, 0), (90, 10), (50, 50), (0, 100)]);
    // In the order the calls came: the canary is created with one task of ten and takes its
    // 10 % so; it grows to 5 before 50 % and to 10 before 100 %.
    let calls: Vec<String> = e
        .proxy
        .calls()
        .iter()
        .filter_map(|c| {
            let green =
                |b: &Value| b["serviceName"] == green_name() || b["service"] == green_name();
            match c.action.as_str() {
                "CreateService" | "UpdateService" => serde_json::from_str::<Value>(&c.body)
                    .ok()
                    .filter(green)
                    .map(|b| format!("{} {}", c.action, b["desiredCount"])),
                "ModifyListener" => Some(format!(
                    "weights {:?}",
                    c.weights().iter().map(|(_, w)| *w).collect::<Vec<_>>()
                )),
                _ => None,
            }
        })
        .collect();
    assert_eq!(
        calls,
        [
            "CreateService 1",
            "weights [100, 0]",
            "weights [90, 10]",
            "UpdateService 5",
            "weights [50, 50]",
            "UpdateService 10",
            "weights [0, 100]",
        ],
        "{calls:?}"
    );
    let state = e.inspect(None);
    assert_eq!(state["services"][green_name()]["desired"], 10, "{state}");
}

#[test]
fn drover_agent_rollback_in_ecs_mode_goes_back_to_the_previous_version() {
    let e = Ecs::new("");
    // Nothing deployed by this agent yet: a clear refusal, nothing touched.
    let out = e.agent(&["rollback", SERVICE], &[]);
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(
        out.all().contains("this agent has deployed nothing of it"),
        "{}",
        out.all()
    );
    assert_eq!(e.agent(&["once"], &[]).code, 0);
    let out = e.agent(&["rollback", SERVICE], &[]);
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(
        out.all().contains("no previous version on record"),
        "{}",
        out.all()
    );
    e.pin("2.0.0");
    assert_eq!(e.agent(&["once"], &[]).code, 0);
    assert_eq!(e.weights(), (0, 100));
    // Back to 1.0.0 by a blue-green onto blue.
    e.proxy.clear();
    let out = e.agent(&["rollback", SERVICE], &[]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains(
            "2.0.0 failed and was rolled back to 1.0.0: rolled back by operator to 1.0.0"
        ),
        "{}",
        out.stdout
    );
    assert_eq!(e.weight_calls(), [(0, 100), (10, 90), (50, 50), (100, 0)]);
    let state = e.inspect(None);
    assert_eq!(
        service_names(&state),
        [format!("{SERVICE}-blue")],
        "{state}"
    );
    // Blue runs a third revision: the live one with 1.0.0's image.
    let revs = state["revisions"].as_array().unwrap();
    assert_eq!(revs.len(), 3, "{state}");
    assert_eq!(revs[2]["containerDefinitions"][0]["image"], image("1.0.0"));
    let td = state["services"][format!("{SERVICE}-blue")]["task_definition"]
        .as_str()
        .unwrap();
    assert!(td.ends_with(":3"), "{state}");
    // Git still asks for 2.0.0: it is not deployed again until the pin changes.
    let out = e.agent(&["once"], &[]);
    assert!(
        out.stdout.contains("2.0.0 failed here before"),
        "{}",
        out.stdout
    );
    assert_eq!(e.weights(), (100, 0));
    let status = e.agent(&["status", "--json"], &[]);
    let v: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["ecs"][SERVICE]["current"]["version"], "1.0.0");
    // A new pin is deployed again.
    e.pin("3.0.0");
    assert_eq!(e.agent(&["once"], &[]).code, 0);
    assert_eq!(e.weights(), (0, 100));
}

/// `drover-agent once` running in the background, its output in files (a pipe nobody reads
/// could fill up and stop it).
struct Once {
    child: std::process::Child,
    stdout: std::path::PathBuf,
    stderr: std::path::PathBuf,
}

impl Once {
    fn start(e: &Ecs) -> Once {
        let (stdout, stderr) = (e.dir.path().join("once.out"), e.dir.path().join("once.err"));
        let child = e
            .agent_cmd(&["once"])
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("agent starts");
        Once {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits (up to two minutes) for it to end; its exit code and output.
    fn finish(mut self) -> drover_tests::host::Out {
        let status = wait_for("the agent to end", Duration::from_secs(120), || {
            self.child.try_wait().unwrap()
        });
        drover_tests::host::Out {
            code: status.code().unwrap_or(-1),
            stdout: std::fs::read_to_string(&self.stdout).unwrap(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap(),
        }
    }
}

impl Drop for Once {
    fn drop(&mut self) {
        // A test that failed early does not leave an agent deploying behind it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn autoscaling_left_on_an_old_side_reaches_the_live_side_before_the_old_side_goes() {
    // As after a deploy whose clean-up could not carry autoscaling: green is live (all
    // traffic) without a scalable target, blue is left at weight 0 holding target and policy.
    let e = Ecs::new("");
    let script = format!(
        r#"
import boto3
kw = dict(endpoint_url="{url}", region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
ecs = boto3.client("ecs", **kw)
td = ecs.describe_services(cluster="{cluster}", services=["{svc}-blue"])["services"][0]["taskDefinition"]
ecs.create_service(cluster="{cluster}", serviceName="{svc}-green", taskDefinition=td, desiredCount=2, launchType="FARGATE",
    loadBalancers=[{{"targetGroupArn": "{green}", "containerName": "{svc}", "containerPort": 8080}}],
    networkConfiguration={{"awsvpcConfiguration": {{"subnets": {subnets}, "securityGroups": ["{sg}"]}}}})
"#,
        url = e.moto.url(),
        cluster = e.arns["cluster"].as_str().unwrap(),
        svc = SERVICE,
        green = e.arns["green"].as_str().unwrap(),
        subnets = e.arns["subnets"],
        sg = e.arns["sg"].as_str().unwrap(),
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    e.inspect(Some((0, 100)));
    wait_for("green's targets", Duration::from_secs(30), || {
        (e.inspect(None)["services"][green_name()]["status"] == "ACTIVE").then_some(())
    });
    e.pin("2.0.0");
    let out = e.agent(&["once"], &[]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stderr
            .contains("autoscaling of a leftover side moved to the live side"),
        "{}",
        out.stderr
    );
    // 2.0.0 went to blue (the side not live), and blue ends with the policy.
    assert_eq!(e.weights(), (100, 0));
    let state = e.inspect(None);
    let blue = &state["services"][format!("{SERVICE}-blue")];
    assert_eq!(
        blue["scaling"],
        serde_json::json!([{"min": 2, "max": 8}]),
        "{state}"
    );
    assert_eq!(blue["policies"][0]["name"], "cpu60", "{state}");
    let cluster = e.arns["cluster"].as_str().unwrap();
    assert_eq!(
        state["scaling_targets"],
        serde_json::json!([format!("service/{cluster}/{SERVICE}-blue")]),
        "{state}"
    );
}
