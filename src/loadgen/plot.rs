//! The latency plot of a `gram bench` run, as a self-contained SVG (written by hand): on the
//! left a histogram of the answered requests' latencies (log-spaced bins), on the right the
//! latency at each percentile, on a "nines" axis (50%, 90%, 99%, 99.9%, ...) where the tail is
//! as wide as the body.

use std::fmt::Write;

use super::{Report, Sample, Status};

const W: f64 = 1000.0;
const H: f64 = 440.0;
/// Plot areas: (left, top, width, height).
const HIST: (f64, f64, f64, f64) = (70.0, 70.0, 380.0, 300.0);
const PCT: (f64, f64, f64, f64) = (580.0, 70.0, 380.0, 300.0);

/// The SVG of `report`'s run.
pub fn svg(report: &Report, samples: &[Sample]) -> String {
    let mut lat: Vec<f64> = samples
        .iter()
        .filter(|s| s.status == Status::Http(200))
        .map(|s| s.latency_s * 1e3)
        .collect();
    lat.sort_by(f64::total_cmp);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let load = match (report.mode.as_str(), report.concurrency, report.rate) {
        ("open", _, Some(r)) => format!("open loop at {r} req/s"),
        (_, Some(c), _) => format!("closed loop, concurrency {c}"),
        _ => report.mode.to_string(),
    };
    let errors: Vec<String> = report
        .errors
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let l = &report.latency_ms;
    text(
        &mut out,
        W / 2.0,
        22.0,
        "middle",
        15,
        &format!(
            "gram bench — {load} — {} requests in {:.1} s, {:.1} answered/s",
            report.requests, report.elapsed_s, report.qps
        ),
    );
    text(
        &mut out,
        W / 2.0,
        42.0,
        "middle",
        12,
        &format!(
            "latency (ms, 200s): p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}   errors: {}",
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            if errors.is_empty() {
                "none".to_string()
            } else {
                errors.join(", ")
            }
        ),
    );
    let t = &report.latency_with_timeouts_ms;
    if t.n > l.n {
        text(
            &mut out,
            W / 2.0,
            58.0,
            "middle",
            12,
            &format!(
                "with the {} deadline answers (504) and client timeouts, each at the time it ended: \
                 p90 {:.2}  p99 {:.2}  p99.9 {:.2}",
                t.n - l.n,
                t.p90,
                t.p99,
                t.p999
            ),
        );
    }
    if lat.is_empty() {
        text(
            &mut out,
            W / 2.0,
            H / 2.0,
            "middle",
            14,
            "no answered requests",
        );
        out.push_str("</svg>\n");
        return out;
    }
    histogram(&mut out, &lat);
    percentiles(&mut out, &lat);
    out.push_str("</svg>\n");
    out
}

fn text(out: &mut String, x: f64, y: f64, anchor: &str, size: u32, s: &str) {
    let s = s
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let _ = writeln!(
        out,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" font-size="{size}">{s}</text>"#
    );
}

fn line(out: &mut String, (x1, y1): (f64, f64), (x2, y2): (f64, f64), style: &str) {
    let _ = writeln!(
        out,
        r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" {style}/>"#
    );
}

