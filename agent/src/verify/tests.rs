use super::*;
use crate::spec::Dur;

fn metric(baseline: bool) -> ResolvedMetric {
    ResolvedMetric {
        name: "error_rate".into(),
        query: r#"rate(errors{version="{version}"}[1m])"#.into(),
        cloudwatch: None,
        by_version: true,
        max: None,
        min: None,
        baseline,
        direction: Direction::Increase,
        tolerance: 0.1,
        tolerance_abs: 0.0,
    }
}

fn samples(canary: &[f64], baseline: Option<&[f64]>) -> Samples {
    Samples {
        canary: canary.to_vec(),
        baseline: baseline.map(<[f64]>::to_vec),
    }
}

#[test]
fn too_few_points_is_inconclusive_never_a_pass() {
    let v = judge(&metric(true), &samples(&[0.0; 3], Some(&[0.0; 10])), 6);
    assert_eq!(v.judgement, Judgement::Inconclusive);
    assert!(v.detail.contains("is there traffic"), "{}", v.detail);
    let v = judge(&metric(true), &samples(&[0.0; 10], Some(&[0.0; 2])), 6);
    assert_eq!(v.judgement, Judgement::Inconclusive);
    assert_eq!(verdict(vec![v]).risk, Risk::Medium);
}

#[test]
fn thresholds() {
    let mut m = metric(false);
    m.max = Some(0.01);
    let v = judge(&m, &samples(&[0.05; 10], None), 6);
    assert_eq!(v.judgement, Judgement::Fail);
    assert!(v.detail.contains("over the maximum 0.01"), "{}", v.detail);
    let v = judge(&m, &samples(&[0.001; 10], None), 6);
    assert_eq!(v.judgement, Judgement::Pass);
    m.max = None;
    m.min = Some(100.0);
    assert_eq!(
        judge(&m, &samples(&[50.0; 10], None), 6).judgement,
        Judgement::Fail
    );
}

#[test]
fn a_significantly_worse_canary_fails() {
    // 5% errors against none.
    let v = judge(&metric(true), &samples(&[0.05; 12], Some(&[0.0; 12])), 6);
    assert_eq!(v.judgement, Judgement::Fail, "{}", v.detail);
    assert!(v.p_value.unwrap() < 0.001);
    assert_eq!(verdict(vec![v]).risk, Risk::High);
}

#[test]
fn a_change_within_tolerance_passes_even_if_significant() {
    let mut m = metric(true);
    m.name = "latency".into();
    m.tolerance = 0.5;
    let base: Vec<f64> = (0..20).map(|i| 0.020 + f64::from(i) * 0.0001).collect();
    let canary: Vec<f64> = base.iter().map(|v| v * 1.2).collect();
    let v = judge(&m, &samples(&canary, Some(&base)), 6);
    assert!(v.p_value.unwrap() < 0.01, "it is significant");
    assert_eq!(v.judgement, Judgement::Pass, "{}", v.detail);
    // With 10% tolerance the same data fails.
    m.tolerance = 0.1;
    assert_eq!(
        judge(&m, &samples(&canary, Some(&base)), 6).judgement,
        Judgement::Fail
    );
}

#[test]
fn direction_matters() {
    let mut m = metric(true);
    m.direction = Direction::Decrease;
    let base = [100.0, 101.0, 99.0, 100.5, 100.2, 99.8, 100.1, 99.9];
    let higher: Vec<f64> = base.iter().map(|v| v * 1.5).collect();
    assert_eq!(
        judge(&m, &samples(&higher, Some(&base)), 6).judgement,
        Judgement::Pass
    );
    let lower: Vec<f64> = base.iter().map(|v| v * 0.5).collect();
    assert_eq!(
        judge(&m, &samples(&lower, Some(&base)), 6).judgement,
        Judgement::Fail
    );
    m.direction = Direction::Either;
    assert_eq!(
        judge(&m, &samples(&higher, Some(&base)), 6).judgement,
        Judgement::Fail
    );
}

