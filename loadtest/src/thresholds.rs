//! Pass/fail criteria of a run, as k6 has them: latency percentiles at
//! most, an error rate at most, a rate of good responses at least. They are
//! checked against the finished [`Report`], listed in it (text and JSON),
//! and a run that breaks one ends `portico loadtest` with exit status 99
//! after its reports are written, so a CI job fails on a slow build.
//!
//! In a scenario file:
//!
//! ```toml
//! [thresholds]
//! p99 = "50ms"       # corrected latency (from the intended send time)
//! error_rate = 0.01  # errors ÷ completed requests
//! min_ok_rps = 500   # responses below 400 per second
//! ```
//!
//! On the command line: `--threshold p99=50ms` (repeatable; overrides the
//! file's value of the same name).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ScenarioError;
use crate::report::Report;

/// The exit status of `portico loadtest` when a threshold failed (k6's).
pub const THRESHOLDS_FAILED_EXIT: u8 = 99;

/// The criteria. Every field is optional; none set checks nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Corrected latency p50 at most this.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub p50: Option<Duration>,
    /// Corrected latency p90 at most this.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub p90: Option<Duration>,
    /// Corrected latency p99 at most this.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub p99: Option<Duration>,
    /// Corrected latency p99.9 at most this.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub p999: Option<Duration>,
    /// The slowest request at most this.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max: Option<Duration>,
    /// Errors (status 400 and up, transport errors, timeouts) divided by
    /// completed requests, at most this (0 to 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// Good responses (status below 400) per second, at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ok_rps: Option<f64>,
}

/// One criterion and how the run did against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThresholdResult {
    /// `p99`, `error_rate`, ...
    pub name: String,
    /// The bound, as written in reports: `<= 50ms`, `>= 500/s`.
    pub limit: String,
    /// What the run measured, in the same unit.
    pub measured: String,
    pub passed: bool,
}

/// A run broke some of its thresholds; its reports are written. The
/// `portico` binary exits with [`THRESHOLDS_FAILED_EXIT`] on this error.
#[derive(Debug, thiserror::Error)]
#[error("{} of {} thresholds failed: {}", .failed.len(), .checked, .failed.iter().map(|t| format!("{} {} (measured {})", t.name, t.limit, t.measured)).collect::<Vec<_>>().join("; "))]
pub struct ThresholdsFailed {
    pub failed: Vec<ThresholdResult>,
    pub checked: usize,
}

impl ThresholdsFailed {
    /// `Err` when any of `results` failed.
    pub fn check(results: &[ThresholdResult]) -> Result<(), ThresholdsFailed> {
        let failed: Vec<_> = results.iter().filter(|t| !t.passed).cloned().collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(ThresholdsFailed {
                failed,
                checked: results.len(),
            })
        }
    }
}

/// The names `--threshold NAME=VALUE` accepts.
const NAMES: &str = "p50, p90, p99, p999, max, error_rate, min_ok_rps";

impl Thresholds {
    pub fn is_empty(&self) -> bool {
        *self == Thresholds::default()
    }

