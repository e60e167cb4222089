//! Report figures with plotters: one drawing routine per figure kind, rendered to PNG (an
//! in-memory bitmap encoded by `image`) and, for the report's main figures, SVG.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Context};
use plotters::coord::Shift;
use plotters::prelude::*;

/// A figure that can draw itself on any plotters backend.
pub trait Figure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()>;
}

/// plotters' errors carry the backend's error type; reports only need their message.
fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing: {e}")
}

/// The embedded font: text needs no system font library (DejaVu Sans, Bitstream Vera licence,
/// see runner/assets/DejaVuSans.LICENSE.txt).
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/DejaVuSans.ttf");
        for style in [FontStyle::Normal, FontStyle::Bold] {
            // The bytes are a valid TrueType font (checked by the tests drawing text).
            let _ = plotters::style::register_font("sans-serif", style, bytes);
        }
    });
}

/// Write `stem.png` (and `stem.svg` when `svg`).
pub fn save(fig: &impl Figure, stem: &Path, (w, h): (u32, u32), svg: bool) -> anyhow::Result<()> {
    register_font();
    let png = stem.with_extension("png");
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        fig.draw(&root)?;
        root.present().map_err(err)?;
    }
    // Best compression: report pictures are committed, and are mostly flat colour.
    let file = std::fs::File::create(&png).with_context(|| format!("writing {}", png.display()))?;
    let encoder = image::codecs::png::PngEncoder::new_with_quality(
        std::io::BufWriter::new(file),
        image::codecs::png::CompressionType::Best,
        image::codecs::png::FilterType::Adaptive,
    );
    image::ImageEncoder::write_image(encoder, &buf, w, h, image::ExtendedColorType::Rgb8)
        .with_context(|| format!("writing {}", png.display()))?;
    if svg {
        let path = stem.with_extension("svg");
        let root = SVGBackend::new(&path, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        fig.draw(&root)?;
        root.present()
            .map_err(err)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn color(i: usize) -> RGBColor {
    // Colour-blind-safe (Okabe-Ito) order.
    const C: [(u8, u8, u8); 7] = [
        (0, 114, 178),
        (213, 94, 0),
        (0, 158, 115),
        (204, 121, 167),
        (230, 159, 0),
        (86, 180, 233),
        (100, 100, 100),
    ];
    let (r, g, b) = C[i % C.len()];
    RGBColor(r, g, b)
}

/// A (min, max) range over finite values with some headroom; a fallback when there are none.
fn padded_range(values: impl Iterator<Item = f64>, floor_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if floor_zero {
        lo = lo.min(0.0);
    }
    let pad = ((hi - lo) * 0.08).max(1e-3);
    (
        if floor_zero && lo >= 0.0 {
            lo
        } else {
            lo - pad
        },
        hi + pad,
    )
}

/// A series of a line chart: its label and points (x, mean, std).
pub type LinePoints = (String, Vec<(f64, f64, f64)>);
/// A series of a bar chart: its label and, per group, Some((mean, std)) or None.
pub type BarValues = (String, Vec<Option<(f64, f64)>>);

/// Mean ± std at numeric x positions, one line per series.
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// (series label, points (x, mean, std)); std 0 draws no bar.
    pub series: Vec<LinePoints>,
    /// Extra reference points drawn as hollow markers, e.g. the thesis's numbers.
    pub references: Vec<(String, Vec<(f64, f64)>)>,
}

impl LineChart {
    /// The padded x and y ranges of every point, error bar and reference.
    fn ranges(&self) -> ((f64, f64), (f64, f64)) {
        let xs = self
            .series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.0))
            .chain(
                self.references
                    .iter()
                    .flat_map(|(_, p)| p.iter().map(|q| q.0)),
            );
        let ys = self
            .series
            .iter()
            .flat_map(|(_, p)| p.iter().flat_map(|&(_, m, s)| [m - s, m + s]))
            .chain(
                self.references
                    .iter()
                    .flat_map(|(_, p)| p.iter().map(|q| q.1)),
            );
        (padded_range(xs, false), padded_range(ys, false))
    }

    /// Ticks at the data's own x values when there are few (heads 1, 2, 4, 8), plain otherwise:
    /// whether they are at the data, and the label of a candidate tick (blank off the data).
    fn x_ticks(&self) -> (bool, impl Fn(&f64) -> String) {
        let mut ticks: Vec<f64> = self
            .series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.0))
            .collect();
        ticks.sort_by(f64::total_cmp);
        ticks.dedup();
        let at_data = ticks.len() <= 12;
        let fmt = move |x: &f64| {
            if at_data && !ticks.iter().any(|t| (t - x).abs() < 1e-9) {
                String::new()
            } else if x.fract() == 0.0 {
                format!("{x:.0}")
            } else {
                format!("{x:.2}")
            }
        };
        (at_data, fmt)
    }
}

