//! Verification cost: one analysis of 5 metrics × 300 points (canary and baseline), CPU time,
//! network excluded (the samples come from memory).
//!
//!     cargo bench -p drover-agent --bench verify

use std::time::{Duration, SystemTime};

use drover_agent::spec::{Direction, Dur, OnMedium, ResolvedMetric, ResolvedVerify};
use drover_agent::verify::{MetricError, MetricSource, Query, Side, analyze};

/// 300 samples per query, a little different per version.
struct InMemory;

impl MetricSource for InMemory {
    async fn range(
        &self,
        _metric: &str,
        query: &Query,
        _start: SystemTime,
        _end: SystemTime,
        _step: Duration,
    ) -> Result<Vec<f64>, MetricError> {
        let query = query.to_string();
        let shift = if query.contains("\"2.0\"") { 1.02 } else { 1.0 };
        let mut x: u64 = query.len() as u64 * 2_654_435_761;
        Ok((0..300)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (100.0 + (x >> 40) as f64 / (1u64 << 24) as f64 * 10.0) * shift
            })
            .collect())
    }
}

fn cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn main() {
    let v = ResolvedVerify {
        duration: Dur::secs(120),
        interval: Dur::secs(1),
        prometheus: "http://in-memory".into(),
        cloudwatch: None,
        on_medium: OnMedium::Pause,
        fail_open: false,
        min_points: 6,
        metrics: (0..5)
            .map(|i| ResolvedMetric {
                name: format!("m{i}"),
                query: format!(r#"metric_{i}{{version="{{version}}"}}"#),
                cloudwatch: None,
                by_version: true,
                max: Some(1e9),
                min: None,
                baseline: true,
                direction: Direction::Increase,
                tolerance: 0.1,
                tolerance_abs: 0.0,
            })
            .collect(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let now = SystemTime::now();
    let run = || {
        rt.block_on(analyze(
            &InMemory,
            &v,
            &Side::version("2.0"),
            Some(&Side::version("1.0")),
            now,
            now,
            now,
        ))
    };
    for _ in 0..20 {
        run();
    }
    let n = 500;
    let t0 = cpu();
    let mut risk = None;
    for _ in 0..n {
        risk = Some(run().risk);
    }
    let per = (cpu() - t0) / n;
    println!(
        "verification of 5 metrics × 300 points (canary + baseline, Mann-Whitney each): {:.3} ms CPU per analysis (risk {}), target ≤ 5 ms",
        per.as_secs_f64() * 1e3,
        risk.unwrap()
    );
}
