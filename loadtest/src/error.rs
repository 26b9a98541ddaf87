//! Errors of the load generator: scenario validation (each names the field
//! at fault), client setup, and chaos actions.

use std::path::PathBuf;

/// A scenario that cannot run. Every variant names the offending field, in
/// TOML path form (`requests[2].url`, `stages[0].rate`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    #[error("cannot read scenario file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid scenario TOML: {source}")]
    Toml {
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("`{field}` is missing: {hint}")]
    Missing { field: String, hint: &'static str },
    #[error("`{field}` is invalid: {reason}")]
    Invalid { field: String, reason: String },
}

impl ScenarioError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ScenarioError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Why a load run could not start or finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadtestError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("cannot read CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("TLS client configuration failed: {source}")]
    Tls {
        #[source]
        source: rustls::Error,
    },
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("cannot set up the HTTP/3 client: {reason}")]
    H3Setup { reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A chaos action that failed; recorded in the report, never fatal to the run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChaosError {
    #[error("this deployment does not support `{action}`")]
    Unsupported { action: String },
    #[error("`{action}` failed: {source}")]
    Failed {
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