#[test]
fn decisions() {
    assert_eq!(decide(Risk::Low, OnMedium::Pause), RiskResponse::Continue);
    assert_eq!(decide(Risk::Medium, OnMedium::Pause), RiskResponse::Pause);
    assert_eq!(
        decide(Risk::Medium, OnMedium::Rollback),
        RiskResponse::RollBack
    );
    assert_eq!(decide(Risk::High, OnMedium::Pause), RiskResponse::RollBack);
}

/// Canned answers, to test the baseline fallbacks without a server (the Prometheus client is
/// tested against a real Prometheus in tests/).
struct Canned(Vec<(String, bool, Result<Vec<f64>, MetricError>)>);

impl MetricSource for Canned {
    async fn range(
        &self,
        _metric: &str,
        query: &Query,
        start: SystemTime,
        _end: SystemTime,
        _step: Duration,
    ) -> Result<Vec<f64>, MetricError> {
        let query = query.to_string();
        let before_switch = start < SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        self.0
            .iter()
            .find(|(q, b, _)| query.contains(q.as_str()) && *b == before_switch)
            .map(|(_, _, r)| r.clone())
            .unwrap_or(Ok(vec![]))
    }
}

fn verify_block(fail_open: bool) -> ResolvedVerify {
    ResolvedVerify {
        duration: Dur::secs(60),
        interval: Dur::secs(5),
        prometheus: "http://x".into(),
        cloudwatch: None,
        on_medium: OnMedium::Pause,
        fail_open,
        min_points: 6,
        metrics: vec![metric(true)],
    }
}

fn at(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(s)
}

#[tokio::test]
async fn the_baseline_falls_back_to_before_the_switch() {
    // No host still runs 1.0 in the window; the host's own history before the switch does.
    let src = Canned(vec![
        ("\"2.0\"".into(), false, Ok(vec![0.0; 12])),
        ("\"1.0\"".into(), false, Ok(vec![])),
        ("\"1.0\"".into(), true, Ok(vec![0.0; 12])),
    ]);
    let v = analyze(
        &src,
        &verify_block(false),
        &Side::version("2.0"),
        Some(&Side::version("1.0")),
        at(1000),
        at(1000),
        at(1060),
    )
    .await;
    assert_eq!(v.risk, Risk::Low, "{}", v.summary);
    assert_eq!(v.metrics[0].baseline_points, 12);
}

#[tokio::test]
async fn errors_are_inconclusive_unless_fail_open() {
    let err = MetricError::Unreachable {
        metric: "error_rate".into(),
        url: "http://x".into(),
        message: "connection refused".into(),
    };
    let src = Canned(vec![("\"2.0\"".into(), false, Err(err))]);
    let v = analyze(
        &src,
        &verify_block(false),
        &Side::version("2.0"),
        Some(&Side::version("1.0")),
        at(1000),
        at(1000),
        at(1060),
    )
    .await;
    assert_eq!(v.risk, Risk::Medium);
    assert!(v.summary.contains("connection refused"), "{}", v.summary);
    assert!(
        v.summary.contains("missing data is not a pass"),
        "{}",
        v.summary
    );
    let v = analyze(
        &src,
        &verify_block(true),
        &Side::version("2.0"),
        Some(&Side::version("1.0")),
        at(1000),
        at(1000),
        at(1060),
    )
    .await;
    assert_eq!(v.risk, Risk::Low);
}

