//! The report of a run: the struct that [`crate::run_scenario`] returns and
//! `--json` writes. Its JSON is a stable schema (bump
//! [`REPORT_SCHEMA`] on any breaking change):
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `schema` | int | 1 |
//! | `name` | string? | scenario name |
//! | `mode` | `"open"`/`"closed"` | loop kind |
//! | `protocol` | `"h1"`/`"h2"`/`"h3"` | |
//! | `connections`, `new_connection_per_request` | int, bool | |
//! | `started_unix_ms` | int | wall-clock start |
//! | `elapsed_ms` | int | start to the last completion |
//! | `interrupted` | bool | stopped early by shutdown |
//! | `requests` | object | `scheduled` (intended sends), `completed` (got a response or a transport error), `ok` (status < 400), `errors` (the rest), `cancelled` (dropped at shutdown), `retried` (sent again on a new connection after a reused one failed them unanswered: an HTTP/1.1 keep-alive connection the server had closed, an HTTP/2 stream refused by GOAWAY; each request still counts once above), `failovers` (connections opened at the next `connect_to` address after one failed) |
//! | `throughput_rps`, `ok_rps` | float | completed (ok) per second of `elapsed_ms` |
//! | `bytes_sent`, `bytes_received` | int | bodies only |
//! | `latency_us` | percentiles | from each request's **intended** send time (corrected for coordinated omission) |
//! | `service_time_us` | percentiles | from the actual send (uncorrected, for comparison) |
//! | `status` | map code→count | every HTTP status received |
//! | `portico_errors` | map code→count | `x-portico-error` header values |
//! | `transport_errors` | map kind→count | `connect`, `tls`, `handshake`, `request`, `body`, `timeout`, `h3` |
//! | `timeline` | array | one entry per second of completion time: `second`, `completed`, `ok`, `errors`, `p50_us`, `p90_us`, `p99_us`, `max_us`; and `errors_by_start`, the failed requests that were *due* in that second (intended send time), so failures after a chaos action can be told from those in flight at it |
//! | `chaos` | array | `at_ms` (scheduled), `fired_ms` (null if never fired), `action` (text), `spec`, `ok`, `error` |
//! | `by_request` | array | one per entry of the request mix, in order: `method`, `url`, `weight`, `completed`, `ok`, `errors`, `latency_us` (percentiles, 2 significant digits) |
//! | `thresholds` | array | one per criterion the scenario set: `name` (`p99`, `error_rate`, `min_ok_rps`, ...), `limit` (`<= 50.00ms`), `measured`, `passed` |
//!
//! Percentiles are objects `{count, min, mean, p50, p90, p99, p999, max}`
//! in microseconds (`mean` a float); a histogram with no samples has all 0.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::scenario::{ChaosAction, Mode, Protocol};
use crate::thresholds::ThresholdResult;

/// Version of the JSON schema.
pub const REPORT_SCHEMA: u32 = 1;

/// Everything a run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: u32,
    pub name: Option<String>,
    pub mode: Mode,
    pub protocol: Protocol,
    pub connections: usize,
    pub new_connection_per_request: bool,
    pub started_unix_ms: u64,
    pub elapsed_ms: u64,
    pub interrupted: bool,
    pub requests: Counts,
    pub throughput_rps: f64,
    pub ok_rps: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub latency_us: Percentiles,
    pub service_time_us: Percentiles,
    pub status: BTreeMap<u16, u64>,
    pub portico_errors: BTreeMap<String, u64>,
    pub transport_errors: BTreeMap<String, u64>,
    pub timeline: Vec<Second>,
    pub chaos: Vec<ChaosRecord>,
    /// Per entry of the request mix, in the scenario's order.
    #[serde(default)]
    pub by_request: Vec<RequestReport>,
    /// The scenario's thresholds and how the run did (empty when it set
    /// none; absent in reports written before they existed).
    #[serde(default)]
    pub thresholds: Vec<ThresholdResult>,
}

/// One entry of the request mix and how its requests did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestReport {
    pub method: String,
    pub url: String,
    pub weight: u32,
    pub completed: u64,
    pub ok: u64,
    pub errors: u64,
    /// Corrected latency of the requests that got a response; 2
    /// significant digits (the totals above keep 3).
    pub latency_us: Percentiles,
}

