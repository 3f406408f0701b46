//! Charts drawn on the server as inline SVG: an ECS rollout's traffic weights over time, and a
//! verdict's metric samples against the baseline's. Pure: data in, markup out. No script and
//! no `style` attribute (the CSP allows neither): colours come from classes in `style.css`.
//! Every name from a host goes through [`esc`]; numbers are formatted by Rust.

use std::fmt::Write as _;

use super::html::esc;
use crate::view::time;
use crate::wire::{Chart, MetricSeries, TrafficPoint};

/// Plot area, in SVG user units.
const W: f64 = 480.0;
const H: f64 = 120.0;
/// Margins for the axis labels.
const LEFT: f64 = 52.0;
const BOTTOM: f64 = 18.0;
const TOP: f64 = 8.0;

/// A number for a label: short, and never `NaN` (the inputs are finite).
fn num(v: f64) -> String {
    if v == 0.0 || (v.abs() >= 0.01 && v.abs() < 1e6) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.2e}")
    }
}

fn svg_open(b: &mut String, label: &str) {
    let _ = write!(
        b,
        "<svg class=\"chart\" viewBox=\"0 0 {} {}\" width=\"{}\" height=\"{}\" role=\"img\" aria-label=\"{}\">",
        LEFT + W + 8.0,
        TOP + H + BOTTOM,
        LEFT + W + 8.0,
        TOP + H + BOTTOM,
        esc(label)
    );
    let _ = write!(
        b,
        "<rect class=\"frame\" x=\"{LEFT}\" y=\"{TOP}\" width=\"{W}\" height=\"{H}\"/>"
    );
}

/// The y of `v` on a scale from `lo` to `hi`.
fn y(v: f64, lo: f64, hi: f64) -> f64 {
    TOP + H - (v - lo) / (hi - lo) * H
}

fn y_label(b: &mut String, v: f64, lo: f64, hi: f64, text: &str) {
    let _ = write!(
        b,
        "<text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
        LEFT - 4.0,
        y(v, lo, hi) + 4.0,
        esc(text)
    );
}

fn x_label(b: &mut String, x: f64, anchor: &str, text: &str) {
    let _ = write!(
        b,
        "<text class=\"axis\" x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{}</text>",
        TOP + H + BOTTOM - 4.0,
        esc(text)
    );
}

/// The traffic weights the ECS agents of a rollout set, as a step line per agent over time,
/// with the same points as a list (readable without the picture).
pub fn traffic(points: &[TrafficPoint]) -> String {
    if points.is_empty() {
        return String::new();
    }
    let t0 = points.iter().map(|p| p.at_ms).min().unwrap_or(0);
    let t1 = points.iter().map(|p| p.at_ms).max().unwrap_or(t0);
    // The line runs on to the right edge: the last weight holds until now.
    let span = (t1 - t0).max(1) as f64 * 1.1;
    let x = |at: u64| LEFT + (at - t0) as f64 / span * W;
    let mut b = String::from("<figure class=\"traffic\">");
    svg_open(&mut b, "the new side's share of the traffic over time");
    for (v, label) in [(0.0, "0%"), (50.0, "50%"), (100.0, "100%")] {
        y_label(&mut b, v, 0.0, 100.0, label);
        let _ = write!(
            b,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{1:.1}\" y2=\"{1:.1}\"/>",
            LEFT + W,
            y(v, 0.0, 100.0)
        );
    }
    let mut hosts: Vec<&str> = points.iter().map(|p| p.host.as_str()).collect();
    hosts.sort_unstable();
    hosts.dedup();
    for (i, host) in hosts.iter().enumerate() {
        let mut d = String::new();
        let mut last = None;
        for p in points.iter().filter(|p| p.host == *host) {
            let (px, py) = (x(p.at_ms), y(f64::from(p.percent), 0.0, 100.0));
            match last {
                None => {
                    let _ = write!(d, "M{px:.1},{py:.1}");
                }
                Some(ly) => {
                    let _ = write!(d, " L{px:.1},{ly:.1} L{px:.1},{py:.1}");
                }
            }
            last = Some(py);
        }
        if let Some(ly) = last {
            let _ = write!(d, " L{:.1},{ly:.1}", LEFT + W);
        }
        let _ = write!(
            b,
            "<path class=\"weight s{}\" d=\"{d}\"><title>{}</title></path>",
            i % 4,
            esc(host)
        );
    }
    x_label(&mut b, LEFT, "start", &time(t0)[11..]);
    if t1 > t0 {
        x_label(&mut b, x(t1), "end", &time(t1)[11..]);
    }
    b.push_str("</svg><figcaption><ol class=\"weights\">");
    for p in points {
        let _ = write!(
            b,
            "<li>{} {}%{}</li>",
            time(p.at_ms),
            p.percent,
            if hosts.len() > 1 {
                format!(" ({})", esc(&p.host))
            } else {
                String::new()
            }
        );
    }
    b.push_str("</ol></figcaption></figure>");
    b
}

