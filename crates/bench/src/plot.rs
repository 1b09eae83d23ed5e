//! SVG charts of a results file (plotters' SVG backend; text is left to the viewer's fonts,
//! so no font files are needed here).
//!
//! `nestor-bench plot --results docs/bench/results-<date>.json --out docs/bench` writes:
//! * `rest-latency.svg` — REST latency percentiles, 1 connection and N connections;
//! * `rest-throughput.svg` — REST requests/s and proxy CPU per request;
//! * `ws-latency.svg` — per-frame WebSocket latency percentiles;
//! * `ws-throughput.svg` — WebSocket frames/s, one pair and many pairs.

use std::path::Path;

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::Results;
use crate::stats::{Latency, Target};

const W: u32 = 960;
const H: u32 = 420;

fn color(t: Target) -> RGBColor {
    match t {
        Target::Direct => RGBColor(120, 120, 120),
        Target::Nestor => RGBColor(31, 119, 180),
        Target::Nginx => RGBColor(44, 160, 44),
        Target::Relay => RGBColor(200, 160, 60),
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Bars grouped by `groups`, one bar per series in each group; values printed on the bars.
fn grouped_bars(area: &Area<'_>, title: &str, y_desc: &str, groups: &[String], series: &[(Target, Vec<f64>)], decimals: usize) -> anyhow::Result<()> {
    let n = groups.len().max(1);
    let max = series.iter().flat_map(|(_, v)| v.iter().cloned()).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    let top = if max > 0.0 { max * 1.18 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_desc)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let k = series.len().max(1) as f64;
    let bw = 0.8 / k;
    for (si, (t, vals)) in series.iter().enumerate() {
        let c = color(*t);
        let bars: Vec<(f64, f64, f64)> = vals
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(gi, v)| {
                let x0 = gi as f64 + 0.1 + si as f64 * bw;
                (x0, x0 + bw * 0.92, *v)
            })
            .collect();
        chart
            .draw_series(bars.iter().map(|(x0, x1, v)| Rectangle::new([(*x0, 0.0), (*x1, *v)], c.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(t.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        chart
            .draw_series(bars.iter().map(|(x0, x1, v)| {
                Text::new(
                    format!("{v:.decimals$}"),
                    ((x0 + x1) / 2.0, *v + top * 0.01),
                    ("sans-serif", 11).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    // Group names under the axis, centred on their group.
    chart
        .draw_series(groups.iter().enumerate().map(|(i, g)| {
            Text::new(
                g.clone(),
                (i as f64 + 0.5, -top * 0.02),
                ("sans-serif", 14).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top)),
            )
        }))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn percentile_series(get: impl Fn(Target) -> Option<Latency>) -> Vec<(Target, Vec<f64>)> {
    Target::ALL
        .iter()
        .filter_map(|t| get(*t).map(|l| (*t, vec![l.p50_us, l.p90_us, l.p99_us])))
        .collect()
}

fn pct_groups() -> Vec<String> {
    vec!["p50".into(), "p90".into(), "p99".into()]
}

/// Write every chart of `r` into `out`.
pub fn render(r: &Results, out: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    let stamp = format!(" ({})", r.meta.date);

    // REST latency: two panels.
    let p = out.join("rest-latency.svg");
    {
        let root = SVGBackend::new(&p, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (a, b) = root.split_horizontally(W / 2);
        grouped_bars(
            &a,
            &format!("REST GET conversation, 1 connection{stamp}"),
            "latency (µs)",
            &pct_groups(),
            &percentile_series(|t| r.rest.sequential.get(t).map(|s| s.latency.clone())),
            0,
        )?;
        let conns = r.rest.loaded.direct.as_ref().or(r.rest.loaded.nestor.as_ref()).map(|l| l.connections).unwrap_or(0);
        grouped_bars(
            &b,
            &format!("REST GET conversation, {conns} connections"),
            "latency (µs)",
            &pct_groups(),
            &percentile_series(|t| r.rest.loaded.get(t).map(|s| s.latency.clone())),
            0,
        )?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    written.push(p);

    // REST throughput and CPU per request.
    let p = out.join("rest-throughput.svg");
    {
        let root = SVGBackend::new(&p, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (a, b) = root.split_horizontally(W / 2);
        let conns = r.rest.loaded.direct.as_ref().or(r.rest.loaded.nestor.as_ref()).map(|l| l.connections).unwrap_or(0);
        let rps: Vec<(Target, Vec<f64>)> =
            Target::ALL.iter().filter_map(|t| r.rest.loaded.get(*t).map(|l| (*t, vec![l.rps_median]))).collect();
        grouped_bars(&a, &format!("REST throughput, {conns} connections{stamp}"), "requests/s", &["req/s".into()], &rps, 0)?;
        let cpu: Vec<(Target, Vec<f64>)> = [Target::Nestor, Target::Nginx]
            .iter()
            .filter_map(|t| r.rest.loaded.get(*t).and_then(|l| l.proxy_cpu_us_per_req_median).map(|c| (*t, vec![c])))
            .collect();
        grouped_bars(&b, "proxy CPU time per request", "CPU µs / request", &["CPU µs/req".into()], &cpu, 1)?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    written.push(p);

    // WebSocket per-frame latency.
    let p = out.join("ws-latency.svg");
    {
        let root = SVGBackend::new(&p, (W / 2 + 80, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        grouped_bars(
            &root,
            &format!("WebSocket frame latency, 1 pair, 1 in flight{stamp}"),
            "downstream → client (µs)",
            &pct_groups(),
            &percentile_series(|t| r.ws.latency.get(t).map(|s| s.latency.clone())),
            0,
        )?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    written.push(p);

    // WebSocket throughput.
    let p = out.join("ws-throughput.svg");
    {
        let root = SVGBackend::new(&p, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (a, b) = root.split_horizontally(W / 2);
        let one: Vec<(Target, Vec<f64>)> = Target::ALL.iter().filter_map(|t| r.ws.single.get(*t).map(|s| (*t, vec![s.fps_median]))).collect();
        grouped_bars(&a, &format!("WebSocket frames/s, 1 pair{stamp}"), "frames/s", &["1 pair".into()], &one, 0)?;
        let pairs = r.ws.many.direct.as_ref().or(r.ws.many.nestor.as_ref()).map(|s| s.pairs).unwrap_or(0);
        let many: Vec<(Target, Vec<f64>)> = Target::ALL.iter().filter_map(|t| r.ws.many.get(*t).map(|s| (*t, vec![s.fps_median]))).collect();
        grouped_bars(&b, &format!("WebSocket frames/s, {pairs} pairs (aggregate)"), "frames/s", &[format!("{pairs} pairs")], &many, 0)?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    written.push(p);
    Ok(written)
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_every_chart_as_svg() {
        let r = crate::report::tests::sample();
        let dir = std::env::temp_dir().join(format!("nestor-bench-plot-{}", std::process::id()));
        let files = super::render(&r, &dir).unwrap();
        assert_eq!(files.len(), 4);
        for f in files {
            let s = std::fs::read_to_string(&f).unwrap();
            assert!(s.starts_with("<svg"), "{}", f.display());
            if f.to_string_lossy().contains("rest-") {
                assert!(s.contains("nestor") && s.contains("nginx"), "{}", f.display());
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