/// Request counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub scheduled: u64,
    pub completed: u64,
    pub ok: u64,
    pub errors: u64,
    pub cancelled: u64,
    /// Requests sent again on a new connection after a reused one failed
    /// them before any response byte (each still counted once above).
    #[serde(default)]
    pub retried: u64,
    /// Connections opened at the next `connect_to` address after one
    /// could not be opened.
    #[serde(default)]
    pub failovers: u64,
}

/// Summary of a latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn from_histogram(h: &hdrhistogram::Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            min: h.min(),
            mean: (h.mean() * 1000.0).round() / 1000.0,
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// One second of the run (by completion time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Second {
    pub second: u64,
    pub completed: u64,
    pub ok: u64,
    pub errors: u64,
    /// The failed requests whose intended send time fell in this second.
    #[serde(default)]
    pub errors_by_start: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// A chaos action and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChaosRecord {
    pub at_ms: u64,
    pub fired_ms: Option<u64>,
    pub action: String,
    pub spec: ChaosAction,
    pub ok: bool,
    pub error: Option<String>,
}

impl Report {
    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        // A struct of plain data with string map keys cannot fail to serialise.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parses a report written by [`Report::to_json`].
    pub fn from_json(s: &str) -> Result<Report, serde_json::Error> {
        serde_json::from_str(s)
    }

    /// A short human summary (what the CLI prints).
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let ms = |us: u64| us as f64 / 1000.0;
        let mut s = String::new();
        let r = &self.requests;
        let _ = writeln!(
            s,
            "{} requests in {:.2}s ({} ok, {} errors{}{}{}), {:.1} req/s, {} B sent, {} B received",
            r.completed,
            self.elapsed_ms as f64 / 1000.0,
            r.ok,
            r.errors,
            if r.cancelled > 0 {
                format!(", {} cancelled", r.cancelled)
            } else {
                String::new()
            },
            if r.retried > 0 {
                format!(", {} retried", r.retried)
            } else {
                String::new()
            },
            if r.failovers > 0 {
                format!(", {} failovers", r.failovers)
            } else {
                String::new()
            },
            self.throughput_rps,
            self.bytes_sent,
            self.bytes_received,
        );
        for (label, p) in [
            ("latency (corrected)", &self.latency_us),
            ("service time", &self.service_time_us),
        ] {
            let _ = writeln!(
                s,
                "{label:>20}: p50 {:.2}ms  p90 {:.2}ms  p99 {:.2}ms  p99.9 {:.2}ms  max {:.2}ms",
                ms(p.p50),
                ms(p.p90),
                ms(p.p99),
                ms(p.p999),
                ms(p.max)
            );
        }
        let join = |m: Vec<String>| m.join(", ");
        if !self.status.is_empty() {
            let _ = writeln!(
                s,
                "{:>20}: {}",
                "status",
                join(
                    self.status
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect()
                )
            );
        }
        if !self.portico_errors.is_empty() {
            let _ = writeln!(
                s,
                "{:>20}: {}",
                "portico errors",
                join(
                    self.portico_errors
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect()
                )
            );
        }
        if !self.transport_errors.is_empty() {
            let _ = writeln!(
                s,
                "{:>20}: {}",
                "transport errors",
                join(
                    self.transport_errors
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect()
                )
            );
        }
        // Per entry of the mix, when there is more than one.
        if self.by_request.len() > 1 {
            for r in &self.by_request {
                let _ = writeln!(
                    s,
                    "{:>20}: {} {} (weight {}): {} ok, {} errors, p50 {:.2}ms p99 {:.2}ms",
                    "request",
                    r.method,
                    r.url,
                    r.weight,
                    r.ok,
                    r.errors,
                    ms(r.latency_us.p50),
                    ms(r.latency_us.p99)
                );
            }
        }
        for t in &self.thresholds {
            let _ = writeln!(
                s,
                "{:>20}: {} {}: {} {}",
                "threshold",
                t.name,
                t.limit,
                t.measured,
                if t.passed { "ok" } else { "FAILED" }
            );
        }
        for c in &self.chaos {
            let _ = writeln!(
                s,
                "{:>20}: {} at {}ms: {}",
                "chaos",
                c.action,
                c.fired_ms.unwrap_or(c.at_ms),
                match (&c.error, c.fired_ms) {
                    (_, None) => "not fired".to_owned(),
                    (None, _) => "ok".to_owned(),
                    (Some(e), _) => e.clone(),
                }
            );
        }
        s
    }
}
