//! Prometheus as a [`MetricSource`]: `GET /api/v1/query_range`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{MetricError, MetricSource, Query};
use crate::artifact::error_chain;

/// A Prometheus server.
#[derive(Clone, Debug)]
pub struct Prometheus {
    client: reqwest::Client,
    base: String,
}

impl Prometheus {
    /// The server at `base` (e.g. `http://prometheus:9090`).
    pub fn new(client: reqwest::Client, base: &str) -> Prometheus {
        Prometheus {
            client,
            base: base.trim_end_matches('/').to_string(),
        }
    }
}

fn secs(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}

impl MetricSource for Prometheus {
    async fn range(
        &self,
        metric: &str,
        query: &Query,
        start: SystemTime,
        end: SystemTime,
        step: Duration,
    ) -> Result<Vec<f64>, MetricError> {
        let Query::Promql(query) = query else {
            return Err(MetricError::Query {
                metric: metric.into(),
                query: query.to_string(),
                message: "a CloudWatch metric cannot be read from Prometheus".into(),
            });
        };
        let unreachable = |message: String| MetricError::Unreachable {
            metric: metric.into(),
            url: self.base.clone(),
            message,
        };
        let url = url::Url::parse_with_params(
            &format!("{}/api/v1/query_range", self.base),
            [
                ("query", query.to_string()),
                ("start", secs(start)),
                ("end", secs(end)),
                ("step", format!("{:.3}", step.as_secs_f64().max(0.001))),
            ],
        )
        .map_err(|e| unreachable(e.to_string()))?;
        let resp = self
            .client
            .get(url)
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| unreachable(format!("HTTP {status} with an unreadable body: {e}")))?;
        if body["status"] != "success" {
            let message = format!(
                "{}: {}",
                body["errorType"].as_str().unwrap_or("error"),
                body["error"].as_str().unwrap_or("no message")
            );
            return Err(if (400..500).contains(&status) {
                MetricError::Query {
                    metric: metric.into(),
                    query: query.into(),
                    message,
                }
            } else {
                unreachable(format!("HTTP {status}: {message}"))
            });
        }
        let mut out = Vec::new();
        for series in body["data"]["result"].as_array().into_iter().flatten() {
            for point in series["values"].as_array().into_iter().flatten() {
                if let Some(v) = point[1].as_str().and_then(|s| s.parse::<f64>().ok())
                    && v.is_finite()
                {
                    out.push(v);
                }
            }
        }
        Ok(out)
    }
}