impl Figure for LineChart {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()> {
        let ((x0, x1), (y0, y1)) = self.ranges();
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        let (at_data, fmt) = self.x_ticks();
        let mut mesh = chart.configure_mesh();
        mesh.max_light_lines(0).bold_line_style(BLACK.mix(0.12));
        mesh.x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_label_formatter(&fmt)
            .label_style(("sans-serif", 14));
        if at_data {
            // Enough candidate ticks that every data x is one of them (labels elsewhere are blank).
            mesh.x_labels(((x1 - x0) * 4.0).ceil().clamp(10.0, 400.0) as usize)
                .disable_x_mesh();
        }
        mesh.draw().map_err(err)?;
        for (i, (label, points)) in self.series.iter().enumerate() {
            let c = color(i);
            chart
                .draw_series(LineSeries::new(
                    points.iter().map(|&(x, m, _)| (x, m)),
                    c.stroke_width(2),
                ))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            chart
                .draw_series(points.iter().filter(|p| p.2 > 0.0).map(|&(x, m, s)| {
                    ErrorBar::new_vertical(x, m - s, m, m + s, c.stroke_width(2), 8)
                }))
                .map_err(err)?;
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|&(x, m, _)| Circle::new((x, m), 4, c.filled())),
                )
                .map_err(err)?;
        }
        for (j, (label, points)) in self.references.iter().enumerate() {
            let c = color(self.series.len() + j);
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|&(x, y)| Cross::new((x, y), 6, c.stroke_width(2))),
                )
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| Cross::new((x + 10, y), 5, c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerLeft)
            .draw()
            .map_err(err)?;
        Ok(())
    }
}

/// Grouped bars: one group per row, one bar per series, error bars, optional reference marks.
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub groups: Vec<String>,
    /// (series label, per group: Some((mean, std)) or None for no bar).
    pub series: Vec<BarValues>,
    /// (label, per group and series: a reference value drawn as a cross on the bar's x).
    pub references: Vec<(String, Vec<Vec<Option<f64>>>)>,
}