/// A polyline of `v` over the plot's width (index as time), on the scale `lo`..`hi`.
fn line(b: &mut String, class: &str, v: &[f64], lo: f64, hi: f64) {
    if v.is_empty() {
        return;
    }
    let step = if v.len() > 1 {
        W / (v.len() - 1) as f64
    } else {
        0.0
    };
    let pts: Vec<String> = v
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{:.1},{:.1}", LEFT + i as f64 * step, y(*s, lo, hi)))
        .collect();
    let _ = write!(
        b,
        "<polyline class=\"{class}\" points=\"{}\"/>",
        pts.join(" ")
    );
}

fn median_line(b: &mut String, class: &str, v: Option<f64>, lo: f64, hi: f64) {
    if let Some(m) = v {
        let _ = write!(
            b,
            "<line class=\"{class}\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{1:.1}\" y2=\"{1:.1}\"/>",
            LEFT + W,
            y(m, lo, hi)
        );
    }
}

/// One metric: the new version's samples against the baseline's over the window, each with
/// its median, and the numbers under it.
pub fn series(m: &MetricSeries) -> String {
    let all = m
        .samples
        .iter()
        .chain(&m.baseline)
        .chain(m.median.iter())
        .chain(m.baseline_median.iter())
        .copied()
        .filter(|v| v.is_finite());
    let (mut lo, mut hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = if hi > lo {
        (hi - lo) * 0.08
    } else {
        lo.abs().max(1.0) * 0.1
    };
    let (lo, hi) = (lo - pad, hi + pad);
    let mut b = format!("<figure class=\"metric j-{}\">", esc(&m.judgement));
    svg_open(&mut b, &format!("{}: new version against baseline", m.name));
    y_label(&mut b, hi - pad, lo, hi, &num(hi - pad));
    y_label(&mut b, lo + pad, lo, hi, &num(lo + pad));
    line(&mut b, "base", &m.baseline, lo, hi);
    line(&mut b, "new", &m.samples, lo, hi);
    median_line(&mut b, "base-median", m.baseline_median, lo, hi);
    median_line(&mut b, "new-median", m.median, lo, hi);
    x_label(&mut b, LEFT, "start", "window start");
    x_label(&mut b, LEFT + W, "end", "end");
    let opt = |v: Option<f64>| v.map(num).unwrap_or_else(|| "–".into());
    let _ = write!(
        b,
        "</svg><figcaption><b>{}</b> {} — <span class=\"new\">new</span> median {} ({} samples), \
         <span class=\"base\">baseline</span> median {} ({} samples), p-value {}</figcaption></figure>",
        esc(&m.name),
        esc(&m.judgement),
        opt(m.median),
        m.samples.len(),
        opt(m.baseline_median),
        m.baseline.len(),
        m.p_value
            .map(|p| format!("{p:.2e}"))
            .unwrap_or_else(|| "–".into()),
    );
    b
}

/// A host's verdict: a chart per metric.
pub fn verdict(c: &Chart) -> String {
    let mut b = format!(
        "<div class=\"charts risk-{}\"><h3>{} <span class=\"risk\">risk {}</span> <small>{}</small></h3>",
        c.risk,
        esc(&c.host),
        c.risk,
        time(c.at_ms)
    );
    for m in &c.metrics {
        b.push_str(&series(m));
    }
    b.push_str("</div>");
    b
}
