//! PNG figures drawn with plotters: line charts and heatmaps.

use std::path::Path;

use plotters::element::DashedPathElement;
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

/// One panel of [`line_charts`]; series at the same index share a colour across panels.
#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// `intervals[i][j]`: `(low, high)` of the confidence interval of series `i`'s point
    /// `j`, drawn as an error bar (missing: none).
    pub intervals: Vec<Vec<(f64, f64)>>,
    /// A labelled horizontal reference line (the full cache).
    pub reference: Option<(String, f64)>,
    pub y_range: Option<(f64, f64)>,
    /// Shift series sideways so that error bars at a shared x do not hide each other (off
    /// where x is itself a measurement, which a shift would misstate).
    pub nudge: bool,
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

/// Characters per legend line; longer labels wrap (at `;`, `,` or `(` where possible).
const LEGEND_CHARS: usize = 26;

/// `label` cut into lines of at most `width` characters, breaking after `;`, `,` or before
/// `(` where one is near, anywhere otherwise.
pub fn wrap_label(label: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut rest: Vec<char> = label.chars().collect();
    while rest.len() > width {
        let window = &rest[..width];
        let cut = window
            .iter()
            .rposition(|&c| c == ';' || c == ',' || c == ' ')
            .map(|i| i + 1)
            .or_else(|| window.iter().rposition(|&c| c == '(').filter(|&i| i > 0))
            .filter(|&i| i >= width / 3)
            .unwrap_or(width);
        lines.push(rest[..cut].iter().collect::<String>().trim_end().to_string());
        rest.drain(..cut);
    }
    if !rest.is_empty() || lines.is_empty() {
        lines.push(rest.into_iter().collect());
    }
    lines
}

/// One line chart (see [`line_charts`]).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> Result<()> {
    let chart = LineChart {
        title: title.to_string(),
        x_label: x_label.to_string(),
        y_label: y_label.to_string(),
        series: series.to_vec(),
        intervals: Vec::new(),
        reference: None,
        y_range,
        nudge: true,
    };
    line_charts(path, &[chart])
}

