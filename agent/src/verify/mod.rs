//! Continuous verification (README, "verify:"): after health and smoke tests pass, the new version's
//! metrics are read from a [`MetricSource`] (Prometheus or CloudWatch) over `verify.duration`, checked
//! against thresholds and compared with a baseline (the old version) with a Mann-Whitney U
//! test; the result is a risk — low: go on, medium: pause for a human (or roll back, by
//! config), high: roll back. Too little data is *inconclusive* (medium), never a pass.
//!
//! [`judge`] and [`verdict`] are pure; [`run`] does the waiting and the queries.

mod cloudwatch;
mod prometheus;
pub mod stats;

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use cloudwatch::CloudWatch;
pub use prometheus::Prometheus;
use stats::{mann_whitney, median};

use crate::spec::{CwQuery, Direction, OnMedium, ResolvedMetric, ResolvedVerify, fill_side};

/// Significance for a failure.
const P_FAIL: f64 = 0.01;
/// Significance for a marginal result.
const P_MARGINAL: f64 = 0.05;

/// Why samples could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[allow(missing_docs, reason = "variant fields are named for what they hold")]
pub enum MetricError {
    /// The source did not answer.
    #[error("metric `{metric}`: cannot reach {url}: {message}")]
    Unreachable {
        metric: String,
        /// Source URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The source refused the query.
    #[error("metric `{metric}`: query rejected: {message} (query: {query})")]
    Query {
        metric: String,
        query: String,
        /// What the source said.
        message: String,
    },
}

/// The side a query measures: a version, and on ECS its colour's target group and load
/// balancer (as CloudWatch names them: `targetgroup/NAME/ID`, `app/NAME/ID`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Side<'a> {
    /// The version (`{version}`).
    pub version: &'a str,
    /// The target group (`{target_group}`).
    pub target_group: Option<&'a str>,
    /// The load balancer (`{load_balancer}`).
    pub load_balancer: Option<&'a str>,
}

impl<'a> Side<'a> {
    /// A side known by its version only (a vm host).
    pub fn version(version: &'a str) -> Side<'a> {
        Side {
            version,
            ..Side::default()
        }
    }

    fn vars(&self) -> Vec<(&'static str, &'a str)> {
        let mut v = vec![("version", self.version)];
        v.extend(self.target_group.map(|t| ("target_group", t)));
        v.extend(self.load_balancer.map(|l| ("load_balancer", l)));
        v
    }
}

/// One side's query: a metric's query with the side filled in.
#[derive(Clone, Debug, PartialEq)]
pub enum Query {
    /// PromQL.
    Promql(String),
    /// A CloudWatch metric.
    CloudWatch(CwQuery),
}

impl Query {
    /// The query of `m` for `side`.
    pub fn of(m: &ResolvedMetric, side: &Side) -> Query {
        let vars = side.vars();
        match &m.cloudwatch {
            Some(c) => Query::CloudWatch(c.fill(&vars)),
            None => Query::Promql(fill_side(&m.query, &vars)),
        }
    }
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Query::Promql(q) => f.write_str(q),
            Query::CloudWatch(c) => c.fmt(f),
        }
    }
}

/// Where metric samples come from (Prometheus, CloudWatch).
pub trait MetricSource {
    /// Samples of `query` from `start` to `end`, one per `step`, all series pooled; NaN and
    /// infinite values are dropped.
    fn range(
        &self,
        metric: &str,
        query: &Query,
        start: SystemTime,
        end: SystemTime,
        step: Duration,
    ) -> impl std::future::Future<Output = Result<Vec<f64>, MetricError>> + Send;
}

/// How bad a change is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    /// Go on.
    Low,
    /// Pause for a human (or roll back, by config).
    Medium,
    /// Roll back.
    High,
}

impl fmt::Display for Risk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Risk::Low => "low",
            Risk::Medium => "medium",
            Risk::High => "high",
        })
    }
}

/// One metric's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Judgement {
    /// Within thresholds and not significantly worse.
    Pass,
    /// Worse beyond tolerance, with weak significance.
    Marginal,
    /// Over a threshold, or worse beyond tolerance with strong significance.
    Fail,
    /// Too few samples (or none) to say.
    Inconclusive,
}

impl Judgement {
    /// The judgement's name.
    pub fn name(self) -> &'static str {
        match self {
            Judgement::Pass => "pass",
            Judgement::Marginal => "marginal",
            Judgement::Fail => "fail",
            Judgement::Inconclusive => "inconclusive",
        }
    }
}

/// The analysis of one metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricVerdict {
    /// Metric name.
    pub name: String,
    /// Result.
    pub judgement: Judgement,
    /// Samples of the new version.
    pub canary_points: usize,
    /// Median of the new version.
    pub canary: Option<f64>,
    /// Samples of the baseline.
    pub baseline_points: usize,
    /// Median of the baseline.
    pub baseline: Option<f64>,
    /// Mann-Whitney p-value.
    pub p_value: Option<f64>,
    /// Why, in words.
    pub detail: String,
    /// The samples judged (not kept in reports; the coordinator's dashboard charts them).
    #[serde(skip)]
    pub samples: Samples,
}

