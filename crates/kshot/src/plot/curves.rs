//! The learning-curves figure of a run's `metrics.csv`: training loss, training accuracy,
//! validation accuracy with its 95% CI, and the learning rate when it changes.

use std::path::Path;

use anyhow::{bail, Context};
use plotters::coord::ranged1d::Ranged;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::{canvas, register_font, write_png, FAMILY};

/// Learning curves of a run's metrics.csv as a PNG of `width`×`height` pixels.
pub fn learning_curves(
    metrics_csv: &Path,
    out_png: &Path,
    width: u32,
    height: u32,
) -> anyhow::Result<()> {
    if width < MIN_SIZE.0 || height < MIN_SIZE.1 {
        bail!(
            "cannot draw {} at {width}×{height}: learning curves need at least {}×{} pixels",
            out_png.display(),
            MIN_SIZE.0,
            MIN_SIZE.1
        );
    }
    let text = std::fs::read_to_string(metrics_csv)
        .with_context(|| format!("cannot read {}", metrics_csv.display()))?;
    let table = Table::parse(&text)
        .with_context(|| format!("{} is not a kshot metrics file", metrics_csv.display()))?;
    if table.episodes.is_empty() {
        bail!(
            "{} has no training rows yet; plot again once training has logged a step",
            metrics_csv.display()
        );
    }
    let panels = panels(&table);
    if panels.is_empty() {
        bail!(
            "{} has no finite loss, accuracy or validation values to plot",
            metrics_csv.display()
        );
    }
    let run = metrics_csv
        .canonicalize()
        .ok()
        .and_then(|p| p.parent()?.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| metrics_csv.display().to_string());
    register_font()?;
    let mut rgb = canvas(width, height, out_png)?;
    draw(&mut rgb, (width, height), &format!("{run}: learning curves"), &panels)
        .with_context(|| format!("cannot draw {}", out_png.display()))?;
    write_png(out_png, width, height, rgb)
}

const MIN_SIZE: (u32, u32) = (320, 240);

/// The numeric columns of a metrics file, by header name; unparsable or non-finite cells are
/// `None`.
struct Table {
    episodes: Vec<f64>,
    columns: Vec<(String, Vec<Option<f64>>)>,
}

impl Table {
    fn parse(text: &str) -> anyhow::Result<Table> {
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or("").split(',').map(str::trim).collect();
        let episode = header
            .iter()
            .position(|h| *h == "episode")
            .context("its header has no `episode` column")?;
        let mut table = Table {
            episodes: Vec::new(),
            columns: header.iter().map(|h| (h.to_string(), Vec::new())).collect(),
        };
        for line in lines {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let Some(e) = fields.get(episode).and_then(|f| f.parse::<f64>().ok()) else {
                continue;
            };
            table.episodes.push(e);
            for (i, (_, values)) in table.columns.iter_mut().enumerate() {
                let value = fields.get(i).and_then(|f| f.parse::<f64>().ok());
                values.push(value.filter(|v| v.is_finite()));
            }
        }
        Ok(table)
    }

    /// (episode, value) of the rows where column `name` holds a finite number.
    fn series(&self, name: &str) -> Vec<(f64, f64)> {
        let Some((_, values)) = self.columns.iter().find(|(n, _)| n == name) else {
            return Vec::new();
        };
        self.episodes.iter().zip(values).filter_map(|(&e, v)| v.map(|v| (e, v))).collect()
    }
}

struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    style: ShapeStyle,
    markers: bool,
}

struct Panel {
    title: &'static str,
    y_desc: &'static str,
    series: Vec<Series>,
    /// (episode, low, high): a shaded band behind the series.
    band: Option<Vec<(f64, f64, f64)>>,
    log_y: bool,
    /// Clamp of the y axis (accuracies stay within 0..100%).
    y_bounds: (f64, f64),
    legend: SeriesLabelPosition,
}

const TRAIN: RGBColor = RGBColor(31, 119, 180);
const VAL: RGBColor = RGBColor(230, 120, 20);
const LR: RGBColor = RGBColor(44, 140, 44);

fn panels(t: &Table) -> Vec<Panel> {
    let percent = |p: Vec<(f64, f64)>| p.into_iter().map(|(x, y)| (x, 100.0 * y)).collect();
    let mut panels = Vec::new();
    let mut loss = raw_and_smoothed(t.series("loss"));
    let val_loss = t.series("val_loss");
    if !val_loss.is_empty() {
        loss.push(Series {
            label: "validation episodes".into(),
            points: val_loss,
            style: VAL.stroke_width(2),
            markers: true,
        });
    }
    if !loss.is_empty() {
        panels.push(Panel {
            title: "loss",
            y_desc: "loss",
            series: loss,
            band: None,
            log_y: false,
            y_bounds: (f64::NEG_INFINITY, f64::INFINITY),
            legend: SeriesLabelPosition::UpperRight,
        });
    }
    let accuracy = raw_and_smoothed(percent(t.series("accuracy")));
    if !accuracy.is_empty() {
        panels.push(Panel {
            title: "training accuracy",
            y_desc: "accuracy (%)",
            series: accuracy,
            band: None,
            log_y: false,
            y_bounds: (0.0, 100.0),
            legend: SeriesLabelPosition::LowerRight,
        });
    }
    let val: Vec<(f64, f64)> = percent(t.series("val_accuracy"));
    if !val.is_empty() {
        let ci: Vec<(f64, f64)> = percent(t.series("val_ci95"));
        let band = (ci.len() == val.len())
            .then(|| val.iter().zip(&ci).map(|(&(x, a), &(_, c))| (x, a - c, a + c)).collect());
        panels.push(Panel {
            title: "validation accuracy",
            y_desc: "accuracy (%)",
            series: vec![Series {
                label: "mean".into(),
                points: val,
                style: VAL.stroke_width(2),
                markers: true,
            }],
            band,
            log_y: false,
            y_bounds: (0.0, 100.0),
            legend: SeriesLabelPosition::LowerRight,
        });
    }
    let lr: Vec<(f64, f64)> = t.series("lr").into_iter().filter(|&(_, v)| v > 0.0).collect();
    let (lo, hi) = bounds(lr.iter().map(|p| p.1));
    if hi > lo * (1.0 + 1e-9) {
        panels.push(Panel {
            title: "learning rate",
            y_desc: "learning rate (log)",
            series: vec![Series {
                label: "lr".into(),
                points: lr,
                style: LR.stroke_width(2),
                markers: false,
            }],
            band: None,
            log_y: true,
            y_bounds: (0.0, f64::INFINITY),
            legend: SeriesLabelPosition::UpperRight,
        });
    }
    panels
}

