//! Portico's load generator, WAN emulator and HTTP/3 client.
//!
//! - The generator ([`run_scenario`], CLI in [`cli`]): open-loop constant
//!   arrival rate with latency measured from each request's intended send
//!   time (wrk2's coordinated-omission correction) or closed-loop workers;
//!   linear ramp stages; HTTP/1.1, HTTP/2 and HTTP/3; keep-alive or
//!   new-connection-per-request; a weighted request mix from a TOML
//!   [`Scenario`]; chaos actions at given times through the [`Chaos`]
//!   trait; HdrHistogram percentiles, errors by status, Portico error code
//!   and transport error; a JSON [`Report`] and an HTML report ([`html`]);
//!   pass/fail [`thresholds`] (exit status 99 when one fails, as k6).
//! - [`wan`]: a UDP relay that adds delay, jitter, loss, reordering,
//!   duplication, a bandwidth cap, MTU clamping and blackholes per path, so
//!   one machine can stand in for three continents (no `tc netem` here).
//! - [`h3`]: Portico's own HTTP/3 client (curl cannot speak HTTP/3 here).
//!
//! It does not start Portico itself: the `portico` binary and the
//! end-to-end tests do that and point the generator at it.

pub mod chaos;
pub mod cli;
pub mod client;
pub mod error;
pub mod h3;
pub mod html;
mod progress;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod schedule;
pub mod stats;
pub mod thresholds;
pub mod wan;

pub use chaos::{Chaos, ChaosFuture};
pub use error::{ChaosError, LoadtestError, ScenarioError};
pub use report::Report;
pub use runner::{run_scenario, run_scenario_with, RunOptions};
pub use scenario::{
    ChaosAction, ChaosVerb, Component, Mode, Protocol, RequestSpec, Scenario, Stage,
};
pub use thresholds::{ThresholdResult, Thresholds, ThresholdsFailed};
