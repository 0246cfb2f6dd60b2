//! The results as one SVG: a panel per group of figures, bars at the median with whiskers
//! from min to max over the rounds; the scaling figures as lines.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::{
    figures::{Contender, scale_shapes},
    report::Report,
};

fn color(id: &str) -> RGBColor {
    match id {
        "direct" => RGBColor(70, 110, 170),
        "direct-1" => RGBColor(150, 170, 200),
        "nginx" => RGBColor(235, 140, 40),
        "haproxy" => RGBColor(200, 60, 60),
        _ => RGBColor(40, 160, 90), // kha, kha-<policy>
    }
}

/// (figure id, short label) per panel.
struct Panel {
    title: &'static str,
    figures: Vec<(&'static str, &'static str)>,
}

fn panels() -> Vec<Panel> {
    vec![
        Panel {
            title: "Latency p50, µs (lower is better)",
            figures: vec![
                ("connect_p50", "connect()"),
                ("first_byte_p50", "connect + 1st byte"),
                ("keepalive_p50", "kept-alive request"),
            ],
        },
        Panel {
            title: "Latency p99, µs (lower is better)",
            figures: vec![
                ("connect_p99", "connect()"),
                ("first_byte_p99", "connect + 1st byte"),
                ("keepalive_p99", "kept-alive request"),
            ],
        },
        Panel {
            title: "HTTPS req/s, new connection each, full handshake (higher is better)",
            figures: vec![("https_full_c1", "c=1"), ("https_full_c16", "c=16"), ("https_full_c128", "c=128")],
        },
        Panel {
            title: "HTTPS req/s, new connection each, resumption on (higher is better)",
            figures: vec![
                ("https_resume_c1", "c=1"),
                ("https_resume_c16", "c=16"),
                ("https_resume_c128", "c=128"),
            ],
        },
        Panel {
            title: "TLS resumption hit rate, % (masters do not share tickets)",
            figures: vec![("resume_hit_c1", "c=1"), ("resume_hit_c16", "c=16"), ("resume_hit_c128", "c=128")],
        },
        Panel {
            title: "Bulk throughput, one TLS connection, MiB/s (higher is better)",
            figures: vec![("bulk", "bulk")],
        },
        Panel {
            title: "Load balancer CPU during bulk, ms per GiB (lower is better)",
            figures: vec![("bulk_lb_cpu", "per GiB")],
        },
        Panel {
            title: "Load balancer CPU per new HTTPS connection, µs (lower is better)",
            figures: vec![("conn_lb_cpu", "per connection")],
        },
        Panel {
            title: "Load balancer memory, MiB (lower is better)",
            figures: vec![("rss_idle", "idle"), ("rss_load", "under load")],
        },
        Panel {
            title: "kha: kernel time per program run, ns (bpf_stats)",
            figures: vec![
                ("kha_prog_ns", "frontend, sequential"),
                ("kha_prog_ns_miss", "other address"),
                ("kha_prog_ns_load", "frontend, HTTPS c=128"),
            ],
        },
    ]
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

pub fn draw(path: &Path, report: &Report) -> Result<()> {
    let root = SVGBackend::new(path, (1600, 3000)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (head, body) = root.split_vertically(70);
    head.draw(&Text::new(
        format!(
            "kha vs userspace proxies: {} run, {} rounds, median with min–max",
            report.profile, report.rounds
        ),
        (20, 12),
        ("sans-serif", 24).into_font(),
    ))
    .map_err(err)?;
    head.draw(&Text::new(report.machine.one_line(), (20, 44), ("sans-serif", 14).into_font()))
        .map_err(err)?;
    let areas = body.split_evenly((6, 2));
    for (area, panel) in areas.iter().zip(panels()) {
        bars(area, report, &panel)?;
    }
    lines(&areas[10], report, "connect", "Scaling: connect() p50, µs, by frontends × backends")?;
    lines(
        &areas[11],
        report,
        "first_byte",
        "Scaling: connect + first byte p50, µs, by frontends × backends",
    )?;
    root.present().map_err(err)?;
    Ok(())
}

fn bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    report: &Report,
    panel: &Panel,
) -> Result<()> {
    let contenders: Vec<&Contender> = report
        .contenders
        .iter()
        .filter(|c| {
            panel
                .figures
                .iter()
                .any(|(f, _)| report.figure(f).is_some_and(|r| r.figure.contenders.contains(&c.id)))
        })
        .collect();
    let n = panel.figures.len();
    let ymax = panel
        .figures
        .iter()
        .filter_map(|(f, _)| report.figure(f))
        .flat_map(|r| r.results.values().flatten().map(|s| s.max))
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax)
        .map_err(err)?;
    let labels: Vec<&str> = panel.figures.iter().map(|(_, l)| *l).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(RGBColor(238, 238, 238))
        .x_labels(n.max(2))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).map_or(String::new(), |s| s.to_string())
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| super::report::num(*y))
        .draw()
        .map_err(err)?;
    let width = 0.8 / contenders.len().max(1) as f64;
    for (ci, c) in contenders.iter().enumerate() {
        let col = color(&c.id);
        let mut rects = Vec::new();
        let mut whiskers = Vec::new();
        for (fi, (f, _)) in panel.figures.iter().enumerate() {
            let Some(s) = report.figure(f).and_then(|r| r.results.get(&c.id).cloned().flatten()) else {
                continue;
            };
            let x0 = fi as f64 - 0.4 + ci as f64 * width;
            let xm = x0 + width / 2.0;
            rects.push(Rectangle::new(
                [(x0 + width * 0.05, 0.0), (x0 + width * 0.95, s.median)],
                col.filled(),
            ));
            whiskers.push(PathElement::new(vec![(xm, s.min), (xm, s.max)], BLACK.stroke_width(1)));
            whiskers.push(PathElement::new(
                vec![(xm - width * 0.2, s.max), (xm + width * 0.2, s.max)],
                BLACK.stroke_width(1),
            ));
            whiskers.push(PathElement::new(
                vec![(xm - width * 0.2, s.min), (xm + width * 0.2, s.min)],
                BLACK.stroke_width(1),
            ));
        }
        chart
            .draw_series(rects)
            .map_err(err)?
            .label(c.label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], col.filled()));
        chart.draw_series(whiskers).map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    Ok(())
}

fn lines<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    report: &Report,
    metric: &str,
    title: &str,
) -> Result<()> {
    let shapes = scale_shapes();
    let ids: Vec<String> = shapes.iter().map(|s| format!("scale_{}_{metric}", s.id)).collect();
    let labels: Vec<String> = shapes.iter().map(|s| format!("{}×{}", s.frontends, s.backends)).collect();
    let ymax = ids
        .iter()
        .filter_map(|f| report.figure(f))
        .flat_map(|r| r.results.values().flatten().map(|s| s.max))
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 1.15;
    let n = shapes.len();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.3f64..(n as f64 - 0.7), 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(RGBColor(238, 238, 238))
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| super::report::num(*y))
        .draw()
        .map_err(err)?;
    for c in &report.scale_contenders {
        let col = color(&c.id);
        let points: Vec<(f64, f64, f64, f64)> = ids
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                let s = report.figure(f)?.results.get(&c.id).cloned().flatten()?;
                Some((i as f64, s.median, s.min, s.max))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.1)), col.stroke_width(2)))
            .map_err(err)?
            .label(c.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], col.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new((p.0, p.1), 3, col.filled()))).map_err(err)?;
        chart
            .draw_series(
                points.iter().map(|p| PathElement::new(vec![(p.0, p.2), (p.0, p.3)], col.stroke_width(1))),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    Ok(())
}