/// The verdict of a verification.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The risk.
    pub risk: Risk,
    /// Per metric.
    pub metrics: Vec<MetricVerdict>,
    /// A one-line summary.
    pub summary: String,
}

/// Samples read for one metric.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples {
    /// The new version.
    pub canary: Vec<f64>,
    /// The old version, if compared.
    pub baseline: Option<Vec<f64>>,
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 || (v.abs() >= 0.01 && v.abs() < 1e6) {
        format!("{v:.4}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        format!("{v:.3e}")
    }
}

/// Judges one metric from its samples. Pure.
pub fn judge(m: &ResolvedMetric, s: &Samples, min_points: usize) -> MetricVerdict {
    let mut v = MetricVerdict {
        name: m.name.clone(),
        judgement: Judgement::Pass,
        canary_points: s.canary.len(),
        canary: None,
        baseline_points: s.baseline.as_ref().map_or(0, Vec::len),
        baseline: None,
        p_value: None,
        detail: String::new(),
        samples: s.clone(),
    };
    if s.canary.len() < min_points {
        v.judgement = Judgement::Inconclusive;
        v.detail = format!(
            "{} sample(s) of the new version, {min_points} needed (is there traffic?)",
            s.canary.len()
        );
        return v;
    }
    let c = median(&s.canary);
    v.canary = Some(c);
    if let Some(max) = m.max
        && c > max
    {
        v.judgement = Judgement::Fail;
        v.detail = format!("median {} is over the maximum {}", fmt_num(c), fmt_num(max));
        return v;
    }
    if let Some(min) = m.min
        && c < min
    {
        v.judgement = Judgement::Fail;
        v.detail = format!(
            "median {} is under the minimum {}",
            fmt_num(c),
            fmt_num(min)
        );
        return v;
    }
    let Some(base) = s.baseline.as_ref().filter(|_| m.baseline) else {
        v.detail = format!("median {} within thresholds", fmt_num(c));
        return v;
    };
    if base.len() < min_points {
        v.judgement = Judgement::Inconclusive;
        v.detail = format!(
            "{} baseline sample(s), {min_points} needed (no host on the old version and no history before the switch?)",
            base.len()
        );
        return v;
    }
    let b = median(base);
    v.baseline = Some(b);
    let diff = c - b;
    let allowed = (m.tolerance * b.abs()).max(m.tolerance_abs);
    let worse = match m.direction {
        Direction::Increase => diff > allowed,
        Direction::Decrease => -diff > allowed,
        Direction::Either => diff.abs() > allowed,
    };
    let p = mann_whitney(&s.canary, base).map(|r| r.p);
    v.p_value = p;
    let change = if b != 0.0 {
        format!("{:+.1}%", diff / b.abs() * 100.0)
    } else {
        format!("{:+}", fmt_num(diff))
    };
    let sig = p
        .map(|p| format!("p = {p:.2e}"))
        .unwrap_or_else(|| "all samples equal".into());
    v.detail = format!(
        "median {} vs baseline {} ({change}, tolerance {}; {sig})",
        fmt_num(c),
        fmt_num(b),
        if m.tolerance_abs > 0.0 {
            format!(
                "{:.0}% or {}",
                m.tolerance * 100.0,
                fmt_num(m.tolerance_abs)
            )
        } else {
            format!("{:.0}%", m.tolerance * 100.0)
        }
    );
    v.judgement = match (worse, p) {
        (true, Some(p)) if p < P_FAIL => Judgement::Fail,
        (true, Some(p)) if p < P_MARGINAL => Judgement::Marginal,
        _ => Judgement::Pass,
    };
    v
}

/// The risk of a set of metric results. Pure.
pub fn verdict(metrics: Vec<MetricVerdict>) -> Verdict {
    let risk = if metrics.iter().any(|m| m.judgement == Judgement::Fail) {
        Risk::High
    } else if metrics
        .iter()
        .any(|m| matches!(m.judgement, Judgement::Marginal | Judgement::Inconclusive))
    {
        Risk::Medium
    } else {
        Risk::Low
    };
    let parts: Vec<String> = metrics
        .iter()
        .map(|m| format!("{}: {} — {}", m.name, m.judgement.name(), m.detail))
        .collect();
    Verdict {
        risk,
        summary: format!("risk {risk}: {}", parts.join("; ")),
        metrics,
    }
}

/// One metric of a verdict with the samples it was judged on, at most [`CHART_POINTS`] a
/// side, as reported to the coordinator for its charts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Chart {
    /// Metric name.
    pub name: String,
    /// Result.
    pub judgement: Judgement,
    /// Median of the new version.
    pub median: Option<f64>,
    /// Median of the baseline.
    pub baseline_median: Option<f64>,
    /// Mann-Whitney p-value.
    pub p_value: Option<f64>,
    /// The new version's samples (finite ones, evenly thinned), oldest first.
    pub samples: Vec<f64>,
    /// The baseline's samples, likewise.
    pub baseline: Vec<f64>,
}

