//! The `compare` chart: stacked panels of grouped bars or lines, one colour
//! per mode, drawn with `plotters` into a standalone SVG document.
//!
//! Each point is the median over rounds; when there were several rounds, a
//! whisker spans the lowest to the highest round, so a reader sees how much
//! of a difference between modes is noise. Values are written on the marks so
//! the numbers can be read without hovering. A line panel whose values span
//! [`LOG_SPAN`] or more switches to a log scale (latency percentiles from p50
//! to max do), with ticks at 1, 2 and 5 of each decade.
//!
//! Only the SVG backend is built and no font is loaded: text is SVG `<text>`
//! that the viewer renders with its own fonts.

use plotters::coord::Shift;
use plotters::coord::combinators::{BindKeyPoints, IntoLogRange};
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// A chart of stacked panels.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub subtitle: String,
    pub panels: Vec<Panel>,
}

/// One named line or bar series (a mode), one value per category.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// The median over rounds, per category.
    pub values: Vec<Option<f64>>,
    /// The lowest and highest round, per category; empty (or `None`) where
    /// there was one round, and no whisker is drawn.
    pub spread: Vec<Option<(f64, f64)>>,
}

#[derive(Debug, Clone)]
pub enum Panel {
    /// For each category, one bar per series, from zero.
    Bars {
        title: String,
        /// The vertical axis: what is measured and its unit, e.g. "latency (ms)".
        y_label: String,
        categories: Vec<String>,
        series: Vec<Series>,
    },
    /// One line per series across the categories.
    Lines {
        title: String,
        y_label: String,
        categories: Vec<String>,
        series: Vec<Series>,
    },
}

impl Panel {
    /// Title, vertical axis label, categories and series.
    fn parts(&self) -> (&str, &str, &[String], &[Series]) {
        match self {
            Panel::Bars {
                title,
                y_label,
                categories,
                series,
            }
            | Panel::Lines {
                title,
                y_label,
                categories,
                series,
            } => (title, y_label, categories, series),
        }
    }
}

/// A line panel whose largest value is this many times its smallest gets a
/// log scale: on a linear one, a mode ten times faster than another is a flat
/// line at the bottom.
pub const LOG_SPAN: f64 = 10.0;

const WIDTH: u32 = 980;
const PANEL_HEIGHT: u32 = 320;
const HEADER: u32 = 64;
const LEGEND: u32 = 170;
const LEFT: i32 = 20;
const FONT: &str = "sans-serif";

/// Colour of a series: the modes have fixed ones, anything else cycles.
fn colour(name: &str, index: usize) -> RGBColor {
    match name {
        "baseline" => RGBColor(0x6b, 0x72, 0x80),
        "shared" => RGBColor(0x25, 0x63, 0xeb),
        "private" => RGBColor(0xea, 0x58, 0x0c),
        _ => [
            RGBColor(0x16, 0xa3, 0x4a),
            RGBColor(0x93, 0x33, 0xea),
            RGBColor(0xdc, 0x26, 0x26),
            RGBColor(0x08, 0x91, 0xb2),
        ][index % 4],
    }
}

/// A text size in pixels as plotters takes it: it writes `size / 1.24` into
/// the SVG, so `font(12.0)` comes out as 12 px.
fn font(px: f64) -> f64 {
    px * 1.24
}

