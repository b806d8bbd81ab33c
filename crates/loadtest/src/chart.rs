//! A small hand-written SVG chart: stacked panels of grouped bars or lines,
//! one colour per mode, values written on the marks so a person can read the
//! numbers without hovering. No fonts or plotting backend needed: text is
//! plain SVG `<text>` that any browser renders.

use std::fmt::Write as _;

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
    pub values: Vec<Option<f64>>,
}

#[derive(Debug, Clone)]
pub enum Panel {
    /// For each category, one bar per series.
    Bars {
        title: String,
        unit: String,
        categories: Vec<String>,
        series: Vec<Series>,
    },
    /// One polyline per series across the categories.
    Lines {
        title: String,
        unit: String,
        categories: Vec<String>,
        series: Vec<Series>,
        log_y: bool,
    },
}

const WIDTH: f64 = 980.0;
const PANEL_HEIGHT: f64 = 300.0;
const HEADER: f64 = 64.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 46.0;

/// Colour of a series: the modes have fixed ones, anything else cycles.
fn colour(name: &str, index: usize) -> &'static str {
    match name {
        "baseline" => "#6b7280",
        "shared" => "#2563eb",
        "private" => "#ea580c",
        _ => ["#16a34a", "#9333ea", "#dc2626", "#0891b2"][index % 4],
    }
}

/// Renders the chart as a standalone SVG document.
pub fn render(chart: &Chart) -> String {
    let height = HEADER + PANEL_HEIGHT * chart.panels.len() as f64 + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="26" font-size="18" font-weight="bold">{}</text>"#,
        LEFT,
        esc(&chart.title)
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="48" font-size="12" fill="#444">{}</text>"##,
        LEFT,
        esc(&chart.subtitle)
    );
    for (i, panel) in chart.panels.iter().enumerate() {
        let top = HEADER + PANEL_HEIGHT * i as f64;
        match panel {
            Panel::Bars {
                title,
                unit,
                categories,
                series,
            } => bars(&mut s, top, title, unit, categories, series),
            Panel::Lines {
                title,
                unit,
                categories,
                series,
                log_y,
            } => lines(&mut s, top, title, unit, categories, series, *log_y),
        }
    }
    s.push_str("</svg>\n");
    s
}

/// The plot area of a panel starting at `top`.
struct Area {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Area {
    fn new(top: f64) -> Area {
        Area {
            x0: LEFT,
            x1: WIDTH - RIGHT,
            y0: top + TOP,
            y1: top + PANEL_HEIGHT - BOTTOM,
        }
    }
}

/// Maps values to the vertical axis, linear from 0 or log10.
struct Scale {
    lo: f64,
    hi: f64,
    log: bool,
    ticks: Vec<f64>,
}

impl Scale {
    fn new(values: impl Iterator<Item = f64>, log: bool) -> Scale {
        let values: Vec<f64> = values
            .filter(|v| v.is_finite() && (!log || *v > 0.0))
            .collect();
        let max = values.iter().copied().fold(0.0_f64, f64::max);
        if log && !values.is_empty() {
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let lo = min.log10().floor();
            let hi = max.log10().ceil().max(lo + 1.0);
            let ticks = (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect();
            return Scale {
                lo: 10f64.powf(lo),
                hi: 10f64.powf(hi),
                log: true,
                ticks,
            };
        }
        let step = nice_step(if max > 0.0 { max } else { 1.0 } / 5.0);
        let hi = (max / step).ceil().max(1.0) * step;
        let ticks = (0..=((hi / step).round() as usize))
            .map(|k| k as f64 * step)
            .collect();
        Scale {
            lo: 0.0,
            hi,
            log: false,
            ticks,
        }
    }

    fn y(&self, area: &Area, v: f64) -> f64 {
        let t = if self.log {
            (v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        area.y1 - t.clamp(0.0, 1.0) * (area.y1 - area.y0)
    }
}

fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn frame(s: &mut String, area: &Area, scale: &Scale, title: &str, unit: &str) {
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="14" font-weight="bold">{}</text>"#,
        area.x0,
        area.y0 - 12.0,
        esc(title)
    );
    for &t in &scale.ticks {
        let y = scale.y(area, t);
        let _ = writeln!(
            s,
            r##"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e5e7eb"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end" fill="#374151">{}</text>"##,
            area.x0,
            area.x1,
            area.x0 - 6.0,
            y + 4.0,
            esc(&fmt_num(t))
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#111"/><line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#111"/>"##,
        area.x0, area.y0, area.x0, area.y1, area.x0, area.y1, area.x1, area.y1
    );
    let mid = (area.y0 + area.y1) / 2.0;
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{mid:.1}" font-size="11" fill="#374151" text-anchor="middle" transform="rotate(-90 {} {mid:.1})">{}{}</text>"##,
        area.x0 - 62.0,
        area.x0 - 62.0,
        esc(unit),
        if scale.log { " (log scale)" } else { "" }
    );
}

fn legend(s: &mut String, area: &Area, series: &[Series]) {
    for (i, ser) in series.iter().enumerate() {
        let y = area.y0 + 8.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{:.1}" width="14" height="14" fill="{}"/><text x="{}" y="{:.1}" font-size="12">{}</text>"#,
            area.x1 + 16.0,
            y - 11.0,
            colour(&ser.name, i),
            area.x1 + 36.0,
            y,
            esc(&ser.name)
        );
    }
}

fn category_labels(s: &mut String, area: &Area, categories: &[String]) {
    let width = (area.x1 - area.x0) / categories.len().max(1) as f64;
    for (c, label) in categories.iter().enumerate() {
        let x = area.x0 + width * (c as f64 + 0.5);
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{}" font-size="12" text-anchor="middle">{}</text>"#,
            area.y1 + 18.0,
            esc(label)
        );
    }
}

fn bars(
    s: &mut String,
    top: f64,
    title: &str,
    unit: &str,
    categories: &[String],
    series: &[Series],
) {
    let area = Area::new(top);
    let scale = Scale::new(
        series
            .iter()
            .flat_map(|x| x.values.iter().flatten().copied()),
        false,
    );
    frame(s, &area, &scale, title, unit);
    let group = (area.x1 - area.x0) / categories.len().max(1) as f64;
    let bar = (group * 0.8 / series.len().max(1) as f64).min(80.0);
    for (c, _) in categories.iter().enumerate() {
        let start = area.x0 + group * c as f64 + (group - bar * series.len() as f64) / 2.0;
        for (k, ser) in series.iter().enumerate() {
            let Some(v) = ser.values.get(c).copied().flatten() else {
                continue;
            };
            let x = start + bar * k as f64;
            let y = scale.y(&area, v);
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                bar - 4.0,
                (area.y1 - y).max(0.5),
                colour(&ser.name, k),
                esc(&ser.name),
                esc(&fmt_num(v))
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
                x + (bar - 4.0) / 2.0,
                y - 4.0,
                esc(&fmt_num(v))
            );
        }
    }
    category_labels(s, &area, categories);
    legend(s, &area, series);
}

