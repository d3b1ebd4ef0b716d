//! The comparison chart: CPU per forwarded packet and p99 added latency against channel count,
//! one line per target, as SVG (plotters; no font files needed). Both y axes are logarithmic.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::results::{Point, Results};

/// Draws `results` to `path`.
///
/// # Errors
/// The file cannot be written.
pub(crate) fn draw(results: &Results, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1100, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(550);
    let mut targets: Vec<&str> = results
        .points
        .iter()
        .filter(|p| p.measured())
        .map(|p| p.target.as_str())
        .collect();
    targets.dedup();
    targets.sort_unstable();
    targets.dedup();
    let max_n = results.points.iter().map(|p| p.channels).max().unwrap_or(1);
    let colours = [&BLUE, &RED, &GREEN, &MAGENTA, &BLACK];
    for (area, title, value) in [
        (
            &left,
            "CPU per forwarded packet (ns, log)",
            (|p: &Point| Some(p.cpu_ns_per_packet)) as fn(&Point) -> Option<f64>,
        ),
        (
            &right,
            "p99 latency added (µs, log; below the axis shown on it)",
            |p: &Point| p.added_p99_us.map(|v| v.max(0.0)),
        ),
    ] {
        let top = results
            .points
            .iter()
            .filter(|p| p.measured())
            .filter_map(value)
            .fold(1.0_f64, f64::max)
            * 1.5;
        // A log axis: the points span two to four decades (latency at 2,000 channels).
        let smallest = results
            .points
            .iter()
            .filter(|p| p.measured())
            .filter_map(value)
            .filter(|v| *v >= 1.0)
            .fold(f64::MAX, f64::min);
        let bottom = if smallest == f64::MAX {
            1.0
        } else {
            10f64.powf(smallest.log10().floor())
        };
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0u32..max_n + max_n / 10, (bottom..top).log_scale())
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("channels")
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, t) in targets.iter().enumerate() {
            let colour = colours[i % colours.len()];
            let mut pts: Vec<(u32, f64)> = results
                .points
                .iter()
                .filter(|p| p.target == *t && p.measured())
                .filter_map(|p| value(p).map(|v| (p.channels, v.max(bottom))))
                .collect();
            pts.sort_by_key(|p| p.0);
            chart
                .draw_series(LineSeries::new(pts.clone(), colour))
                .map_err(|e| anyhow!("{e}"))?
                .label(*t)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
            chart
                .draw_series(
                    pts.iter()
                        .map(|&(x, y)| Circle::new((x, y), 3, colour.filled())),
                )
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .position(if title.starts_with("CPU") {
                SeriesLabelPosition::UpperRight
            } else {
                SeriesLabelPosition::UpperLeft
            })
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