/// Renders the chart as a standalone SVG document.
pub fn render(chart: &Chart) -> anyhow::Result<String> {
    let height = HEADER + PANEL_HEIGHT * chart.panels.len() as u32 + 10;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (header, body) = root.split_vertically(HEADER);
        header.draw(&Text::new(
            chart.title.as_str(),
            (LEFT, 14),
            (FONT, font(18.0)).into_font().style(FontStyle::Bold),
        ))?;
        header.draw(&Text::new(
            chart.subtitle.as_str(),
            (LEFT, 42),
            (FONT, font(12.0))
                .into_font()
                .color(&RGBColor(0x44, 0x44, 0x44)),
        ))?;
        let panels = body.split_evenly((chart.panels.len().max(1), 1));
        for (panel, area) in chart.panels.iter().zip(&panels) {
            draw_panel(area, panel)?;
        }
        root.present()?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn draw_panel(area: &Area, panel: &Panel) -> anyhow::Result<()> {
    let (_, _, _, series) = panel.parts();
    let (plot, legend_area) = area.split_horizontally(WIDTH - LEGEND);
    legend(&legend_area, series)?;
    let bars = matches!(panel, Panel::Bars { .. });
    let (min, max) = extent(series);
    if !bars && min > 0.0 && max / min >= LOG_SPAN {
        // Room above the top for the value written on it.
        let (lo, hi) = (min / 1.3, max * 1.6);
        let y = (lo..hi).log_scale().with_key_points(log_ticks(lo, hi));
        plot_panel(&plot, panel, y, true)
    } else {
        // Room above the top for the values written on it: on a line panel,
        // one above the other.
        let headroom = if bars { 1.12 } else { 1.25 };
        let y: RangedCoordf64 = (0.0..(max * headroom).max(1e-9)).into();
        plot_panel(&plot, panel, y, false)
    }
}

/// Axes, marks and values of one panel on a linear or a log vertical axis.
fn plot_panel<Y>(plot: &Area, panel: &Panel, y: Y, log: bool) -> anyhow::Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let (title, y_label, categories, series) = panel.parts();
    // Categories sit at 0, 1, 2, ... with half a category of room each side;
    // asked for n labels, plotters puts them at those integers.
    let n = categories.len().max(1);
    let x: RangedCoordf64 = (-0.5..n as f64 - 0.5).into();
    let mut chart = ChartBuilder::on(plot)
        .caption(title, (FONT, font(14.0)).into_font().style(FontStyle::Bold))
        .margin_left(LEFT as u32)
        .margin_right(10)
        .margin_top(6)
        .x_label_area_size(28)
        .y_label_area_size(78)
        .build_cartesian_2d(x, y)?;
    let axis = if log {
        format!("{y_label}, log scale")
    } else {
        y_label.to_string()
    };
    let category_label = |v: &f64| {
        if v.fract() == 0.0 && *v >= 0.0 {
            categories.get(*v as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .y_labels(6)
        .bold_line_style(RGBColor(0xe5, 0xe7, 0xeb))
        .light_line_style(TRANSPARENT)
        .axis_style(BLACK)
        .x_label_formatter(&category_label)
        .y_label_formatter(&|v| fmt_tick(*v))
        .y_desc(axis)
        .axis_desc_style((FONT, font(12.0)))
        .label_style((FONT, font(12.0)))
        .draw()?;

    let count = series.len().max(1) as f64;
    for (k, ser) in series.iter().enumerate() {
        let colour = colour(&ser.name, k);
        let marks: Vec<Mark> = ser
            .values
            .iter()
            .enumerate()
            .filter_map(|(c, v)| {
                let median = v.filter(|v| v.is_finite() && (!log || *v > 0.0))?;
                let whisker = ser.spread.get(c).copied().flatten();
                Some(Mark {
                    category: c as f64,
                    median,
                    whisker: whisker.filter(|(low, high)| high > low),
                })
            })
            .collect();
        match panel {
            Panel::Bars { .. } => {
                // The group takes 0.8 of a category, one bar per series.
                let width = 0.8 / count;
                for mark in &marks {
                    let v = mark.median;
                    let left = mark.category - 0.4 + width * k as f64;
                    let centre = left + width / 2.0;
                    chart.draw_series(std::iter::once(Rectangle::new(
                        [(left + width * 0.05, 0.0), (left + width * 0.95, v)],
                        colour.filled(),
                    )))?;
                    let top = match mark.whisker {
                        Some((low, high)) => {
                            // A whisker with caps a third of the bar wide.
                            let cap = width / 6.0;
                            let style = BLACK.mix(0.7).stroke_width(1);
                            chart.draw_series(
                                [
                                    vec![(centre, low), (centre, high)],
                                    vec![(centre - cap, low), (centre + cap, low)],
                                    vec![(centre - cap, high), (centre + cap, high)],
                                ]
                                .map(|path| PathElement::new(path, style)),
                            )?;
                            high
                        }
                        None => v,
                    };
                    chart.draw_series(std::iter::once(
                        EmptyElement::at((centre, top))
                            + Text::new(
                                fmt_num(v),
                                (0, -4),
                                TextStyle::from((FONT, font(11.0)).into_font())
                                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
                            ),
                    ))?;
                }
            }
            Panel::Lines { .. } => {
                // Lines step a little aside from each other so that their
                // whiskers do not hide one another.
                let dodge = 0.04 * (k as f64 - (count - 1.0) / 2.0);
                chart.draw_series(LineSeries::new(
                    marks.iter().map(|m| (m.category + dodge, m.median)),
                    colour.stroke_width(2),
                ))?;
                for mark in &marks {
                    let (v, at) = (mark.median, (mark.category + dodge, mark.median));
                    match mark.whisker {
                        Some((low, high)) => {
                            chart.draw_series(std::iter::once(ErrorBar::new_vertical(
                                at.0,
                                low,
                                v,
                                high,
                                colour.filled().stroke_width(1),
                                8,
                            )))?;
                        }
                        None => {
                            chart.draw_series(std::iter::once(Circle::new(
                                at,
                                4,
                                colour.filled(),
                            )))?;
                        }
                    }
                    chart.draw_series(std::iter::once(
                        EmptyElement::at(at)
                            + Text::new(
                                fmt_num(v),
                                (6, -3 - 11 * k as i32),
                                TextStyle::from((FONT, font(10.0)).into_font())
                                    .color(&colour)
                                    .pos(Pos::new(HPos::Left, VPos::Bottom)),
                            ),
                    ))?;
                }
            }
        }
    }
    Ok(())
}

/// One point of a series as drawn.
struct Mark {
    /// 0, 1, 2, ...: the category's place on the horizontal axis.
    category: f64,
    median: f64,
    /// Lowest and highest round, where they differ.
    whisker: Option<(f64, f64)>,
}

/// The smallest and the largest value of the panel, whiskers included
/// (`(inf, 0)` when there is none).
fn extent(series: &[Series]) -> (f64, f64) {
    let all = series.iter().flat_map(|s| {
        s.values
            .iter()
            .flatten()
            .copied()
            .chain(s.spread.iter().flatten().flat_map(|&(lo, hi)| [lo, hi]))
    });
    all.filter(|v| v.is_finite())
        .fold((f64::INFINITY, 0.0_f64), |(min, max), v| {
            (min.min(v), max.max(v))
        })
}

/// Ticks between `lo` and `hi` at 1, 2 and 5 of each decade, or at each
/// decade alone when more than three decades would crowd the axis.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (first, last) = (lo.log10().floor() as i32, hi.log10().floor() as i32);
    let steps: &[f64] = if last - first > 3 {
        &[1.0]
    } else {
        &[1.0, 2.0, 5.0]
    };
    (first..=last)
        .flat_map(|e| steps.iter().map(move |s| s * 10f64.powi(e)))
        .filter(|t| (lo..=hi).contains(t))
        .collect()
}

/// The legend to the right of a panel: one swatch per series, and what the
/// whiskers mean where there are any.
fn legend(area: &Area, series: &[Series]) -> anyhow::Result<()> {
    let text = (FONT, font(12.0)).into_font();
    for (i, ser) in series.iter().enumerate() {
        let y = 40 + 20 * i as i32;
        area.draw(&Rectangle::new(
            [(10, y), (24, y + 14)],
            colour(&ser.name, i).filled(),
        ))?;
        area.draw(&Text::new(ser.name.as_str(), (30, y + 1), text.clone()))?;
    }
    let whiskers = series
        .iter()
        .any(|s| s.spread.iter().flatten().any(|(lo, hi)| hi > lo));
    if whiskers {
        let y = 48 + 20 * series.len() as i32;
        let note = (FONT, font(11.0))
            .into_font()
            .color(&RGBColor(0x44, 0x44, 0x44));
        area.draw(&ErrorBar::new_vertical(
            17,
            y + 16,
            y + 8,
            y,
            BLACK.mix(0.7).filled().stroke_width(1),
            8,
        ))?;
        area.draw(&Text::new("median, and the", (30, y - 2), note.clone()))?;
        area.draw(&Text::new("lowest to highest", (30, y + 11), note.clone()))?;
        area.draw(&Text::new("of the rounds", (30, y + 24), note))?;
    }
    Ok(())
}

/// A number with about three significant digits and k/M suffixes.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 || a == 0.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        let digits = (-a.log10()).ceil() as usize + 2;
        format!("{v:.digits$}")
    }
}