fn lines(
    s: &mut String,
    top: f64,
    title: &str,
    unit: &str,
    categories: &[String],
    series: &[Series],
    log_y: bool,
) {
    let area = Area::new(top);
    let scale = Scale::new(
        series
            .iter()
            .flat_map(|x| x.values.iter().flatten().copied()),
        log_y,
    );
    frame(s, &area, &scale, title, unit);
    let width = (area.x1 - area.x0) / categories.len().max(1) as f64;
    for (k, ser) in series.iter().enumerate() {
        let points: Vec<(f64, f64, f64)> = ser
            .values
            .iter()
            .enumerate()
            .filter_map(|(c, v)| {
                v.filter(|v| v.is_finite() && (!log_y || *v > 0.0))
                    .map(|v| (area.x0 + width * (c as f64 + 0.5), scale.y(&area, v), v))
            })
            .collect();
        let colour = colour(&ser.name, k);
        let path: Vec<String> = points
            .iter()
            .map(|(x, y, _)| format!("{x:.1},{y:.1}"))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for (x, y, v) in points {
            let _ = writeln!(
                s,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{colour}"><title>{}: {}</title></circle><text x="{:.1}" y="{:.1}" font-size="10" fill="{colour}">{}</text>"#,
                esc(&ser.name),
                esc(&fmt_num(v)),
                x + 5.0,
                y - 5.0 - 11.0 * k as f64,
                esc(&fmt_num(v))
            );
        }
    }
    category_labels(s, &area, categories);
    legend(s, &area, series);
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

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
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
    }

    #[test]
    fn renders_a_well_formed_document() {
        let chart = Chart {
            title: "t <&>".into(),
            subtitle: "s".into(),
            panels: vec![
                Panel::Lines {
                    title: "latency".into(),
                    unit: "ms".into(),
                    categories: vec!["p50".into(), "p99".into()],
                    series: vec![
                        Series {
                            name: "baseline".into(),
                            values: vec![Some(0.2), Some(3.0)],
                        },
                        Series {
                            name: "shared".into(),
                            values: vec![Some(0.3), None],
                        },
                    ],
                    log_y: true,
                },
                Panel::Bars {
                    title: "throughput".into(),
                    unit: "/s".into(),
                    categories: vec!["deliveries/s".into()],
                    series: vec![Series {
                        name: "private".into(),
                        values: vec![Some(12_000.0)],
                    }],
                },
            ],
        };
        let svg = render(&chart);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        assert!(svg.contains("12.0k"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        // Every element that opens is closed (the file opens in a browser).
        for tag in ["text", "rect", "circle", "line", "polyline", "title"] {
            let opened =
                svg.matches(&format!("<{tag} ")).count() + svg.matches(&format!("<{tag}>")).count();
            let closed = svg.matches(&format!("</{tag}>")).count() + count_self_closed(&svg, tag);
            assert_eq!(opened, closed, "{tag}");
        }
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
