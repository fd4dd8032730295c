//! The marks inside a chart's axes: polylines with point markers and value labels (dashed for a
//! reference line, labelled at its right end clear of the data), and labelled bars.

use std::fmt::Write as _;

use super::svg::{esc, si, Series};

/// The plotting area in pixels: x0..x1 left to right, y0 (bottom) to y1 (top).
pub struct Area {
    pub x0: f64,
    pub x1: f64,
    pub y0: f64,
    pub y1: f64,
}

impl Area {
    pub fn y(&self, v: f64, max: f64) -> f64 {
        self.y0 - (v / max) * (self.y0 - self.y1)
    }
}

pub fn lines(svg: &mut String, plot: &Area, series: &[Series], x_ticks: &[f64], y_max: f64) {
    let x_max = x_ticks.iter().copied().fold(0.0, f64::max).max(1.0) * 1.08;
    // 16 px between the y axis and x = 0, so the labels of points at small x clear the axis.
    let x = |v: f64| plot.x0 + 16.0 + v / x_max * (plot.x1 - plot.x0 - 16.0);
    // The values at the right end of the solid series, which a dashed line's end label must clear.
    let right_ends: Vec<f64> =
        series.iter().filter(|s| !s.dashed).filter_map(|s| s.points.last().map(|p| p.1)).collect();
    for &t in x_ticks {
        let _ = writeln!(
            svg,
            "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"#333\"/>",
            x(t),
            plot.y0,
            plot.y0 + 5.0
        );
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x(t),
            plot.y0 + 18.0,
            si(t, 1.0)
        );
    }
    for s in series {
        let points: Vec<String> =
            s.points.iter().map(|&(px, py)| format!("{:.1},{:.1}", x(px), plot.y(py, y_max))).collect();
        let dash = if s.dashed { " stroke-dasharray=\"6 4\"" } else { "" };
        let _ = writeln!(
            svg,
            "<polyline data-series=\"{}\" points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2.5\"{dash}/>",
            esc(&s.name),
            points.join(" "),
            s.color
        );
        if !s.dashed {
            for &(px, py) in &s.points {
                let (cx, cy) = (x(px), plot.y(py, y_max));
                let _ =
                    writeln!(svg, "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"3.5\" fill=\"{}\"/>", s.color);
                let _ = writeln!(svg, "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\" fill=\"{}\">{}</text>", cy - 8.0, s.color, si(py, py / 100.0));
            }
        }
        if let (Some(label), Some(&(px, py))) = (&s.end_label, s.points.last()) {
            // Above the line, unless a solid series ends just above it there and there is room below.
            let line_y = plot.y(py, y_max);
            let crowded =
                right_ends.iter().any(|&v| (line_y - 24.0..=line_y + 2.0).contains(&plot.y(v, y_max)));
            let y = if crowded && line_y + 16.0 < plot.y0 { line_y + 13.0 } else { line_y - 5.0 };
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{y:.1}\" text-anchor=\"end\" font-size=\"10\" fill=\"{}\">{}</text>",
                x(px),
                s.color,
                esc(label)
            );
        }
    }
}

pub fn bars(svg: &mut String, plot: &Area, labels: &[String], values: &[f64], color: &str, y_max: f64) {
    let slot = (plot.x1 - plot.x0) / labels.len().max(1) as f64;
    for (i, (label, &value)) in labels.iter().zip(values).enumerate() {
        let (left, top) = (plot.x0 + slot * i as f64 + slot * 0.2, plot.y(value, y_max));
        let centre = left + slot * 0.3;
        let _ = writeln!(
            svg,
            "<rect data-bar=\"{}\" x=\"{left:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"/>",
            esc(label),
            slot * 0.6,
            plot.y0 - top
        );
        let _ = writeln!(
            svg,
            "<text x=\"{centre:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>",
            top - 4.0,
            si(value, value / 100.0)
        );
        let _ = writeln!(
            svg,
            "<text x=\"{centre:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            plot.y0 + 18.0,
            esc(label)
        );
    }
}