/// A short label for a tick value.
fn fmt_tick(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Histogram of `lat` (sorted, ms) over log-spaced bins.
fn histogram(out: &mut String, lat: &[f64]) {
    let (x0, y0, w, h) = HIST;
    let lo = lat[0].max(1e-3);
    let hi = lat[lat.len() - 1].max(lo * 1.5);
    let (llo, lhi) = (lo.log10(), hi.log10());
    let bins = 40;
    let mut counts = vec![0usize; bins];
    for &v in lat {
        let f = (v.max(lo).log10() - llo) / (lhi - llo);
        counts[((f * bins as f64) as usize).min(bins - 1)] += 1;
    }
    let top = *counts.iter().max().expect("40 bins") as f64;
    let xs = |v: f64| x0 + (v.log10() - llo) / (lhi - llo) * w;
    for (i, &c) in counts.iter().enumerate() {
        let bh = c as f64 / top * h;
        let _ = writeln!(
            out,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="#4c78a8"/>"##,
            x0 + i as f64 * w / bins as f64 + 0.5,
            y0 + h - bh,
            w / bins as f64 - 1.0
        );
    }
    axes(out, HIST);
    // x ticks: 1, 2, 5 × powers of ten over a wide range; evenly spaced ones over a narrow one.
    let mut ticks = Vec::new();
    if hi / lo < 4.0 {
        let step = nice_step((hi - lo) / 8.0);
        let mut v = (lo / step).ceil() * step;
        while v <= hi {
            ticks.push(v);
            v += step;
        }
    } else {
        let mut decade = 10f64.powf(llo.floor());
        while decade <= hi {
            ticks.extend([1.0, 2.0, 5.0].map(|m| m * decade));
            decade *= 10.0;
        }
    }
    for v in ticks.into_iter().filter(|&v| v >= lo && v <= hi) {
        let x = xs(v);
        line(out, (x, y0 + h), (x, y0 + h + 5.0), r#"stroke="black""#);
        text(out, x, y0 + h + 18.0, "middle", 11, &fmt_tick(v));
    }
    let step = nice_step(top / 4.0).max(1.0);
    let mut c = 0.0;
    while c <= top {
        let y = y0 + h - c / top * h;
        line(out, (x0 - 5.0, y), (x0, y), r#"stroke="black""#);
        text(out, x0 - 8.0, y + 4.0, "end", 11, &format!("{c:.0}"));
        c += step;
    }
    text(
        out,
        x0 + w / 2.0,
        y0 + h + 38.0,
        "middle",
        12,
        "latency (ms, log scale)",
    );
    text(
        out,
        x0 + w / 2.0,
        y0 - 8.0,
        "middle",
        13,
        "latency histogram",
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12" transform="rotate(-90 {:.1} {:.1})">requests</text>"#,
        x0 - 45.0,
        y0 + h / 2.0,
        x0 - 45.0,
        y0 + h / 2.0
    );
}

/// Latency (ms, linear) against percentile on a nines axis: x = -log10(1 - p).
fn percentiles(out: &mut String, lat: &[f64]) {
    let (x0, y0, w, h) = PCT;
    let n = lat.len();
    // The axis ends at the last sample, p = (n - 1) / n: 99.9% needs 1,000 of them.
    let nines = (n as f64).log10().clamp(1.0, 5.0);
    let step = nice_step(lat[n - 1] / 4.0);
    let ymax = (lat[n - 1] / step).ceil().max(1.0) * step;
    let xs = |x: f64| x0 + x.min(nines) / nines * w;
    let ys = |v: f64| y0 + h - v / ymax * h;
    // One point per sample, thinned to about 2,000 along the axis.
    let mut pts = String::new();
    let mut last = f64::NEG_INFINITY;
    for (i, &v) in lat.iter().enumerate() {
        // Nearest rank: sample i is the latency of every q in (i/n, (i+1)/n], drawn at its
        // right end (the max at the right edge, the labelled percentiles on their lines).
        let p = (i + 1) as f64 / n as f64;
        let x = xs(-(1.0 - p).log10());
        if x - last >= w / 2000.0 || i + 1 == n {
            let _ = write!(pts, "{x:.1},{:.1} ", ys(v));
            last = x;
        }
    }
    let _ = writeln!(
        out,
        r##"<polyline points="{pts}" fill="none" stroke="#e45756" stroke-width="2"/>"##
    );
    axes(out, PCT);
    for k in 0..=nines.floor() as usize {
        let x = xs(k as f64);
        let label = match k {
            0 => "0%".to_string(),
            1 => "90%".to_string(),
            k => format!("99.{}%", "9".repeat(k - 2)).replace(".%", "%"),
        };
        line(out, (x, y0 + h), (x, y0 + h + 5.0), r#"stroke="black""#);
        text(out, x, y0 + h + 18.0, "middle", 11, &label);
    }
    for (q, name) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")] {
        let x = -(1.0f64 - q).log10();
        if x > nines {
            continue;
        }
        let v = super::rank(lat, q);
        line(
            out,
            (xs(x), y0),
            (xs(x), y0 + h),
            r##"stroke="#999" stroke-dasharray="3,3""##,
        );
        // Labels left of the line at the right edge, right of it elsewhere.
        let (dx, anchor) = if x + 0.3 > nines {
            (-3.0, "end")
        } else {
            (3.0, "start")
        };
        text(
            out,
            xs(x) + dx,
            ys(v) - 6.0,
            anchor,
            10,
            &format!("{name} {}", fmt_tick(v)),
        );
    }
    let mut v = 0.0;
    while v <= ymax * 1.0001 {
        line(out, (x0 - 5.0, ys(v)), (x0, ys(v)), r#"stroke="black""#);
        text(out, x0 - 8.0, ys(v) + 4.0, "end", 11, &fmt_tick(v));
        v += step;
    }
    text(out, x0 + w / 2.0, y0 + h + 38.0, "middle", 12, "percentile");
    text(
        out,
        x0 + w / 2.0,
        y0 - 8.0,
        "middle",
        13,
        "latency by percentile",
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12" transform="rotate(-90 {:.1} {:.1})">latency (ms)</text>"#,
        x0 - 50.0,
        y0 + h / 2.0,
        x0 - 50.0,
        y0 + h / 2.0
    );
}

/// 1, 2 or 5 × a power of ten, at least `x`.
fn nice_step(x: f64) -> f64 {
    if !(x > 0.0 && x.is_finite()) {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&s| s >= x)
        .unwrap_or(10.0 * p)
}

fn axes(out: &mut String, (x0, y0, w, h): (f64, f64, f64, f64)) {
    line(out, (x0, y0 + h), (x0 + w, y0 + h), r#"stroke="black""#);
    line(out, (x0, y0), (x0, y0 + h), r#"stroke="black""#);
}
