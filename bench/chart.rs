//! An SVG bar chart of W1–W3 (medians as bars, min–max as whiskers), written next to the
//! JSON. SVG rather than PNG: it needs no plotting library and renders on any forge.

use crate::report::{fmt, Results, CONTESTANTS};

const PANELS: &[(&str, &str)] = &[
    ("w1_gbps", "W1 warm 500 MiB, 1 client (GB/s)"),
    ("w2_gbps", "W2 warm 50 MiB, 16 clients (GB/s)"),
    ("w3_head_rps", "W3 HEAD manifest by tag, 64 conns (req/s)"),
    ("w3_get_rps", "W3 GET small blob, 64 conns (req/s)"),
];

const COLORS: &[(&str, &str)] = &[
    ("pullgate", "#1f77b4"),
    ("distribution", "#d62728"),
    ("nginx-cache", "#2ca02c"),
    ("nginx-static", "#9e9e9e"),
    ("pingora-static", "#a9a9a9"),
    ("page-cache", "#bdbdbd"),
    ("loopback", "#d0d0d0"),
];

pub fn svg(results: &Results) -> String {
    let (label_w, bar_w, row_h, width) = (190.0, 470.0, 20.0, 760.0);
    let mut body = String::new();
    let mut y = 10.0;
    for (metric, title) in PANELS {
        let rows: Vec<(&str, crate::report::Stats)> = CONTESTANTS
            .iter()
            .filter_map(|(id, _)| results.get(metric, id).map(|s| (*id, s)))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let max = rows
            .iter()
            .map(|(_, s)| s.max)
            .fold(0.0_f64, f64::max)
            .max(1e-9);
        y += 18.0;
        body += &format!(
            "<text x=\"10\" y=\"{y}\" font-weight=\"bold\">{}</text>\n",
            escape(title)
        );
        y += 8.0;
        for (id, s) in rows {
            let heading = CONTESTANTS
                .iter()
                .find(|(c, _)| *c == id)
                .map(|(_, h)| *h)
                .unwrap_or(id);
            let color = COLORS
                .iter()
                .find(|(c, _)| *c == id)
                .map(|(_, c)| *c)
                .unwrap_or("#888");
            let w = s.median / max * bar_w;
            let (lo, hi) = (label_w + s.min / max * bar_w, label_w + s.max / max * bar_w);
            let mid = y + row_h / 2.0 - 2.0;
            body += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n\
                 <rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1}\" height=\"{}\" fill=\"{color}\"/>\n\
                 <line x1=\"{lo:.1}\" x2=\"{hi:.1}\" y1=\"{mid}\" y2=\"{mid}\" stroke=\"#000\"/>\n\
                 <text x=\"{:.1}\" y=\"{}\">{}</text>\n",
                label_w - 6.0,
                y + row_h - 8.0,
                escape(heading),
                row_h - 4.0,
                hi + 6.0,
                y + row_h - 8.0,
                fmt(s.median),
            );
            y += row_h;
        }
        y += 6.0;
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n{body}<text x=\"10\" y=\"{}\" fill=\"#555\">bars: median; lines: min–max; longer is better</text>\n</svg>\n",
        y + 24.0,
        y + 14.0
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