/// Every step, faint, under its trailing moving average; empty when there are no points.
fn raw_and_smoothed(points: Vec<(f64, f64)>) -> Vec<Series> {
    if points.is_empty() {
        return Vec::new();
    }
    let window = (points.len() / 20).clamp(1, 500);
    let smoothed = moving_average(&points, window);
    vec![
        Series { label: "per step".into(), points, style: TRAIN.mix(0.25).into(), markers: false },
        Series {
            label: format!("mean of {window}"),
            points: smoothed,
            style: TRAIN.stroke_width(2),
            markers: false,
        },
    ]
}

/// The mean of each point's value and the `window - 1` before it.
fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    let mut out = Vec::with_capacity(points.len());
    for (i, &(x, y)) in points.iter().enumerate() {
        sum += y;
        if i >= window {
            sum -= points[i - window].1;
        }
        out.push((x, sum / (i + 1).min(window) as f64));
    }
    out
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// An axis range around `lo..hi`, padded by 5% (linear) or a factor (log), never empty.
fn padded((lo, hi): (f64, f64), log: bool, (min, max): (f64, f64)) -> std::ops::Range<f64> {
    if log {
        return lo / 1.25..hi * 1.25;
    }
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 0.5_f64.max(0.05 * hi.abs()) };
    let (lo, hi) = ((lo - pad).max(min), (hi + pad).min(max));
    if hi > lo {
        lo..hi
    } else {
        lo - 0.5..hi + 0.5
    }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw(rgb: &mut [u8], size: (u32, u32), title: &str, panels: &[Panel]) -> anyhow::Result<()> {
    let font = (f64::from(size.1.min(size.0)) / 50.0).clamp(10.0, 22.0);
    let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
    root.fill(&WHITE)?;
    let body = root.titled(title, (FAMILY, 1.4 * font))?;
    let cols = panels.len().min(2);
    let rows = panels.len().div_ceil(cols);
    for (area, panel) in body.split_evenly((rows, cols)).iter().zip(panels) {
        draw_panel(area, panel, font)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel(area: &Area, p: &Panel, font: f64) -> anyhow::Result<()> {
    let x = bounds(p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0)));
    let x = if x.1 > x.0 { x.0..x.1 } else { x.0 - 0.5..x.0 + 0.5 };
    let band = p.band.iter().flatten().flat_map(|b| [b.1, b.2]);
    let y = bounds(p.series.iter().flat_map(|s| s.points.iter().map(|q| q.1)).chain(band));
    let y = padded(y, p.log_y, p.y_bounds);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(p.title, (FAMILY, 1.1 * font))
        .margin((0.6 * font) as u32)
        .x_label_area_size((2.8 * font) as u32)
        .y_label_area_size((4.2 * font) as u32);
    let label = (FAMILY, 0.85 * font);
    if p.log_y {
        let mut chart = builder.build_cartesian_2d(x, y.log_scale())?;
        chart
            .configure_mesh()
            .x_desc("episode")
            .y_desc(p.y_desc)
            .label_style(label)
            .axis_desc_style(label)
            .light_line_style(BLACK.mix(0.04))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_labels(6)
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .draw()?;
        draw_series(&mut chart, p, font)
    } else {
        let mut chart = builder.build_cartesian_2d(x, y)?;
        chart
            .configure_mesh()
            .x_desc("episode")
            .y_desc(p.y_desc)
            .label_style(label)
            .axis_desc_style(label)
            .light_line_style(BLACK.mix(0.04))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        draw_series(&mut chart, p, font)
    }
}

fn draw_series<'a, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    p: &Panel,
    font: f64,
) -> anyhow::Result<()> {
    let key = (font * 1.2) as i32;
    if let Some(band) = &p.band {
        let upper = band.iter().map(|&(x, _, hi)| (x, hi));
        let lower = band.iter().rev().map(|&(x, lo, _)| (x, lo));
        let fill = VAL.mix(0.2).filled();
        chart
            .draw_series(std::iter::once(Polygon::new(
                upper.chain(lower).collect::<Vec<_>>(),
                fill,
            )))?
            .label("95% CI")
            .legend(move |(x, y)| Rectangle::new([(x, y - 4), (x + key, y + 4)], fill));
    }
    for s in &p.series {
        let style = s.style;
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), style))?
            .label(s.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + key, y)], style));
        if s.markers {
            let dot = style.color.filled();
            chart.draw_series(s.points.iter().map(|&q| Circle::new(q, 3, dot)))?;
        }
    }
    if p.series.len() > 1 || p.band.is_some() {
        chart
            .configure_series_labels()
            .position(p.legend.clone())
            .label_font((FAMILY, 0.85 * font))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
    }
    Ok(())
}