// Every number of a chart is finite ([`charts`] drops the others), so equality is an
// equivalence.
impl Eq for Chart {}

/// Most samples a side of a [`Chart`] carries (the coordinator's limit).
pub const CHART_POINTS: usize = 120;
/// Most metrics charted (the coordinator's limit); the summary still names every metric.
pub const CHARTS: usize = 8;

/// At most `max` of `v`'s finite values, evenly spaced, in order. Pure.
pub fn thin(v: &[f64], max: usize) -> Vec<f64> {
    let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if finite.len() <= max {
        return finite;
    }
    (0..max).map(|i| finite[i * finite.len() / max]).collect()
}

/// The charts of a verdict's first [`CHARTS`] metrics. Pure.
pub fn charts(v: &Verdict) -> Vec<Chart> {
    let finite = |x: Option<f64>| x.filter(|x| x.is_finite());
    v.metrics
        .iter()
        .take(CHARTS)
        .map(|m| Chart {
            name: m.name.chars().take(64).collect(),
            judgement: m.judgement,
            median: finite(m.canary),
            baseline_median: finite(m.baseline),
            p_value: finite(m.p_value).filter(|p| (0.0..=1.0).contains(p)),
            samples: thin(&m.samples.canary, CHART_POINTS),
            baseline: thin(
                m.samples.baseline.as_deref().unwrap_or_default(),
                CHART_POINTS,
            ),
        })
        .collect()
}

/// What the deploy does with a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RiskResponse {
    /// Go on.
    Continue,
    /// Keep the version; pause the rollout for a human.
    Pause,
    /// Roll back.
    RollBack,
}

/// The decision for `risk` under `on_medium`. Pure.
pub fn decide(risk: Risk, on_medium: OnMedium) -> RiskResponse {
    match (risk, on_medium) {
        (Risk::Low, _) => RiskResponse::Continue,
        (Risk::Medium, OnMedium::Pause) => RiskResponse::Pause,
        (Risk::Medium, OnMedium::Rollback) | (Risk::High, _) => RiskResponse::RollBack,
    }
}

/// Watches the new side for `v.duration` (from now), then reads and judges every metric.
/// `old` is the side replaced (for baselines that select a side); `touched` is when the old
/// version stopped (the end of the "before the switch" baseline window).
pub async fn run<S: MetricSource>(
    source: &S,
    v: &ResolvedVerify,
    new: &Side<'_>,
    old: Option<&Side<'_>>,
    touched: SystemTime,
) -> Verdict {
    let start = SystemTime::now();
    tokio::time::sleep(v.duration.0).await;
    let end = SystemTime::now();
    analyze(source, v, new, old, touched, start, end).await
}

/// Reads and judges every metric over [`start`, `end`].
pub async fn analyze<S: MetricSource>(
    source: &S,
    v: &ResolvedVerify,
    new: &Side<'_>,
    old: Option<&Side<'_>>,
    touched: SystemTime,
    start: SystemTime,
    end: SystemTime,
) -> Verdict {
    let step = v.interval.0;
    let min = v.min_points as usize;
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for m in &v.metrics {
        let q_new = Query::of(m, new);
        let canary = match source.range(&m.name, &q_new, start, end, step).await {
            Ok(s) => s,
            Err(e) => {
                errors.push((m.name.clone(), e));
                continue;
            }
        };
        let mut baseline = None;
        if m.baseline {
            let q_old = old.map(|o| Query::of(m, o));
            // The old version's other hosts over the same window…
            let mut b = Vec::new();
            if let (true, Some(q)) = (m.by_version, &q_old) {
                match source.range(&m.name, q, start, end, step).await {
                    Ok(s) => b = s,
                    Err(e) => {
                        errors.push((m.name.clone(), e));
                        continue;
                    }
                }
            }
            // …or, when there is none, this host before the switch.
            if b.len() < min {
                let q = q_old.as_ref().unwrap_or(&q_new);
                let window = end.duration_since(start).unwrap_or(v.duration.0);
                let before = touched.checked_sub(window).unwrap_or(touched);
                match source.range(&m.name, q, before, touched, step).await {
                    Ok(s) if s.len() > b.len() => b = s,
                    Ok(_) => {}
                    Err(e) => {
                        errors.push((m.name.clone(), e));
                        continue;
                    }
                }
            }
            baseline = Some(b);
        }
        results.push(judge(m, &Samples { canary, baseline }, min));
    }
    for (name, e) in errors {
        results.push(MetricVerdict {
            name,
            judgement: if v.fail_open {
                Judgement::Pass
            } else {
                Judgement::Inconclusive
            },
            canary_points: 0,
            canary: None,
            baseline_points: 0,
            baseline: None,
            p_value: None,
            samples: Samples::default(),
            detail: if v.fail_open {
                format!("{e} (ignored: fail_open)")
            } else {
                format!("{e}; missing data is not a pass (fail_open: true would let it through)")
            },
        });
    }
    verdict(results)
}

#[cfg(test)]
mod tests;
