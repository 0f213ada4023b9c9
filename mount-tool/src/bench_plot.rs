//! `exofs bench chain --plot FILE`: lookups/s of each path as a bar, beside the best rate
//! the device allows for that path's misses (out of core), as an SVG chart (plotters).

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// One path's bar: its name, its lookups/s, and its limit if known.
pub(crate) struct Bar {
    pub(crate) path: String,
    pub(crate) rate: f64,
    pub(crate) limit: Option<f64>,
}

/// Writes the chart of `bars` to `file` (SVG), titled `title`.
pub(crate) fn plot(file: &Path, title: &str, bars: &[Bar]) -> Result<(), String> {
    let error = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", file.display());
    let top = bars
        .iter()
        .map(|bar| bar.rate.max(bar.limit.unwrap_or(0.0)))
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(file, (160 + 90 * bars.len() as u32, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| error(&e))?;
    let count = bars.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(130)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..count - 0.5, 0.0..top)
        .map_err(|e| error(&e))?;
    let name = |x: &f64| {
        let index = x.round();
        if (x - index).abs() > 1e-6 || index < 0.0 {
            return String::new();
        }
        bars.get(index as usize)
            .map_or(String::new(), |bar| bar.path.clone())
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() * 2 + 1)
        .x_label_formatter(&name)
        .x_label_style(
            TextStyle::from(
                ("sans-serif", 13)
                    .into_font()
                    .transform(FontTransform::Rotate90),
            )
            .pos(Pos::new(HPos::Left, VPos::Center)),
        )
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc("lookups/s")
        .draw()
        .map_err(|e| error(&e))?;
    let measured = RGBColor(31, 119, 180);
    let limit = RGBColor(200, 200, 200);
    chart
        .draw_series(bars.iter().enumerate().map(|(i, bar)| {
            let x = i as f64;
            Rectangle::new([(x - 0.38, 0.0), (x, bar.rate)], measured.filled())
        }))
        .map_err(|e| error(&e))?
        .label("measured")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], measured.filled()));
    chart
        .draw_series(bars.iter().enumerate().filter_map(|(i, bar)| {
            let x = i as f64;
            bar.limit
                .map(|l| Rectangle::new([(x, 0.0), (x + 0.38, l)], limit.filled()))
        }))
        .map_err(|e| error(&e))?
        .label("device limit for its misses (QD1 or QD32)")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], limit.filled()));
    chart
        .draw_series(bars.iter().enumerate().map(|(i, bar)| {
            Text::new(
                format!("{:.0}", bar.rate),
                (i as f64 - 0.38, bar.rate + top * 0.01),
                ("sans-serif", 11),
            )
        }))
        .map_err(|e| error(&e))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()
        .map_err(|e| error(&e))?;
    root.present().map_err(|e| error(&e))?;
    Ok(())
}
