//! The results: a readable table on stdout and the same figures as JSON (`--json FILE`).

use std::path::Path;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};

use crate::proto::Buckets;

/// One run's results.
#[derive(Debug)]
pub struct Report {
    title: String,
    rows: Vec<(String, String)>,
    json: Map<String, Value>,
}

impl Report {
    /// A report for `mode`.
    pub fn new(mode: &str) -> Self {
        let mut json = Map::new();
        json.insert("mode".into(), Value::String(mode.into()));
        json.insert(
            "command".into(),
            Value::String(std::env::args().collect::<Vec<_>>().join(" ")),
        );
        json.insert(
            "unix_time".into(),
            json!(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            ),
        );
        json.insert("machine".into(), machine());
        Report {
            title: format!("remoteler-loadtest {mode}"),
            rows: Vec::new(),
            json,
        }
    }

    /// A table row.
    pub fn row(&mut self, label: &str, value: impl Into<String>) {
        self.rows.push((label.to_owned(), value.into()));
    }

    /// A section heading in the table.
    pub fn section(&mut self, name: &str) {
        self.rows.push((String::new(), String::new()));
        self.rows.push((format!("[{name}]"), String::new()));
    }

    /// Appends another report's table rows.
    pub fn rows_from(&mut self, other: Report) {
        self.rows.extend(other.rows);
    }

    /// A JSON field.
    pub fn set(&mut self, key: &str, value: Value) {
        self.json.insert(key.to_owned(), value);
    }

    /// Prints the table on stdout.
    pub fn print(&self) {
        let width = self
            .rows
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(l, _)| l.len())
            .max()
            .unwrap_or(0);
        println!("{}", self.title);
        println!("{}", "=".repeat(self.title.len()));
        for (label, value) in &self.rows {
            if value.is_empty() {
                println!("{label}");
            } else {
                println!("  {label:<width$}  {value}");
            }
        }
    }

    /// Writes the JSON report.
    pub fn write_json(&self, path: Option<&Path>) -> anyhow::Result<()> {
        let Some(path) = path else { return Ok(()) };
        let text = serde_json::to_string_pretty(&Value::Object(self.json.clone()))?;
        std::fs::write(path, text + "\n").with_context(|| format!("write {}", path.display()))
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    json!({ "cpu": cpu, "cores": cores, "kernel": kernel })
}

/// A histogram (µs) from recorded buckets.
pub fn merge(into: &mut Histogram<u64>, buckets: &Buckets) {
    for &(value, count) in buckets {
        let _ = into.record_n(value, count);
    }
}

/// p50/p99/p99.9/max of a µs histogram, in ms.
pub fn latency(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| v as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": h.mean() / 1000.0,
    })
}

/// One-line form of [`latency`].
pub fn latency_line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  (n={})",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
        h.len()
    )
}

/// Jain's fairness index of `x`: 1 when all equal, 1/n when one takes everything.
pub fn jain(x: &[f64]) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    if squares == 0.0 {
        return 0.0;
    }
    sum * sum / (x.len() as f64 * squares)
}

/// Bytes/s as MiB/s text.
pub fn mibps(bps: f64) -> String {
    let mib = bps / (1024.0 * 1024.0);
    if mib < 10.0 {
        format!("{mib:.3} MiB/s")
    } else {
        format!("{mib:.1} MiB/s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_bounds() {
        assert!((jain(&[1.0, 1.0, 1.0]) - 1.0).abs() < 1e-9);
        assert!((jain(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-9);
    }
}
