//! PNG figures drawn with plotters: line charts and heatmaps.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{EvalError, Result};

/// One line of a line chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    /// `(x, y)` points in drawing order.
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

/// Distinct colours, cycled.
pub fn palette(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    COLORS[i % COLORS.len()]
}

fn plot_err(e: impl std::fmt::Display) -> EvalError {
    EvalError::Plot(e.to_string())
}

/// A line chart with its legend in a strip on the right; the y range is fitted to the
/// data unless given.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> Result<()> {
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (plot_area, legend_area) = root.split_horizontally(780);
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let (y0, y1) = y_range.unwrap_or_else(|| {
        let (a, b) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(y), b.max(y)));
        let pad = ((b - a) * 0.08).max(1e-3);
        (a - pad, b + pad)
    });
    let (x0, x1) = if x0 < x1 { (x0, x1) } else { (x0 - 0.5, x0 + 0.5) };
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(plot_err)?;
    for (i, s) in series.iter().enumerate() {
        let color = palette(i);
        let style = ShapeStyle::from(&color).stroke_width(2);
        if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(s.points.iter().copied(), 8, 5, style))
                .map_err(plot_err)?;
        } else {
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), style))
                .map_err(plot_err)?;
        }
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(plot_err)?;
        let y = 60 + 26 * i as i32;
        legend_area.draw(&PathElement::new(vec![(10, y), (40, y)], style)).map_err(plot_err)?;
        legend_area
            .draw(&Text::new(s.label.clone(), (48, y - 8), ("sans-serif", 15)))
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// A heatmap of `values[row][col]` coloured on `range`, with optional cell annotations.
#[allow(clippy::too_many_arguments)]
pub fn heatmap(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    x_ticks: &[String],
    y_ticks: &[String],
    values: &[Vec<f64>],
    range: (f64, f64),
    annotate: bool,
) -> Result<()> {
    let (rows, cols) = (values.len(), values.first().map_or(0, Vec::len));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(cells(cols).into_segmented(), cells(rows).into_segmented())
        .map_err(plot_err)?;
    // Labels sit at the centre of each cell.
    let tick = |ticks: &[String], v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => ticks.get(*i).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_labels(cols.min(16))
        .y_labels(rows.min(16))
        .x_label_formatter(&|v| tick(x_ticks, v))
        .y_label_formatter(&|v| tick(y_ticks, v))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    let span = (range.1 - range.0).max(1e-12);
    chart
        .draw_series(values.iter().enumerate().flat_map(|(r, row)| {
            row.iter().enumerate().map(move |(c, v)| {
                // Missing cells (NaN) are grey.
                let color = if v.is_nan() {
                    RGBColor(220, 220, 220)
                } else {
                    ViridisRGB::get_color(((v - range.0) / span).clamp(0.0, 1.0))
                };
                Rectangle::new(
                    [
                        (SegmentValue::Exact(c), SegmentValue::Exact(r)),
                        (SegmentValue::Exact(c + 1), SegmentValue::Exact(r + 1)),
                    ],
                    color.filled(),
                )
            })
        }))
        .map_err(plot_err)?;
    if annotate {
        chart
            .draw_series(values.iter().enumerate().flat_map(|(r, row)| {
                row.iter().enumerate().map(move |(c, v)| {
                    let color =
                        if v.is_nan() || (v - range.0) / span > 0.6 { BLACK } else { WHITE };
                    let text = if v.is_nan() { "–".to_string() } else { format!("{v:.2}") };
                    let style = ("sans-serif", 15)
                        .into_font()
                        .color(&color)
                        .pos(Pos::new(HPos::Center, VPos::Center));
                    Text::new(text, (SegmentValue::CenterOf(c), SegmentValue::CenterOf(r)), style)
                })
            }))
            .map_err(plot_err)?;
    }
    Ok(())
}

/// The range whose segments are `n` cells: a segmented `0..m` has m + 1 segments. An empty
/// range cannot be drawn, so a single cell gets one empty neighbour.
fn cells(n: usize) -> std::ops::Range<usize> {
    0..n.saturating_sub(1).max(1)
}

/// Several heatmaps side by side in one PNG.
pub fn heatmap_grid(
    path: &Path,
    panels: &[HeatmapPanel],
    panel_size: (u32, u32),
    range: (f64, f64),
    annotate: bool,
) -> Result<()> {
    let width = panel_size.0 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (width, panel_size.1)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (panel, area) in panels.iter().zip(&areas) {
        heatmap(
            area,
            &panel.title,
            &panel.x_label,
            &panel.y_label,
            &panel.x_ticks,
            &panel.y_ticks,
            &panel.values,
            range,
            annotate,
        )?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// One panel of [`heatmap_grid`].
#[derive(Debug, Clone)]
pub struct HeatmapPanel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_ticks: Vec<String>,
    pub y_ticks: Vec<String>,
    /// `[row][col]`
    pub values: Vec<Vec<f64>>,
}
