//! The plots of docs/benchmarks.md, as SVG (plotters' SVG backend: no system fonts needed).

use std::path::Path;

use plotters::prelude::*;

use crate::runner::Peer;
use crate::stats;
use crate::summary::{BootCell, Summary, WORKLOADS};

/// One line per peer of the median of `field` at each vCPU count of the boot runs, divided by
/// `scale` (ns -> µs, KiB -> MiB).
fn per_vcpu_series(
    summary: &Summary<'_>,
    peers: &[Peer],
    field: fn(&BootCell) -> &Vec<f64>,
    scale: f64,
) -> Vec<(Peer, Vec<(f64, f64)>)> {
    peers
        .iter()
        .map(|p| {
            let points = summary
                .boot
                .iter()
                .filter_map(|(n, cells)| {
                    Some((f64::from(*n), stats::median(field(cells.get(p)?))? / scale))
                })
                .collect();
            (*p, points)
        })
        .collect()
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Writes every plot into `dir`; returns the file names.
pub fn write_all(dir: &Path, summary: &Summary<'_>) -> std::io::Result<Vec<String>> {
    let mut files = Vec::new();
    for (name, what) in WORKLOADS {
        let Some(cells) = summary.cells.get(name) else {
            continue;
        };
        let series: Vec<(Peer, Vec<f64>)> = cells
            .iter()
            .filter(|(_, c)| !c.pooled.is_empty())
            .map(|(p, c)| (*p, c.pooled.clone()))
            .collect();
        if series.is_empty() {
            continue;
        }
        let file = format!("latency_{name}.svg");
        latency_cdf(&dir.join(&file), &format!("{name}: {what}"), &series).map_err(io_err)?;
        files.push(file);
    }
    let peers = &summary.suite.peers;
    let boot = per_vcpu_series(summary, peers, |c| &c.boot_ns, 1000.0);
    let rss = per_vcpu_series(summary, peers, |c| &c.rss_kib, 1024.0);
    // A `--boot-only` run's plots have names of their own: they sit beside a full run's.
    let (boot_file, rss_file) = if summary.suite.plan.boot_only {
        ("bringup_vs_vcpus.svg", "bringup_rss_vs_vcpus.svg")
    } else {
        ("boot_vs_vcpus.svg", "rss_vs_vcpus.svg")
    };
    for (file, title, y, data) in [
        (
            boot_file,
            "AP bring-up: first INIT to all APs online",
            "µs",
            &boot,
        ),
        (
            rss_file,
            "Peak resident memory of the VMM process",
            "MiB",
            &rss,
        ),
    ] {
        if data.iter().any(|(_, pts)| !pts.is_empty()) {
            against_vcpus(&dir.join(file), title, y, data).map_err(io_err)?;
            files.push(file.to_string());
        }
    }
    Ok(files)
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// Cumulative distribution of each peer's samples, log-scaled µs on x.
fn latency_cdf(path: &Path, title: &str, series: &[(Peer, Vec<f64>)]) -> PlotResult {
    let all: Vec<f64> = series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|ns| ns / 1000.0))
        .collect();
    let lo = stats::quantile(&all, 0.0).unwrap_or(0.1).max(0.01);
    let hi = stats::quantile(&all, 1.0).unwrap_or(1.0).max(lo * 2.0);
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("latency (µs, log scale)")
        .y_desc("fraction of samples ≤ x")
        .draw()?;
    for (i, (peer, samples)) in series.iter().enumerate() {
        let mut us: Vec<f64> = samples.iter().map(|ns| (ns / 1000.0).max(lo)).collect();
        us.sort_by(f64::total_cmp);
        let n = us.len() as f64;
        let points: Vec<(f64, f64)> = us
            .iter()
            .enumerate()
            .map(|(k, x)| (*x, (k + 1) as f64 / n))
            .collect();
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(peer.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// One line per peer of a figure against the vCPU count, both axes log-scaled (the counts run
/// from 1 to 1024, the times over four decades). Points without a positive value (no AP to
/// start on 1 vCPU) are left out.
fn against_vcpus(
    path: &Path,
    title: &str,
    y_desc: &str,
    data: &[(Peer, Vec<(f64, f64)>)],
) -> PlotResult {
    let data: Vec<(Peer, Vec<(f64, f64)>)> = data
        .iter()
        .map(|(p, pts)| {
            let pts = pts.iter().copied().filter(|q| q.0 >= 1.0 && q.1 > 0.0);
            (*p, pts.collect())
        })
        .collect();
    let all = || data.iter().flat_map(|(_, p)| p.iter());
    let xmin = all().map(|q| q.0).fold(f64::INFINITY, f64::min).min(1.0);
    let xmax = all().map(|q| q.0).fold(2.0, f64::max);
    let ymin = all().map(|q| q.1).fold(f64::INFINITY, f64::min);
    let ymax = all().map(|q| q.1).fold(1e-9, f64::max);
    let ymin = if ymin.is_finite() { ymin } else { ymax / 10.0 };
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (xmin * 0.8..xmax * 1.25).log_scale(),
            (ymin * 0.7..ymax * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("vCPUs (log scale)")
        .y_desc(format!("{y_desc} (log scale)"))
        .draw()?;
    for (i, (peer, points)) in data.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(peer.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
