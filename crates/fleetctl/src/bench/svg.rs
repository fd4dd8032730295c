//! Small hand-written SVG charts: a figure is a row of panels, each a line chart (series over numeric x)
//! or a bar chart (one bar per label), each with its own y axis from 0, gridlines and units, plus a
//! shared legend. No plotting crate: the charts the report needs are a few dozen elements each.

use std::fmt::Write as _;

use super::marks::{bars, lines, Area};

const PANEL_W: f64 = 360.0;
const PANEL_H: f64 = 300.0;
const MARGIN_L: f64 = 64.0;
const MARGIN_R: f64 = 18.0;
const MARGIN_T: f64 = 34.0;
const MARGIN_B: f64 = 54.0;
const TITLE_H: f64 = 36.0;
const LEGEND_H: f64 = 30.0;
const FONT: &str = "font-family=\"Helvetica, Arial, sans-serif\"";

/// Colours that stay apart for the colour-blind (Okabe–Ito), then a neutral for ceilings.
pub const COLORS: [&str; 5] = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00"];
pub const CEILING_COLOR: &str = "#555555";

#[derive(Debug, Clone)]
pub struct Figure {
    pub title: String,
    pub panels: Vec<Panel>,
    pub legend: Vec<LegendEntry>,
}

#[derive(Debug, Clone)]
pub struct LegendEntry {
    pub label: String,
    pub color: String,
    pub dashed: bool,
}

#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub chart: Chart,
}

#[derive(Debug, Clone)]
pub enum Chart {
    /// Series over numeric x, ticks at `x_ticks`.
    Lines { series: Vec<Series>, x_ticks: Vec<f64> },
    /// One bar per label, in `color`, each with its value written above it.
    Bars { labels: Vec<String>, values: Vec<f64>, color: String },
}

#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: String,
    /// Dashed, no markers, no point labels (a reference line such as a ceiling).
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
    /// Written above the series' last point (a dashed line's name and value).
    pub end_label: Option<String>,
}

impl Figure {
    pub fn render(&self) -> String {
        let columns = self.panels.len().max(1) as f64;
        let legend_h = if self.legend.is_empty() { 0.0 } else { LEGEND_H };
        let (width, height) = (columns * PANEL_W + 20.0, TITLE_H + PANEL_H + legend_h + 10.0);
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
             viewBox=\"0 0 {width} {height}\" {FONT} font-size=\"12\">"
        );
        let _ = writeln!(svg, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">{}</text>",
            width / 2.0,
            esc(&self.title)
        );
        for (i, panel) in self.panels.iter().enumerate() {
            panel.render(&mut svg, 10.0 + i as f64 * PANEL_W, TITLE_H);
        }
        let mut x = 20.0;
        let y = TITLE_H + PANEL_H + 18.0;
        for entry in &self.legend {
            let dash = if entry.dashed { " stroke-dasharray=\"6 4\"" } else { "" };
            let _ = writeln!(
                svg,
                "<line x1=\"{x}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{}\" stroke-width=\"2.5\"{dash}/>",
                x + 28.0,
                entry.color
            );
            let _ = writeln!(svg, "<text x=\"{}\" y=\"{}\">{}</text>", x + 34.0, y + 4.0, esc(&entry.label));
            x += 34.0 + 7.0 * entry.label.chars().count() as f64 + 24.0;
        }
        svg.push_str("</svg>\n");
        svg
    }
}

impl Panel {
    fn render(&self, svg: &mut String, left: f64, top: f64) {
        let plot = Area {
            x0: left + MARGIN_L,
            x1: left + PANEL_W - MARGIN_R,
            y0: top + PANEL_H - MARGIN_B,
            y1: top + MARGIN_T,
        };
        let _ = writeln!(svg, "<g class=\"panel\" data-title=\"{}\">", esc(&self.title));
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"13\" font-weight=\"bold\">{}</text>",
            (plot.x0 + plot.x1) / 2.0,
            top + 18.0,
            esc(&self.title)
        );
        let y_max = nice_max(self.chart.max_y());
        let step = nice_step(y_max / 5.0);
        let mut tick = 0.0;
        while tick <= y_max * 1.0001 {
            let y = plot.y(tick, y_max);
            let _ = writeln!(
                svg,
                "<line x1=\"{}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#e4e4e4\"/>",
                plot.x0, plot.x1
            );
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                plot.x0 - 6.0,
                y + 4.0,
                si(tick, step)
            );
            tick += step;
        }
        let _ = writeln!(
            svg,
            "<path d=\"M{x0} {y1} V{y0} H{x1}\" fill=\"none\" stroke=\"#333\"/>",
            x0 = plot.x0,
            y0 = plot.y0,
            y1 = plot.y1,
            x1 = plot.x1
        );
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            (plot.x0 + plot.x1) / 2.0,
            plot.y0 + 40.0,
            esc(&self.x_label)
        );
        let (cx, cy) = (left + 16.0, (plot.y0 + plot.y1) / 2.0);
        let _ = writeln!(
            svg,
            "<text x=\"{cx}\" y=\"{cy}\" text-anchor=\"middle\" transform=\"rotate(-90 {cx} {cy})\">{}</text>",
            esc(&self.y_label)
        );
        match &self.chart {
            Chart::Lines { series, x_ticks } => lines(svg, &plot, series, x_ticks, y_max),
            Chart::Bars { labels, values, color } => bars(svg, &plot, labels, values, color, y_max),
        }
        svg.push_str("</g>\n");
    }
}

