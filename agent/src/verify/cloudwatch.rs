//! CloudWatch as a [`MetricSource`]: `GetMetricData` of one metric, or of a ratio of two
//! computed period by period (CloudWatch's metric math is not needed, so any endpoint that
//! answers `MetricStat` queries will do).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use aws_sdk_cloudwatch::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{
    Dimension, Metric, MetricDataQuery, MetricStat, ScanBy, StatusCode,
};

use super::{MetricError, MetricSource, Query};
use crate::spec::CwQuery;

/// Pages read per query at most (each holds up to 100,800 points: far more than a window).
const MAX_PAGES: usize = 10;
/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// A CloudWatch endpoint.
#[derive(Clone, Debug)]
pub struct CloudWatch {
    client: aws_sdk_cloudwatch::Client,
    calls: Arc<AtomicU64>,
}

impl CloudWatch {
    /// A source over `client`; each call it makes is counted in `calls`.
    pub fn new(client: aws_sdk_cloudwatch::Client, calls: Arc<AtomicU64>) -> CloudWatch {
        CloudWatch { client, calls }
    }

    /// A client for `region` (else the SDK's default chain: `AWS_REGION`, the profile, the
    /// instance's region), with credentials and endpoint from the default chain.
    pub async fn connect(region: Option<&str>) -> CloudWatch {
        let mut conf = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(r) = region {
            conf = conf.region(aws_config::Region::new(r.to_string()));
        }
        let conf = conf.load().await;
        CloudWatch::new(aws_sdk_cloudwatch::Client::new(&conf), Arc::default())
    }
}

/// The CloudWatch period for a sample step: 1, 5, 10 or 30 seconds, or a whole number of
/// minutes (the step rounded up to the next of these). Pure.
pub fn period(step: Duration) -> i32 {
    let s = step.as_secs_f64().ceil().max(1.0) as u64;
    let p = match s {
        1 => 1,
        2..=5 => 5,
        6..=10 => 10,
        11..=30 => 30,
        _ => s.div_ceil(60) * 60,
    };
    i32::try_from(p).unwrap_or(i32::MAX / 60 * 60)
}

/// One value per period: the metric's, or its ratio to the divisor. A period with no point of
/// the metric counts as 0 (CloudWatch publishes no zero counts); one with no divisor, or a
/// divisor of 0, has no ratio. Non-finite values are dropped. Pure.
pub fn combine(
    values: &BTreeMap<(i64, u32), f64>,
    divisor: Option<&BTreeMap<(i64, u32), f64>>,
) -> Vec<f64> {
    match divisor {
        None => values.values().copied().filter(|v| v.is_finite()).collect(),
        Some(d) => d
            .iter()
            .filter(|(_, d)| d.is_finite() && **d > 0.0)
            .map(|(t, d)| values.get(t).copied().unwrap_or(0.0) / d)
            .filter(|v| v.is_finite())
            .collect(),
    }
}

fn stat_query(id: &str, q: &CwQuery, metric: &str, stat: &str, period: i32) -> MetricDataQuery {
    let dims = q
        .dimensions
        .iter()
        .map(|(k, v)| Dimension::builder().name(k).value(v).build())
        .collect();
    MetricDataQuery::builder()
        .id(id)
        .metric_stat(
            MetricStat::builder()
                .metric(
                    Metric::builder()
                        .namespace(&q.namespace)
                        .metric_name(metric)
                        .set_dimensions(Some(dims))
                        .build(),
                )
                .period(period)
                .stat(stat)
                .build(),
        )
        .return_data(true)
        .build()
}