impl Figure for BarChart {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()> {
        let n_series = self.series.len().max(1) as f64;
        let ys = self
            .series
            .iter()
            .flat_map(|(_, v)| v.iter().flatten().map(|&(m, s)| m + s))
            .chain(
                self.references
                    .iter()
                    .flat_map(|(_, g)| g.iter().flatten().flatten().copied()),
            );
        let (_, y1) = padded_range(ys, true);
        let groups = self.groups.len() as f64;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..groups, 0.0..y1)
            .map_err(err)?;
        let names = self.groups.clone();
        chart
            .configure_mesh()
            .max_light_lines(0)
            .bold_line_style(BLACK.mix(0.12))
            .disable_x_mesh()
            .x_labels(self.groups.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                // Label each group once, at its centre.
                if (x - (i as f64 + 0.5)).abs() < 1e-6 {
                    names.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(&self.y_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        let width = 0.8 / n_series;
        let bar_x = |g: usize, s: usize| g as f64 + 0.1 + width * s as f64;
        for (s, (label, values)) in self.series.iter().enumerate() {
            let c = color(s);
            chart
                .draw_series(values.iter().enumerate().filter_map(|(g, v)| {
                    v.map(|(m, _)| {
                        Rectangle::new(
                            [(bar_x(g, s), 0.0), (bar_x(g, s) + width * 0.92, m)],
                            c.mix(0.8).filled(),
                        )
                    })
                }))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
            chart
                .draw_series(values.iter().enumerate().filter_map(|(g, v)| {
                    v.filter(|&(_, sd)| sd > 0.0).map(|(m, sd)| {
                        let x = bar_x(g, s) + width * 0.46;
                        ErrorBar::new_vertical(x, m - sd, m, m + sd, BLACK.stroke_width(1), 8)
                    })
                }))
                .map_err(err)?;
        }
        for (r, (label, per_group)) in self.references.iter().enumerate() {
            let c = color(self.series.len() + r);
            let marks: Vec<(f64, f64)> = per_group
                .iter()
                .enumerate()
                .flat_map(|(g, per_series)| {
                    per_series
                        .iter()
                        .enumerate()
                        .filter_map(move |(s, v)| v.map(|y| (bar_x(g, s) + width * 0.46, y)))
                })
                .collect();
            chart
                .draw_series(
                    marks
                        .into_iter()
                        .map(|p| Cross::new(p, 7, c.stroke_width(3))),
                )
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| Cross::new((x + 7, y), 5, c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(err)?;
        Ok(())
    }
}

/// Per-epoch curves of one trial: loss terms (left) and accuracies (right).
pub struct LearningCurves {
    pub title: String,
    pub losses: Vec<(String, Vec<(f64, f64)>)>,
    pub accuracies: Vec<(String, Vec<(f64, f64)>)>,
}

fn curve_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    y_label: &str,
    lines: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let (x0, x1) = padded_range(lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)), false);
    let (y0, y1) = padded_range(lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)), true);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .max_light_lines(0)
        .bold_line_style(BLACK.mix(0.12))
        .x_desc("epoch")
        .y_desc(y_label)
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    for (i, (label, points)) in lines.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    Ok(())
}

impl Figure for LearningCurves {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()> {
        let root = root.titled(&self.title, ("sans-serif", 16)).map_err(err)?;
        let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
        curve_panel(&left, "training losses", "loss", &self.losses)?;
        curve_panel(&right, "accuracy", "accuracy (%)", &self.accuracies)?;
        Ok(())
    }
}

/// A confusion matrix as a row-normalised heat map with the counts written in each cell.
pub struct ConfusionMatrix {
    pub title: String,
    pub class_names: Vec<String>,
    /// counts[true][predicted]
    pub counts: Vec<Vec<u64>>,
}

impl Figure for ConfusionMatrix {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()> {
        let n = self.counts.len();
        let names = self.class_names.clone();
        let label = move |v: &f64| -> String {
            let i = v.floor() as usize;
            if (v - (i as f64 + 0.5)).abs() < 1e-6 {
                names.get(i).cloned().unwrap_or_else(|| i.to_string())
            } else {
                String::new()
            }
        };
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..n as f64, n as f64..0.0)
            .map_err(err)?;
        chart
            .configure_mesh()
            .max_light_lines(0)
            .bold_line_style(BLACK.mix(0.12))
            .disable_mesh()
            .x_labels(2 * n + 1)
            .y_labels(2 * n + 1)
            .x_label_formatter(&label)
            .y_label_formatter(&label)
            .x_desc("predicted")
            .y_desc("true")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(err)?;
        for (t, row) in self.counts.iter().enumerate() {
            let total: u64 = row.iter().sum::<u64>().max(1);
            for (p, &count) in row.iter().enumerate() {
                let share = count as f64 / total as f64;
                // White (0) to dark blue (1).
                let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * share) as u8;
                let fill = RGBColor(mix(255, 8), mix(255, 48), mix(255, 107));
                let (x, y) = (p as f64, t as f64);
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x, y), (x + 1.0, y + 1.0)],
                        fill.filled(),
                    )))
                    .map_err(err)?;
                let ink = if share > 0.5 { WHITE } else { BLACK };
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{count}"),
                        (x + 0.35, y + 0.4),
                        ("sans-serif", 13).into_font().color(&ink),
                    )))
                    .map_err(err)?;
            }
        }
        Ok(())
    }
}
