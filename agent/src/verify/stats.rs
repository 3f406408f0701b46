//! The Mann-Whitney U test (two-sided, normal approximation with tie and continuity
//! correction — scipy's `mannwhitneyu(x, y, method="asymptotic")`), as Kayenta and PipeCD use it
//! to compare a canary against its baseline without assuming a distribution.

/// The result of a Mann-Whitney U test.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MannWhitney {
    /// U statistic of the first sample.
    pub u: f64,
    /// Two-sided p-value.
    pub p: f64,
}

/// Ranks of the pooled samples (average ranks for ties) and the tie correction term
/// Σ(t³ − t) over groups of ties.
fn ranks(pooled: &mut [(f64, usize)]) -> (Vec<f64>, f64) {
    pooled.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = pooled.len();
    let mut ranks = vec![0.0; n];
    let mut ties = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && pooled[j].0 == pooled[i].0 {
            j += 1;
        }
        // Positions i..j share the average of ranks i+1..=j.
        let avg = (i + 1 + j) as f64 / 2.0;
        for p in &pooled[i..j] {
            ranks[p.1] = avg;
        }
        let t = (j - i) as f64;
        ties += t * t * t - t;
        i = j;
    }
    (ranks, ties)
}

/// Two-sided Mann-Whitney U test of `x` against `y`. `None` if either sample is empty or every
/// value is the same (the test says nothing then).
pub fn mann_whitney(x: &[f64], y: &[f64]) -> Option<MannWhitney> {
    let (n1, n2) = (x.len() as f64, y.len() as f64);
    if x.is_empty() || y.is_empty() {
        return None;
    }
    let mut pooled: Vec<(f64, usize)> = x
        .iter()
        .chain(y.iter())
        .copied()
        .enumerate()
        .map(|(i, v)| (v, i))
        .collect();
    let (ranks, ties) = ranks(&mut pooled);
    let r1: f64 = ranks[..x.len()].iter().sum();
    let u1 = r1 - n1 * (n1 + 1.0) / 2.0;
    let u2 = n1 * n2 - u1;
    let n = n1 + n2;
    let mu = n1 * n2 / 2.0;
    let var = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if var <= 0.0 {
        return None;
    }
    // Two-sided: the larger U, with a continuity correction of 0.5.
    let u = u1.max(u2);
    let z = (u - mu - 0.5) / var.sqrt();
    let p = (2.0 * normal_sf(z)).clamp(0.0, 1.0);
    Some(MannWhitney { u: u1, p })
}

/// Survival function of the standard normal distribution.
fn normal_sf(z: f64) -> f64 {
    0.5 * libm::erfc(z / std::f64::consts::SQRT_2)
}

/// The median of `v` (`NaN` if empty).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made by `tools/mannwhitney_fixtures.py` with scipy 1.17.1:
    /// `scipy.stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic")`.
    /// (x, y, U1, p)
    #[allow(clippy::type_complexity)]
    const FIXTURES: &[(&[f64], &[f64], f64, f64)] = include!("mannwhitney_fixtures.in");

    #[test]
    fn matches_scipy() {
        assert!(FIXTURES.len() >= 8);
        for (i, (x, y, u, p)) in FIXTURES.iter().enumerate() {
            let r = mann_whitney(x, y).expect("defined");
            assert!((r.u - u).abs() < 1e-9, "case {i}: U {} vs scipy {u}", r.u);
            let tol = 1e-9_f64.max(p * 1e-6);
            assert!((r.p - p).abs() < tol, "case {i}: p {} vs scipy {p}", r.p);
        }
    }

    #[test]
    fn degenerate_samples() {
        assert_eq!(mann_whitney(&[], &[1.0]), None);
        assert_eq!(mann_whitney(&[1.0, 1.0], &[1.0, 1.0]), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