/// An axis tick: short, without trailing zeros, thousands as k from 1000 on
/// so that one axis does not mix "8000" and "10k".
fn fmt_tick(v: f64) -> String {
    let (scaled, suffix) = match v.abs() {
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let number = if suffix.is_empty() {
        fmt_num(scaled)
    } else {
        format!("{scaled:.2}")
    };
    let number = if number.contains('.') {
        number.trim_end_matches('0').trim_end_matches('.')
    } else {
        &number
    };
    format!("{number}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(0.01234), "0.0123");
        assert_eq!(fmt_num(1.5), "1.50");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(999.0), "999");
        assert_eq!(fmt_num(12_345.0), "12.3k");
        assert_eq!(fmt_num(2_500_000.0), "2.50M");
        assert_eq!(fmt_tick(0.2), "0.2");
        assert_eq!(fmt_tick(0.05), "0.05");
        assert_eq!(fmt_tick(1.5), "1.5");
        assert_eq!(fmt_tick(20_000.0), "20k");
        assert_eq!(fmt_tick(8000.0), "8k");
        assert_eq!(fmt_tick(2500.0), "2.5k");
        assert_eq!(fmt_tick(500.0), "500");
        assert_eq!(fmt_tick(0.0), "0");
    }

    #[test]
    fn log_ticks_are_one_two_five() {
        assert_eq!(
            log_ticks(0.1, 10.0),
            vec![0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
        );
        assert_eq!(log_ticks(0.15, 3.0), vec![0.2, 0.5, 1.0, 2.0]);
        assert_eq!(
            log_ticks(1.0, 20_000.0),
            vec![1.0, 10.0, 100.0, 1000.0, 10_000.0]
        );
    }

    fn series(name: &str, values: &[Option<f64>], spread: &[Option<(f64, f64)>]) -> Series {
        Series {
            name: name.into(),
            values: values.to_vec(),
            spread: spread.to_vec(),
        }
    }

    fn sample() -> Chart {
        Chart {
            title: "t <&>".into(),
            subtitle: "s".into(),
            panels: vec![
                Panel::Lines {
                    title: "latency".into(),
                    y_label: "latency (ms)".into(),
                    categories: vec!["p50".into(), "p99".into()],
                    series: vec![
                        series(
                            "baseline",
                            &[Some(0.2), Some(30.0)],
                            &[Some((0.15, 0.3)), Some((20.0, 45.0))],
                        ),
                        series("shared", &[Some(0.3), None], &[]),
                    ],
                },
                Panel::Bars {
                    title: "throughput".into(),
                    y_label: "deliveries/s".into(),
                    categories: vec!["deliveries/s".into()],
                    series: vec![series(
                        "private",
                        &[Some(12_000.0)],
                        &[Some((11_000.0, 12_500.0))],
                    )],
                },
            ],
        }
    }

    #[test]
    fn renders_a_well_formed_document() {
        let svg = render(&sample()).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        // Every element that opens is closed (the file opens in a browser).
        for tag in ["svg", "text", "rect", "circle", "line", "polyline"] {
            let opened =
                svg.matches(&format!("<{tag} ")).count() + svg.matches(&format!("<{tag}>")).count();
            let closed = svg.matches(&format!("</{tag}>")).count() + count_self_closed(&svg, tag);
            assert_eq!(opened, closed, "{tag}");
        }
    }

    #[test]
    fn shows_series_values_spread_and_axis() {
        let svg = render(&sample()).unwrap();
        // One line per series of the line panel, in the series' colours.
        for colour in ["#6B7280", "#2563EB"] {
            let line = format!(r#"stroke="{colour}" stroke-width="2""#);
            assert_eq!(svg.matches(&line).count(), 1, "{colour}");
        }
        assert!(svg.contains(r##"fill="#EA580C""##));
        for name in ["baseline", "shared", "private"] {
            assert!(has_text(&svg, name), "{name}");
        }
        // Values on the marks, and the axis says what it measures and how.
        assert!(has_text(&svg, "12.0k"));
        assert!(has_text(&svg, "latency (ms), log scale"));
        assert!(has_text(&svg, "deliveries/s"));
        // 0.15 to 45 ms: ticks by 1-2-5.
        for tick in ["0.2", "1", "5", "50"] {
            assert!(has_text(&svg, tick), "{tick}");
        }
        // Whiskers and their legend where rounds spread.
        assert!(svg.contains("lowest to highest"));
    }

    #[test]
    fn one_round_has_no_whiskers() {
        let mut chart = sample();
        for panel in &mut chart.panels {
            let (Panel::Bars { series, .. } | Panel::Lines { series, .. }) = panel;
            for s in series {
                s.spread.clear();
            }
        }
        let svg = render(&chart).unwrap();
        assert!(!svg.contains("lowest to highest"));
    }

    /// A `<text>` element holding `text` (plotters writes it on a line of its own).
    fn has_text(svg: &str, text: &str) -> bool {
        svg.contains(&format!("\n{text}\n</text>"))
    }

    fn count_self_closed(svg: &str, tag: &str) -> usize {
        svg.split(&format!("<{tag} "))
            .skip(1)
            .filter(|rest| {
                let end = rest.find('>').unwrap();
                rest[..end].ends_with('/')
            })
            .count()
    }
}
