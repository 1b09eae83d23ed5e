//! SVG charts of the `catalog` and `create` results (same style as `plot.rs`: plotters' SVG
//! backend, text left to the viewer's fonts).
//!
//! * `catalog.svg` — search / count / one page of 100: p50 and p99, direct vs nestor;
//! * `create.svg` — create -> first event, median and max per target;
//! * `dockermode.svg` — nestor vs the agent-server's docker mode: a forwarded request's and an
//!   event's latency (p50) and the front's memory, per target.
//!
//! Written by `nestor-bench catalog|create --plots DIR`; re-rendered from a results file with
//! `nestor-bench catalog --plot-from docs/bench/catalog-<date>.json --plots docs/bench` (and
//! the same for `create` and `dockermode`).

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::catalog::CatalogResults;
use crate::create::CreateResults;
use crate::dockermode::DockerModeResults;

const W: u32 = 960;
const H: u32 = 420;
const GREY: RGBColor = RGBColor(120, 120, 120);
const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn e(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Bars grouped by `groups`, one bar per series in each group; values printed on the bars.
fn bars(area: &Area<'_>, title: &str, y_desc: &str, groups: &[String], series: &[(&str, RGBColor, Vec<f64>)]) -> anyhow::Result<()> {
    let n = groups.len().max(1);
    let max = series.iter().flat_map(|(_, _, v)| v.iter().copied()).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    let top = if max > 0.0 { max * 1.18 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 17))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)
        .map_err(e)?;
    chart.configure_mesh().disable_x_mesh().x_labels(0).y_desc(y_desc).y_label_formatter(&|y| format!("{y:.0}")).label_style(("sans-serif", 13)).draw().map_err(e)?;
    let bw = 0.8 / series.len().max(1) as f64;
    for (si, (name, c, vals)) in series.iter().enumerate() {
        let c = *c;
        let rects: Vec<(f64, f64, f64)> = vals
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(gi, v)| {
                let x0 = gi as f64 + 0.1 + si as f64 * bw;
                (x0, x0 + bw * 0.92, *v)
            })
            .collect();
        chart
            .draw_series(rects.iter().map(|(x0, x1, v)| Rectangle::new([(*x0, 0.0), (*x1, *v)], c.filled())))
            .map_err(e)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        chart
            .draw_series(rects.iter().map(|(x0, x1, v)| {
                Text::new(format!("{v:.0}"), ((x0 + x1) / 2.0, *v + top * 0.01), ("sans-serif", 11).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom)))
            }))
            .map_err(e)?;
    }
    chart
        .draw_series(groups.iter().enumerate().map(|(i, g)| {
            Text::new(g.clone(), (i as f64 + 0.5, -top * 0.02), ("sans-serif", 13).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top)))
        }))
        .map_err(e)?;
    chart.configure_series_labels().position(SeriesLabelPosition::UpperMiddle).background_style(WHITE.mix(0.85)).border_style(BLACK.mix(0.3)).label_font(("sans-serif", 13)).draw().map_err(e)?;
    Ok(())
}

pub fn catalog_svg(r: &CatalogResults, out: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    let p = out.join("catalog.svg");
    {
        let root = SVGBackend::new(&p, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let (a, b) = root.split_horizontally(W / 2);
        let groups: Vec<String> = vec!["search, first page".into(), "count".into(), "one page of 100".into()];
        let (d, n) = (&r.direct, &r.nestor);
        let p50 = [("direct (one server, all)", GREY, vec![d.first_page.p50_us, d.count.p50_us, d.walk_page.p50_us]), ("nestor (10 downstreams)", BLUE, vec![n.first_page.p50_us, n.count.p50_us, n.walk_page.p50_us])];
        let p99 = [("direct (one server, all)", GREY, vec![d.first_page.p99_us, d.count.p99_us, d.walk_page.p99_us]), ("nestor (10 downstreams)", BLUE, vec![n.first_page.p99_us, n.count.p99_us, n.walk_page.p99_us])];
        let convs = &r.settings["conversations"];
        bars(&a, &format!("{convs} conversations, p50 ({})", r.date), "latency (µs)", &groups, &p50)?;
        bars(&b, "p99", "latency (µs)", &groups, &p99)?;
        root.present().map_err(e)?;
    }
    Ok(p)
}

pub fn create_svg(r: &CreateResults, out: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    let p = out.join("create.svg");
    {
        let root = SVGBackend::new(&p, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let label = |n: &str| match n {
            "process" => "nestor process".to_owned(),
            "pool" => "nestor pool (warm)".to_owned(),
            "docker" => "nestor docker (cold)".to_owned(),
            "oh-docker" => "agent-server docker mode".to_owned(),
            o => o.to_owned(),
        };
        let groups: Vec<String> = r.targets.iter().map(|t| label(&t.name)).collect();
        let series = [
            ("median", BLUE, r.targets.iter().map(|t| t.first_event_median_ms).collect::<Vec<_>>()),
            ("max", ORANGE, r.targets.iter().map(|t| t.first_event_max_ms).collect::<Vec<_>>()),
        ];
        bars(&root, &format!("create -> first event, real agent-server ({}, {} rounds)", r.date, r.settings["rounds"]), "ms", &groups, &series)?;
        root.present().map_err(e)?;
    }
    Ok(p)
}

pub fn dockermode_svg(r: &DockerModeResults, out: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    let p = out.join("dockermode.svg");
    {
        let root = SVGBackend::new(&p, (W * 3 / 2, H)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let panels = root.split_evenly((1, 3));
        let groups: Vec<String> = r.targets.iter().map(|t| t.name.clone()).collect();
        let median = |v: Vec<f64>| crate::stats::median(&v);
        let rest = |pname: &str| -> Vec<f64> {
            r.targets
                .iter()
                .map(|t| t.rest_seq.iter().find(|(n, _)| n == pname).map(|(_, rs)| median(rs.iter().map(|r| r.latency.p50_us / 1000.0).collect())).unwrap_or(f64::NAN))
                .collect()
        };
        bars(&panels[0], &format!("GET …/agent_final_response, 1 conn ({})", r.date), "p50 (ms)", &groups, &[("p50", BLUE, rest("forwarded"))])?;
        let frame: Vec<f64> = r.targets.iter().map(|t| t.frame_latency.as_ref().map_or(f64::NAN, |l| l.p50_us / 1000.0)).collect();
        bars(&panels[1], "POST a message -> its frame", "p50 (ms)", &groups, &[("p50", BLUE, frame)])?;
        let rss: Vec<f64> = r.targets.iter().map(|t| t.front_rss_kib.map_or(f64::NAN, |k| k as f64 / 1024.0)).collect();
        bars(&panels[2], "front process RSS, one conversation", "MiB", &groups, &[("RSS", ORANGE, rss)])?;
        root.present().map_err(e)?;
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_both_charts_as_svg() {
        let dir = std::env::temp_dir().join(format!("nestor-bench-plot-suite-{}", std::process::id()));
        let mut c = crate::catalog::CatalogResults::default();
        c.nestor.first_page.p50_us = 2791.0;
        c.direct.first_page.p50_us = 266.0;
        let mut k = crate::create::CreateResults::default();
        k.targets.push(crate::create::TargetResult { name: "pool".into(), first_event_median_ms: 812.0, first_event_max_ms: 853.0, ..Default::default() });
        for f in [super::catalog_svg(&c, &dir).unwrap(), super::create_svg(&k, &dir).unwrap()] {
            let s = std::fs::read_to_string(&f).unwrap();
            assert!(s.starts_with("<svg"), "{}", f.display());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
