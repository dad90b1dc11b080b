//! Latency histograms, error tallies and process figures read from /proc.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// A latency histogram in microseconds (1 µs – 120 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("constant histogram bounds are valid")
}

/// p50/p90/p99/p99.9 in milliseconds.
pub fn percentiles(h: &Histogram<u64>) -> Value {
    let q = |p: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(p) as f64 / 1000.0
        }
    };
    json!({"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": h.max() as f64 / 1000.0, "count": h.len()})
}

/// Errors by kind (`http_429`, `http_500`, `io`, …).
#[derive(Default, Debug, Clone)]
pub struct Errors(pub BTreeMap<String, u64>);

impl Errors {
    /// Counts one error.
    pub fn add(&mut self, kind: impl Into<String>) {
        *self.0.entry(kind.into()).or_default() += 1;
    }

    /// Merges another tally.
    pub fn merge(&mut self, other: &Errors) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    /// As JSON.
    pub fn json(&self) -> Value {
        json!(self.0)
    }
}

/// CPU seconds (user + system) and peak RSS of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// User + system CPU seconds.
    pub cpu_secs: f64,
    /// Peak resident set (VmHWM), bytes.
    pub peak_rss: u64,
}

impl ProcStats {
    /// Both figures summed.
    pub fn plus(&self, other: &ProcStats) -> ProcStats {
        ProcStats {
            cpu_secs: self.cpu_secs + other.cpu_secs,
            peak_rss: self.peak_rss + other.peak_rss,
        }
    }

    /// Figures of `pid` and its direct children, summed (peak RSS too).
    pub fn read_tree(pid: u32) -> ProcStats {
        let mut total = ProcStats::read(pid);
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(child) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                let stat =
                    std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                if ppid == Some(pid) {
                    total = total.plus(&ProcStats::read(child));
                }
            }
        }
        total
    }

    /// Reads the figures of `pid`.
    pub fn read(pid: u32) -> ProcStats {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name, which is in parentheses.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of stat (12 and 13 after the
        // name), in clock ticks: 100 per second on Linux (USER_HZ).
        let cpu_secs = (ticks(11) + ticks(12)) / 100.0;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kb = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        ProcStats {
            cpu_secs,
            peak_rss: kb("VmHWM:"),
        }
    }
}