impl MetricSource for CloudWatch {
    async fn range(
        &self,
        metric: &str,
        query: &Query,
        start: SystemTime,
        end: SystemTime,
        step: Duration,
    ) -> Result<Vec<f64>, MetricError> {
        let Query::CloudWatch(q) = query else {
            return Err(MetricError::Query {
                metric: metric.into(),
                query: query.to_string(),
                message: "a PromQL query cannot be read from CloudWatch".into(),
            });
        };
        let unreachable = |message: String| MetricError::Unreachable {
            metric: metric.into(),
            url: "CloudWatch".into(),
            message,
        };
        let period = period(step);
        let mut queries = vec![stat_query("m", q, &q.metric, &q.stat, period)];
        if let Some((m, s)) = &q.divide_by {
            queries.push(stat_query("d", q, m, s, period));
        }
        let (mut values, mut divisor) = (BTreeMap::new(), BTreeMap::new());
        let mut token = None;
        for _ in 0..MAX_PAGES {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let call = self
                .client
                .get_metric_data()
                .set_metric_data_queries(Some(queries.clone()))
                .start_time(DateTime::from(start))
                .end_time(DateTime::from(end))
                .scan_by(ScanBy::TimestampAscending)
                .set_next_token(token.take())
                .send();
            let out = match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Err(_) => return Err(unreachable(format!("no answer in {CALL_TIMEOUT:?}"))),
                Ok(Err(SdkError::ServiceError(e)))
                    if e.raw().status().is_client_error()
                        && !matches!(
                            e.err().code(),
                            Some("Throttling" | "ThrottlingException")
                        ) =>
                {
                    let e = e.into_err();
                    return Err(MetricError::Query {
                        metric: metric.into(),
                        query: query.to_string(),
                        message: format!(
                            "{}: {}",
                            e.code().unwrap_or("error"),
                            e.message().unwrap_or("no message")
                        ),
                    });
                }
                Ok(Err(e)) => {
                    let detail = match e.code() {
                        Some(code) => format!("{code}: {}", e.message().unwrap_or("no message")),
                        None => crate::artifact::error_chain(&e),
                    };
                    return Err(unreachable(format!("GetMetricData: {detail}")));
                }
                Ok(Ok(out)) => out,
            };
            for r in out.metric_data_results() {
                if r.status_code() == Some(&StatusCode::InternalError) {
                    let why: Vec<&str> = r.messages().iter().filter_map(|m| m.value()).collect();
                    return Err(unreachable(format!(
                        "GetMetricData answered InternalError: {}",
                        why.join("; ")
                    )));
                }
                let into = match r.id() {
                    Some("m") => &mut values,
                    Some("d") => &mut divisor,
                    _ => continue,
                };
                for (t, v) in r.timestamps().iter().zip(r.values()) {
                    into.insert((t.secs(), t.subsec_nanos()), *v);
                }
            }
            token = out.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        Ok(combine(&values, q.divide_by.as_ref().map(|_| &divisor)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_ones_cloudwatch_accepts() {
        let p = |ms: u64| period(Duration::from_millis(ms));
        assert_eq!(p(0), 1);
        assert_eq!(p(1000), 1);
        assert_eq!(p(1500), 5);
        assert_eq!(p(10_000), 10);
        assert_eq!(p(20_000), 30);
        assert_eq!(p(30_000), 30);
        assert_eq!(p(31_000), 60);
        assert_eq!(p(60_000), 60);
        assert_eq!(p(61_000), 120);
        assert_eq!(p(300_000), 300);
    }

    #[test]
    fn a_ratio_counts_missing_numerators_as_zero_and_skips_empty_divisors() {
        let at = |s: i64| (s, 0u32);
        let errors: BTreeMap<_, _> = [(at(60), 5.0), (at(180), 1.0), (at(240), f64::NAN)].into();
        let requests: BTreeMap<_, _> = [
            (at(0), 100.0),
            (at(60), 50.0),
            (at(120), 0.0),
            (at(180), 10.0),
            (at(240), 10.0),
        ]
        .into();
        assert_eq!(combine(&errors, Some(&requests)), vec![0.0, 0.1, 0.1]);
        // Without a divisor: the metric's own finite values.
        assert_eq!(combine(&errors, None), vec![5.0, 1.0]);
        assert!(combine(&errors, Some(&BTreeMap::new())).is_empty());
    }
}