    /// Sets one criterion from `NAME=VALUE` (`p99=50ms`, `error_rate=0.01`).
    pub fn set(&mut self, spec: &str) -> Result<(), ScenarioError> {
        let field = || format!("--threshold {spec}");
        let (name, value) = spec.split_once('=').ok_or_else(|| {
            ScenarioError::invalid(
                field(),
                format!("expected NAME=VALUE, with NAME one of {NAMES}"),
            )
        })?;
        let (name, value) = (name.trim(), value.trim());
        let duration = || {
            humantime::parse_duration(value).map(Some).map_err(|e| {
                ScenarioError::invalid(
                    field(),
                    format!("{value:?} is not a duration ({e}), e.g. 50ms"),
                )
            })
        };
        let number = || {
            value
                .parse::<f64>()
                .map(Some)
                .map_err(|_| ScenarioError::invalid(field(), format!("{value:?} is not a number")))
        };
        // Set on a copy: a bad value leaves `self` as it was.
        let mut next = self.clone();
        match name {
            "p50" => next.p50 = duration()?,
            "p90" => next.p90 = duration()?,
            "p99" => next.p99 = duration()?,
            "p999" => next.p999 = duration()?,
            "max" => next.max = duration()?,
            "error_rate" => next.error_rate = number()?,
            "min_ok_rps" => next.min_ok_rps = number()?,
            other => {
                return Err(ScenarioError::invalid(
                    field(),
                    format!("unknown threshold `{other}`; known: {NAMES}"),
                ))
            }
        }
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// Checks the numbers: a rate within 0..=1, a positive finite rps.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        if let Some(r) = self.error_rate {
            if !(0.0..=1.0).contains(&r) {
                return Err(ScenarioError::invalid(
                    "thresholds.error_rate",
                    format!("{r} is not within 0..=1 (a fraction of completed requests)"),
                ));
            }
        }
        if let Some(r) = self.min_ok_rps {
            if !r.is_finite() || r < 0.0 {
                return Err(ScenarioError::invalid(
                    "thresholds.min_ok_rps",
                    format!("{r} is not a rate of zero or more"),
                ));
            }
        }
        Ok(())
    }

    /// Copies every criterion `other` sets over this one's.
    pub fn override_with(&mut self, other: &Thresholds) {
        let Thresholds {
            p50,
            p90,
            p99,
            p999,
            max,
            error_rate,
            min_ok_rps,
        } = other;
        self.p50 = p50.or(self.p50);
        self.p90 = p90.or(self.p90);
        self.p99 = p99.or(self.p99);
        self.p999 = p999.or(self.p999);
        self.max = max.or(self.max);
        self.error_rate = error_rate.or(self.error_rate);
        self.min_ok_rps = min_ok_rps.or(self.min_ok_rps);
    }

    /// How the run did against each criterion set, in a fixed order.
    pub fn evaluate(&self, report: &Report) -> Vec<ThresholdResult> {
        let mut out = Vec::new();
        let ms = |us: u64| format!("{:.2}ms", us as f64 / 1000.0);
        let latency = &report.latency_us;
        for (name, limit, measured_us) in [
            ("p50", self.p50, latency.p50),
            ("p90", self.p90, latency.p90),
            ("p99", self.p99, latency.p99),
            ("p999", self.p999, latency.p999),
            ("max", self.max, latency.max),
        ] {
            if let Some(limit) = limit {
                let limit_us = u64::try_from(limit.as_micros()).unwrap_or(u64::MAX);
                out.push(ThresholdResult {
                    name: name.to_owned(),
                    limit: format!("<= {}", ms(limit_us)),
                    measured: ms(measured_us),
                    // No request completed: nothing shows the bound was kept.
                    passed: latency.count > 0 && measured_us <= limit_us,
                });
            }
        }
        if let Some(limit) = self.error_rate {
            let r = &report.requests;
            let rate = if r.completed == 0 {
                1.0
            } else {
                r.errors as f64 / r.completed as f64
            };
            out.push(ThresholdResult {
                name: "error_rate".to_owned(),
                limit: format!("<= {limit}"),
                measured: format!("{rate:.4}"),
                passed: r.completed > 0 && rate <= limit,
            });
        }
        if let Some(limit) = self.min_ok_rps {
            out.push(ThresholdResult {
                name: "min_ok_rps".to_owned(),
                limit: format!(">= {limit}/s"),
                measured: format!("{:.1}/s", report.ok_rps),
                passed: report.ok_rps >= limit,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Counts, Percentiles};

    fn report(p99_us: u64, completed: u64, errors: u64, ok_rps: f64) -> Report {
        let mut r = Report::from_json(
            r#"{"schema":1,"name":null,"mode":"open","protocol":"h1","connections":1,
            "new_connection_per_request":false,"started_unix_ms":0,"elapsed_ms":1000,
            "interrupted":false,"requests":{"scheduled":0,"completed":0,"ok":0,"errors":0,"cancelled":0},
            "throughput_rps":0,"ok_rps":0,"bytes_sent":0,"bytes_received":0,
            "latency_us":{"count":0,"min":0,"mean":0,"p50":0,"p90":0,"p99":0,"p999":0,"max":0},
            "service_time_us":{"count":0,"min":0,"mean":0,"p50":0,"p90":0,"p99":0,"p999":0,"max":0},
            "status":{},"portico_errors":{},"transport_errors":{},"timeline":[],"chaos":[]}"#,
        )
        .expect("a report without thresholds still parses");
        r.requests = Counts {
            scheduled: completed,
            completed,
            ok: completed - errors,
            errors,
            cancelled: 0,
            ..Counts::default()
        };
        r.latency_us = Percentiles {
            count: completed,
            p50: p99_us / 2,
            p99: p99_us,
            max: p99_us * 2,
            ..Percentiles::default()
        };
        r.ok_rps = ok_rps;
        r
    }

    #[test]
    fn each_bound_passes_at_its_limit_and_fails_beyond() {
        let mut t = Thresholds::default();
        for spec in ["p99=50ms", "error_rate=0.1", "min_ok_rps=100"] {
            t.set(spec).unwrap();
        }
        let passed = |r: &Report| t.evaluate(r).iter().map(|x| x.passed).collect::<Vec<_>>();
        assert_eq!(passed(&report(50_000, 100, 10, 100.0)), [true, true, true]);
        assert_eq!(
            passed(&report(50_001, 100, 11, 99.9)),
            [false, false, false]
        );
        let results = t.evaluate(&report(80_000, 100, 0, 500.0));
        assert_eq!(results[0].name, "p99");
        assert_eq!(results[0].limit, "<= 50.00ms");
        assert_eq!(results[0].measured, "80.00ms");
    }

    /// A run where nothing completed proves no latency or error bound.
    #[test]
    fn an_empty_run_fails_its_bounds() {
        let mut t = Thresholds::default();
        t.set("p99=1s").unwrap();
        t.set("error_rate=1").unwrap();
        assert!(t.evaluate(&report(0, 0, 0, 0.0)).iter().all(|r| !r.passed));
    }

    #[test]
    fn bad_specs_get_clear_errors() {
        let mut t = Thresholds::default();
        for (spec, needle) in [
            ("p99", "NAME=VALUE"),
            ("p98=1ms", "unknown threshold `p98`"),
            ("p99=fast", "not a duration"),
            ("error_rate=2", "not within 0..=1"),
            ("min_ok_rps=-1", "zero or more"),
            ("min_ok_rps=NaN", "zero or more"),
        ] {
            let e = t.set(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
        assert!(t.is_empty(), "refused values are not kept: {t:?}");
    }

    #[test]
    fn command_line_values_override_the_files() {
        let mut file: Thresholds =
            toml::from_str("p99 = \"50ms\"\nerror_rate = 0.01").expect("valid TOML");
        let mut cli = Thresholds::default();
        cli.set("p99=20ms").unwrap();
        file.override_with(&cli);
        assert_eq!(file.p99, Some(Duration::from_millis(20)));
        assert_eq!(file.error_rate, Some(0.01));
        assert!(
            toml::from_str::<Thresholds>("p98 = \"1ms\"").is_err(),
            "unknown names are refused"
        );
    }
}
