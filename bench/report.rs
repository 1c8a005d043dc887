//! Samples, medians, ratios against pullgate, and the markdown and JSON reports.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// Which way is better for a metric.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One row of the report.
pub struct Metric {
    pub id: &'static str,
    pub workload: &'static str,
    pub title: &'static str,
    pub unit: &'static str,
    pub better: Better,
}

pub const METRICS: &[Metric] = &[
    Metric {
        id: "w1_gbps",
        workload: "W1",
        title: "warm blob, 1 client, 500 MiB",
        unit: "GB/s",
        better: Better::Higher,
    },
    Metric {
        id: "w2_gbps",
        workload: "W2",
        title: "warm blob, 16 clients, 50 MiB (aggregate)",
        unit: "GB/s",
        better: Better::Higher,
    },
    Metric {
        id: "w3_head_rps",
        workload: "W3",
        title: "HEAD manifest by tag, 64 conns",
        unit: "req/s",
        better: Better::Higher,
    },
    Metric {
        id: "w3_head_p99",
        workload: "W3",
        title: "HEAD manifest by tag, p99",
        unit: "ms",
        better: Better::Lower,
    },
    Metric {
        id: "w3_head_cpu",
        workload: "W3",
        title: "HEAD manifest by tag, server CPU per request",
        unit: "µs/req",
        better: Better::Lower,
    },
    Metric {
        id: "w3_head1_rps",
        workload: "W3",
        title: "HEAD manifest by tag, one-type Accept, 64 conns",
        unit: "req/s",
        better: Better::Higher,
    },
    Metric {
        id: "w3_head1_p99",
        workload: "W3",
        title: "HEAD manifest by tag, one-type Accept, p99",
        unit: "ms",
        better: Better::Lower,
    },
    Metric {
        id: "w3_head1_cpu",
        workload: "W3",
        title: "HEAD manifest by tag, one-type Accept, server CPU per request",
        unit: "µs/req",
        better: Better::Lower,
    },
    Metric {
        id: "w3_mget_rps",
        workload: "W3",
        title: "GET manifest by tag, 64 conns (wrk)",
        unit: "req/s",
        better: Better::Higher,
    },
    Metric {
        id: "w3_mget_p99",
        workload: "W3",
        title: "GET manifest by tag, p99 (wrk)",
        unit: "ms",
        better: Better::Lower,
    },
    Metric {
        id: "w3_mget_cpu",
        workload: "W3",
        title: "GET manifest by tag, server CPU per request (wrk)",
        unit: "µs/req",
        better: Better::Lower,
    },
    Metric {
        id: "w3_get_rps",
        workload: "W3",
        title: "GET small blob, 64 conns (wrk)",
        unit: "req/s",
        better: Better::Higher,
    },
    Metric {
        id: "w3_get_p99",
        workload: "W3",
        title: "GET small blob, p99 (wrk)",
        unit: "ms",
        better: Better::Lower,
    },
    Metric {
        id: "w3_get_cpu",
        workload: "W3",
        title: "GET small blob, server CPU per request (wrk)",
        unit: "µs/req",
        better: Better::Lower,
    },
    Metric {
        id: "w4_secs",
        workload: "W4",
        title: "cold pull, 500 MiB",
        unit: "s",
        better: Better::Lower,
    },
    Metric {
        id: "w4_ratio",
        workload: "W4",
        title: "cold pull ÷ direct pull from upstream",
        unit: "×",
        better: Better::Lower,
    },
    Metric {
        id: "w4_side_by_side",
        workload: "W4",
        title: "encrypted ÷ plaintext cold pull, side by side (2 + 2 pulls)",
        unit: "×",
        better: Better::Lower,
    },
    Metric {
        id: "w5_upstream",
        workload: "W5",
        title: "20 clients, cold 50 MiB: upstream bytes ÷ blob size",
        unit: "×",
        better: Better::Lower,
    },
    Metric {
        id: "w5_slowest",
        workload: "W5",
        title: "20 clients, cold 50 MiB: slowest client",
        unit: "s",
        better: Better::Lower,
    },
    Metric {
        id: "w6_rss_w2",
        workload: "W6",
        title: "peak RSS during W2",
        unit: "MiB",
        better: Better::Lower,
    },
    Metric {
        id: "w6_rss_w4",
        workload: "W6",
        title: "peak RSS during W4",
        unit: "MiB",
        better: Better::Lower,
    },
    Metric {
        id: "w7_p99_idle",
        workload: "W7",
        title: "GET small blob p99, no warm job (pullgate)",
        unit: "ms",
        better: Better::Lower,
    },
    Metric {
        id: "w7_p99_warm",
        workload: "W7",
        title: "GET small blob p99 while a warm job fills 500 MiB (warm_bandwidth 20MiB/s)",
        unit: "ms",
        better: Better::Lower,
    },
    Metric {
        id: "w7_p99_ratio",
        workload: "W7",
        title: "p99 with a warm job ÷ without",
        unit: "×",
        better: Better::Lower,
    },
    Metric {
        id: "w7_overlap",
        workload: "W7",
        title: "share of the load run the warm job was running",
        unit: "×",
        better: Better::Higher,
    },
    Metric {
        id: "x_16x500_gbps",
        workload: "W2+",
        title: "warm blob, 16 clients, 500 MiB (aggregate)",
        unit: "GB/s",
        better: Better::Higher,
    },
    Metric {
        id: "x_rss_16x500",
        workload: "W6+",
        title: "peak RSS, 16 clients × 500 MiB warm",
        unit: "MiB",
        better: Better::Lower,
    },
    Metric {
        id: "kms_per_1000",
        workload: "CMK",
        title: "key provider calls per 1,000 warm pulls (encrypted cache)",
        unit: "calls",
        better: Better::Lower,
    },
];