/// Line charts side by side with one legend on the right, which wraps long labels so none
/// is cut off. Each y range is fitted to the data, intervals and reference unless given.
pub fn line_charts(path: &Path, charts: &[LineChart]) -> Result<()> {
    const PANEL: (u32, u32) = (620, 520);
    const LEGEND_WIDTH: u32 = 250;
    let labels: Vec<Vec<String>> = charts
        .first()
        .map(|c| c.series.iter().map(|s| wrap_label(&s.label, LEGEND_CHARS)).collect())
        .unwrap_or_default();
    let legend_height: u32 = labels.iter().map(|l| 18 * l.len() as u32 + 10).sum::<u32>() + 80;
    let width = PANEL.0 * charts.len().max(1) as u32 + LEGEND_WIDTH;
    let height = PANEL.1.max(legend_height);
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (plots, legend) = root.split_horizontally(width - LEGEND_WIDTH);
    let panels = plots.split_evenly((1, charts.len().max(1)));
    for (chart, area) in charts.iter().zip(&panels) {
        draw_line_chart(area, chart)?;
    }
    let mut y = 40;
    for (i, lines) in labels.iter().enumerate() {
        let style = ShapeStyle::from(&palette(i)).stroke_width(3);
        let swatch = vec![(8, y + 8), (36, y + 8)];
        if charts[0].series[i].dashed {
            legend.draw(&DashedPathElement::new(swatch, 6, 4, style)).map_err(plot_err)?;
        } else {
            legend.draw(&PathElement::new(swatch, style)).map_err(plot_err)?;
        }
        for (k, line) in lines.iter().enumerate() {
            legend
                .draw(&Text::new(line.clone(), (44, y + 18 * k as i32), ("sans-serif", 15)))
                .map_err(plot_err)?;
        }
        y += 18 * lines.len() as i32 + 10;
    }
    if charts.iter().any(|c| c.reference.is_some()) {
        let style = ShapeStyle::from(&BLACK).stroke_width(2);
        legend
            .draw(&DashedPathElement::new(vec![(8, y + 8), (36, y + 8)], 6, 4, style))
            .map_err(plot_err)?;
        legend.draw(&Text::new("full cache", (44, y), ("sans-serif", 15))).map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

fn draw_line_chart(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    c: &LineChart,
) -> Result<()> {
    let xs = c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let (x0, x1) = if x0.is_finite() { (x0, x1) } else { (0.0, 1.0) };
    // Room either side of the outer budgets, so their error bars are not cut.
    let pad = ((x1 - x0) * 0.08).max(2.0);
    let (x0, x1) = (x0 - pad, x1 + pad);
    // Enough decimals that ticks on a narrow axis (one budget) do not repeat.
    let decimals = if x1 - x0 < 10.0 { 1 } else { 0 };
    let (y0, y1) = c.y_range.unwrap_or_else(|| {
        let ys = c
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .chain(c.intervals.iter().flatten().flat_map(|i| [i.0, i.1]))
            .chain(c.reference.iter().map(|r| r.1))
            .filter(|y| y.is_finite());
        let (a, b) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(y), b.max(y)));
        if !a.is_finite() {
            return (0.0, 1.0);
        }
        let pad = ((b - a) * 0.08).max(1e-3);
        (a - pad, b + pad)
    });
    let mut chart = ChartBuilder::on(area)
        .caption(&c.title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .x_label_formatter(&|x| format!("{x:.decimals$}"))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(plot_err)?;
    if let Some((label, y)) = &c.reference {
        let style = ShapeStyle::from(&BLACK).stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new([(x0, *y), (x1, *y)], 8, 5, style))
            .map_err(plot_err)?;
        let anchor =
            ("sans-serif", 14).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Bottom));
        chart
            .draw_series(std::iter::once(Text::new(label.clone(), (x0 + pad * 0.2, *y), anchor)))
            .map_err(plot_err)?;
    }
    let n = c.series.len().max(1) as f64;
    for (i, s) in c.series.iter().enumerate() {
        let color = palette(i);
        let style = ShapeStyle::from(&color).stroke_width(2);
        // Series are nudged apart sideways so their error bars do not hide each other.
        let dx = if c.nudge { (i as f64 - (n - 1.0) / 2.0) * pad * 0.12 } else { 0.0 };
        let points: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (x + dx, y)).collect();
        if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(points.iter().copied(), 8, 5, style))
                .map_err(plot_err)?;
        } else {
            chart.draw_series(LineSeries::new(points.iter().copied(), style)).map_err(plot_err)?;
        }
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(plot_err)?;
        let intervals = c.intervals.get(i).map_or(&[][..], Vec::as_slice);
        for (&(x, _), &(lo, hi)) in points.iter().zip(intervals) {
            if lo.is_finite() && hi.is_finite() {
                let cap = pad * 0.05;
                for line in [
                    vec![(x, lo), (x, hi)],
                    vec![(x - cap, lo), (x + cap, lo)],
                    vec![(x - cap, hi), (x + cap, hi)],
                ] {
                    chart
                        .draw_series(std::iter::once(PathElement::new(line, style)))
                        .map_err(plot_err)?;
                }
            }
        }
    }
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
    const SCALE_WIDTH: u32 = 90;
    let width = panel_size.0 * panels.len().max(1) as u32 + SCALE_WIDTH;
    let root = BitMapBackend::new(path, (width, panel_size.1)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (maps, scale) = root.split_horizontally(width - SCALE_WIDTH);
    colour_scale(&scale, range)?;
    let areas = maps.split_evenly((1, panels.len().max(1)));
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

/// The colour scale of [`heatmap`]: a vertical gradient over `range` with five labels.
fn colour_scale(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    range: (f64, f64),
) -> Result<()> {
    let (_, h) = area.dim_in_pixel();
    let (top, bottom) = (50i32, h as i32 - 60);
    let span = (bottom - top).max(1);
    for y in top..bottom {
        let t = (bottom - y) as f64 / span as f64;
        let rect = Rectangle::new([(10, y), (30, y + 1)], ViridisRGB::get_color(t).filled());
        area.draw(&rect).map_err(plot_err)?;
    }
    area.draw(&Rectangle::new([(10, top), (30, bottom)], BLACK)).map_err(plot_err)?;
    for k in 0..=4 {
        let t = k as f64 / 4.0;
        let y = bottom - (t * span as f64).round() as i32;
        let value = range.0 + t * (range.1 - range.0);
        let style =
            ("sans-serif", 13).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
        area.draw(&PathElement::new(vec![(30, y), (35, y)], BLACK)).map_err(plot_err)?;
        area.draw(&Text::new(format!("{value:.2}"), (38, y), style)).map_err(plot_err)?;
    }
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