#[tokio::test]
async fn an_ecs_side_is_its_target_group_and_the_baseline_is_the_other_colour() {
    // The ALB defaults: each query names one colour's target group.
    let mut v = verify_block(false);
    v.prometheus.clear();
    v.cloudwatch = Some(crate::spec::ResolvedCloudWatch { region: None });
    v.metrics = crate::spec::alb_default_metrics();
    let side = |version, tg| Side {
        version,
        target_group: Some(tg),
        load_balancer: Some("app/lb/1"),
    };
    let (new, old) = (
        side("2.0", "targetgroup/green/2"),
        side("1.0", "targetgroup/blue/1"),
    );
    let Query::CloudWatch(q) = Query::of(&v.metrics[0], &new) else {
        panic!("a CloudWatch query");
    };
    assert_eq!(q.dimensions["TargetGroup"], "targetgroup/green/2");
    assert_eq!(q.dimensions["LoadBalancer"], "app/lb/1");
    assert_eq!(
        q.divide_by,
        Some(("RequestCount".to_string(), "Sum".to_string()))
    );
    // Green errs in a tenth of its requests, blue in none: the 5xx ratio fails, the response
    // time (equal) passes.
    let ratio: Vec<f64> = (0..8).map(|i| 0.1 + f64::from(i) * 0.001).collect();
    let src = Canned(vec![
        ("HTTPCode_Target_5XX_Count (Sum) / RequestCount (Sum) [LoadBalancer=app/lb/1, TargetGroup=targetgroup/green/2]".into(), false, Ok(ratio)),
        ("HTTPCode_Target_5XX_Count (Sum) / RequestCount (Sum) [LoadBalancer=app/lb/1, TargetGroup=targetgroup/blue/1]".into(), false, Ok(vec![0.0; 8])),
        ("TargetResponseTime (Average) [LoadBalancer=app/lb/1, TargetGroup=targetgroup/".into(), false, Ok(vec![0.02; 8])),
    ]);
    let verdict = analyze(&src, &v, &new, Some(&old), at(1000), at(1000), at(1060)).await;
    assert_eq!(verdict.risk, Risk::High, "{}", verdict.summary);
    assert_eq!(verdict.metrics[0].name, "5xx_ratio");
    assert_eq!(verdict.metrics[0].judgement, Judgement::Fail);
    assert_eq!(
        verdict.metrics[1].judgement,
        Judgement::Pass,
        "{}",
        verdict.summary
    );
}

#[test]
fn a_prometheus_query_fills_version_and_leaves_the_rest() {
    let m = metric(true);
    let q = Query::of(&m, &Side::version("2.0"));
    assert!(
        matches!(&q, Query::Promql(s) if s.contains("\"2.0\"") && !s.contains("{version}")),
        "{q}"
    );
}

#[test]
fn thin_keeps_order_and_drops_what_is_not_finite() {
    assert_eq!(thin(&[1.0, f64::NAN, 2.0, f64::INFINITY], 10), [1.0, 2.0]);
    let v: Vec<f64> = (0..1000).map(f64::from).collect();
    let t = thin(&v, 120);
    assert_eq!(t.len(), 120);
    assert_eq!(t[0], 0.0);
    assert!(t.windows(2).all(|w| w[0] < w[1]), "in order");
    assert!(*t.last().unwrap() >= 990.0, "spans the window");
    assert!(thin(&[], 5).is_empty());
}

#[test]
fn charts_carry_the_judged_samples_within_the_coordinators_limits() {
    let canary: Vec<f64> = (0..300).map(|i| 0.5 + f64::from(i % 7) / 100.0).collect();
    let base = vec![0.4; 50];
    let m = judge(&metric(true), &samples(&canary, Some(&base)), 6);
    let mut many = vec![m.clone(); 10];
    many[0].p_value = Some(f64::NAN);
    let v = verdict(many);
    let c = charts(&v);
    assert_eq!(
        c.len(),
        CHARTS,
        "the first 8 metrics; the summary names all 10"
    );
    assert_eq!(c[1].samples.len(), CHART_POINTS);
    assert_eq!(c[1].baseline, base);
    assert_eq!(c[1].median, m.canary);
    assert_eq!(c[1].judgement, m.judgement);
    assert!(c[1].p_value.is_some());
    assert_eq!(c[0].p_value, None, "a NaN is not sent");
    // A metric that could not be read has no samples.
    let none = verdict(vec![MetricVerdict {
        samples: Samples::default(),
        ..m
    }]);
    assert!(charts(&none)[0].samples.is_empty());
}