impl Chart {
    fn max_y(&self) -> f64 {
        let values: Vec<f64> = match self {
            Chart::Lines { series, .. } => series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).collect(),
            Chart::Bars { values, .. } => values.clone(),
        };
        values.into_iter().fold(0.0, f64::max)
    }
}

/// The top of the y axis: the largest value plus room, rounded up to a tick.
pub fn nice_max(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let step = nice_step(max * 1.15 / 5.0);
    (max * 1.15 / step).ceil() * step
}

/// 1, 2 or 5 times a power of ten, at least `raw` (no 2.5: every tick then reads exactly with the
/// decimals of its step, 2.5k never printed as 2k).
pub fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.max(f64::MIN_POSITIVE).log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|&s| s >= raw).unwrap_or(10.0 * magnitude)
}

/// `v` with a k/M suffix and as many decimals as `precision` (the spacing of the values shown) needs.
pub fn si(v: f64, precision: f64) -> String {
    let (scaled, unit, p) = match v.abs() {
        a if a >= 1e6 => (v / 1e6, "M", precision / 1e6),
        a if a >= 1e3 => (v / 1e3, "k", precision / 1e3),
        _ => (v, "", precision),
    };
    let decimals = if p >= 1.0 || p <= 0.0 { 0 } else { ((-p.log10()).ceil() as usize).min(2) };
    format!("{scaled:.decimals$}{unit}")
}

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_end_on_round_numbers_and_ticks_read_short() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(2100.0), 5000.0);
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_max(6894.0), 8000.0);
        assert_eq!(si(256_000.0, 50_000.0), "256k");
        assert_eq!(si(1500.0, 500.0), "1.5k");
        assert_eq!(si(5.0, 1.0), "5");
    }

    #[test]
    fn a_figure_is_well_formed_svg_with_one_polyline_per_series_and_one_rect_per_bar() {
        let series = |name: &str, dashed| Series {
            name: name.into(),
            color: COLORS[0].into(),
            dashed,
            points: vec![(1.0, 600.0), (5.0, 1700.0), (20.0, 1500.0)],
            end_label: dashed.then(|| "pgbench <20 clients>".into()),
        };
        let figure = Figure {
            title: "Throughput & pool size".into(),
            panels: vec![
                Panel {
                    title: "hot".into(),
                    x_label: "pool size".into(),
                    y_label: "req/s".into(),
                    chart: Chart::Lines {
                        series: vec![series("4 nodes", false), series("ceiling", true)],
                        x_ticks: vec![1.0, 5.0, 20.0],
                    },
                },
                Panel {
                    title: "latency".into(),
                    x_label: "percentile".into(),
                    y_label: "ms".into(),
                    chart: Chart::Bars {
                        labels: vec!["p50".into(), "p99".into()],
                        values: vec![3.0, 40.0],
                        color: COLORS[1].into(),
                    },
                },
            ],
            legend: vec![LegendEntry { label: "4 nodes".into(), color: COLORS[0].into(), dashed: false }],
        };
        let svg = figure.render();
        let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let names: Vec<&str> = doc.descendants().filter_map(|n| n.attribute("data-series")).collect();
        assert_eq!(names, ["4 nodes", "ceiling"]);
        assert_eq!(
            doc.descendants().filter(|n| n.has_tag_name("rect") && n.attribute("data-bar").is_some()).count(),
            2
        );
        assert!(doc.descendants().any(|n| n.text() == Some("pgbench <20 clients>")));
    }
}