/// Columns, in order: (id, heading).
pub const CONTESTANTS: &[(&str, &str)] = &[
    ("pullgate", "pullgate"),
    ("pullgate-signed", "pullgate, signature policy on (W3)"),
    ("pullgate-enc", "pullgate, cache encrypted"),
    (
        "pullgate-cluster",
        "pullgate, 3 replicas (cluster + object store; W5, W2)",
    ),
    ("distribution", "distribution 2.8 proxy"),
    ("nginx-cache", "nginx proxy_cache"),
    ("nginx-static", "limit: nginx static file"),
    ("pingora-static", "limit: Pingora, answer from memory (W3)"),
    ("page-cache", "limit: page-cache read (dd)"),
    ("loopback", "limit: loopback TCP"),
    ("direct", "upstream direct (TLS)"),
];

/// Every sample taken, and what went wrong.
#[derive(Default)]
pub struct Results {
    samples: BTreeMap<(String, String), Vec<f64>>,
    pub failures: Vec<String>,
}

/// Median and range of a sample list.
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stats(v: &[f64]) -> Option<Stats> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some(Stats {
        median,
        min: s[0],
        max: s[n - 1],
        n,
    })
}

impl Results {
    pub fn add(&mut self, metric: &str, contestant: &str, value: f64) {
        debug_assert!(
            METRICS.iter().any(|m| m.id == metric),
            "unknown metric {metric}"
        );
        if value.is_finite() {
            self.samples
                .entry((metric.to_string(), contestant.to_string()))
                .or_default()
                .push(value);
        }
    }

    /// Adds every sample and failure of `other`.
    pub fn merge(&mut self, other: Results) {
        for (k, v) in other.samples {
            self.samples.entry(k).or_default().extend(v);
        }
        self.failures.extend(other.failures);
    }

    pub fn fail(&mut self, what: String) {
        eprintln!("  !! {what}");
        self.failures.push(what);
    }

    pub fn get(&self, metric: &str, contestant: &str) -> Option<Stats> {
        self.samples
            .get(&(metric.to_string(), contestant.to_string()))
            .and_then(|v| stats(v))
    }

    fn samples(&self, metric: &str, contestant: &str) -> Vec<f64> {
        self.samples
            .get(&(metric.to_string(), contestant.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// Contestant median ÷ pullgate median.
    pub fn ratio(&self, metric: &str, contestant: &str) -> Option<f64> {
        let p = self.get(metric, "pullgate")?.median;
        let c = self.get(metric, contestant)?.median;
        (p != 0.0).then_some(c / p)
    }

    fn used_contestants(&self) -> Vec<(&'static str, &'static str)> {
        CONTESTANTS
            .iter()
            .copied()
            .filter(|(id, _)| self.samples.keys().any(|(_, c)| c == id))
            .collect()
    }

    /// The markdown table: one row per metric, `median (min–max)` per contestant and, for the
    /// others, their median as a multiple of pullgate's.
    pub fn table(&self) -> String {
        let cols = self.used_contestants();
        let mut out = String::from("| workload | metric |");
        for (_, h) in &cols {
            out += &format!(" {h} |");
        }
        out += "\n|---|---|";
        for _ in &cols {
            out += "---|";
        }
        out += "\n";
        for m in METRICS {
            if !cols.iter().any(|(c, _)| self.get(m.id, c).is_some()) {
                continue;
            }
            let arrow = if m.better == Better::Higher {
                "↑"
            } else {
                "↓"
            };
            out += &format!("| {} | {} ({}, {arrow}) |", m.workload, m.title, m.unit);
            for (c, _) in &cols {
                let cell = match self.get(m.id, c) {
                    None => "–".to_string(),
                    Some(s) => {
                        let mut cell =
                            format!("**{}** ({}–{})", fmt(s.median), fmt(s.min), fmt(s.max));
                        if *c != "pullgate" {
                            if let Some(r) = self.ratio(m.id, c) {
                                cell += &format!(" · {}× pg", fmt(r));
                            }
                        }
                        cell
                    }
                };
                out += &format!(" {cell} |");
            }
            out += "\n";
        }
        out
    }

    /// Targets of issues 3 and 9, each with its verdict.
    pub fn targets(&self) -> Vec<(String, Option<bool>, String)> {
        let med = |m: &str, c: &str| self.get(m, c).map(|s| s.median);
        let mut out = Vec::new();
        let mut check =
            |name: String, ok: Option<bool>, detail: String| out.push((name, ok, detail));
        let w4 = med("w4_ratio", "pullgate");
        check(
            "W4 cold-pull ratio ≤ 1.05".into(),
            w4.map(|r| r <= 1.05),
            w4.map(fmt).unwrap_or_default(),
        );
        for (c, what) in [("pullgate", ""), ("pullgate-cluster", " across 3 replicas")] {
            let w5 = self.samples("w5_upstream", c);
            if w5.is_empty() && c != "pullgate" {
                continue;
            }
            check(
                format!("W5 upstream bytes ratio = 1.0{what} (every run)"),
                (!w5.is_empty()).then(|| w5.iter().all(|r| (r - 1.0).abs() < 1e-6)),
                w5.iter().map(|r| fmt(*r)).collect::<Vec<_>>().join(", "),
            );
        }
        // Issue 16: the cluster's slowest cold client within 1.5× a single replica's, and
        // every replica's peak RSS under 64 MiB.
        if let (Some(c), Some(p)) = (
            med("w5_slowest", "pullgate-cluster"),
            med("w5_slowest", "pullgate"),
        ) {
            check(
                "W5 slowest client across 3 replicas ≤ 1.5 × one replica's".into(),
                Some(c <= 1.5 * p),
                format!("{} s vs {} s ({}×)", fmt(c), fmt(p), fmt(c / p)),
            );
        }
        if let Some(s) = self.get("w6_rss_w2", "pullgate-cluster") {
            check(
                "cluster W2 peak RSS per replica < 64 MiB (max of runs)".into(),
                Some(s.max < 64.0),
                fmt(s.max),
            );
        }
        // Issue 19: a warm tag with a signature policy costs at most 10 % of HEAD throughput.
        for m in ["w3_head_rps", "w3_head1_rps"] {
            if let (Some(p), Some(s)) = (med(m, "pullgate"), med(m, "pullgate-signed")) {
                check(
                    format!("{m}: signature policy on within 10 % of off"),
                    Some(s >= 0.9 * p),
                    format!("{} vs {} req/s ({}×)", fmt(s), fmt(p), fmt(s / p)),
                );
            }
        }
        let w7 = med("w7_p99_ratio", "pullgate");
        if w7.is_some() {
            check(
                "W7 clients' p99 moves ≤ 10 % while a capped warm job runs (issue 18)".into(),
                w7.map(|r| r <= 1.10),
                w7.map(fmt).unwrap_or_default(),
            );
        }
        // Issue 15: the encrypted cache against the plaintext one, same run.
        for (m, want, cmp) in [
            ("w1_gbps", 0.8, "≥"),
            ("w2_gbps", 0.8, "≥"),
            ("w4_secs", 1.1, "≤"),
        ] {
            if let (Some(e), Some(p)) = (med(m, "pullgate-enc"), med(m, "pullgate")) {
                let ratio = e / p;
                let ok = if cmp == "≥" {
                    ratio >= want
                } else {
                    ratio <= want
                };
                check(
                    format!("{m} encrypted ÷ plaintext {cmp} {want}"),
                    Some(ok),
                    fmt(ratio),
                );
            }
        }
        if let Some(r) = med("w4_side_by_side", "pullgate-enc") {
            check(
                "W4 encrypted ÷ plaintext ≤ 1.1, side by side".into(),
                Some(r <= 1.1),
                fmt(r),
            );
        }
        if let Some(s) = self.get("w6_rss_w2", "pullgate-enc") {
            check(
                "encrypted W2 peak RSS < 64 MiB (max of runs)".into(),
                Some(s.max < 64.0),
                fmt(s.max),
            );
        }
        if let Some(k) = med("kms_per_1000", "pullgate-enc") {
            check(
                "key provider calls per 1,000 warm pulls = 0".into(),
                Some(k == 0.0),
                fmt(k),
            );
        }
        for m in ["w6_rss_w2", "w6_rss_w4", "x_rss_16x500"] {
            if let Some(s) = self.get(m, "pullgate") {
                check(
                    format!("{m} peak RSS < 64 MiB (max of runs)"),
                    Some(s.max < 64.0),
                    fmt(s.max),
                );
            }
        }
        for m in [
            "w1_gbps",
            "w2_gbps",
            "w3_head_rps",
            "w3_head_p99",
            "w3_head1_rps",
            "w3_head1_p99",
            "w3_mget_rps",
            "w3_mget_p99",
            "w3_get_rps",
            "w3_get_p99",
            "w3_head_cpu",
            "w3_head1_cpu",
            "w3_mget_cpu",
            "w3_get_cpu",
        ] {
            let def = METRICS.iter().find(|d| d.id == m).expect("metric");
            for (c, verb) in [
                ("distribution", "ahead of"),
                ("nginx-cache", "on par with (≥ 0.95×)"),
            ] {
                let (Some(p), Some(o)) = (med(m, "pullgate"), med(m, c)) else {
                    continue;
                };
                // Normalised so that > 1 means pullgate is better.
                let adv = if def.better == Better::Higher {
                    p / o
                } else {
                    o / p
                };
                let need = if c == "distribution" { 1.0 } else { 0.95 };
                check(
                    format!("{m}: pullgate {verb} {c}"),
                    Some(adv >= need),
                    format!(
                        "pullgate {} vs {} {} ({}× advantage)",
                        fmt(p),
                        fmt(o),
                        def.unit,
                        fmt(adv)
                    ),
                );
            }
        }
        out
    }

    pub fn targets_markdown(&self) -> String {
        let mut out = String::from("| target | met | value |\n|---|---|---|\n");
        for (name, ok, detail) in self.targets() {
            let v = match ok {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "n/a",
            };
            out += &format!("| {name} | {v} | {detail} |\n");
        }
        out
    }

    pub fn json(&self, meta: Value) -> Value {
        let mut metrics = Vec::new();
        for m in METRICS {
            let mut per = serde_json::Map::new();
            for (c, _) in CONTESTANTS {
                let samples = self.samples(m.id, c);
                if let Some(s) = stats(&samples) {
                    per.insert(
                        c.to_string(),
                        json!({
                            "samples": samples, "median": s.median, "min": s.min, "max": s.max,
                            "n": s.n, "ratio_vs_pullgate": self.ratio(m.id, c),
                        }),
                    );
                }
            }
            if !per.is_empty() {
                metrics.push(json!({
                    "id": m.id, "workload": m.workload, "title": m.title, "unit": m.unit,
                    "better": if m.better == Better::Higher { "higher" } else { "lower" },
                    "results": per,
                }));
            }
        }
        let targets: Vec<Value> = self
            .targets()
            .into_iter()
            .map(|(name, ok, detail)| json!({"target": name, "met": ok, "value": detail}))
            .collect();
        json!({
            "meta": meta,
            "metrics": metrics,
            "targets": targets,
            "failures": self.failures,
        })
    }
}

/// Three significant digits, no exponent.
pub fn fmt(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let s = stats(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(stats(&[1.0, 4.0]).unwrap().median, 2.5);
        assert!(stats(&[]).is_none());
    }

    #[test]
    fn ratios_are_against_pullgate() {
        let mut r = Results::default();
        r.add("w1_gbps", "pullgate", 2.0);
        r.add("w1_gbps", "nginx-cache", 3.0);
        assert_eq!(r.ratio("w1_gbps", "nginx-cache"), Some(1.5));
        assert!(r.table().contains("1.50× pg"));
    }
}
