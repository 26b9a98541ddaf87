//! Errors of the load generator: scenario validation (each names the field
//! at fault), client setup, and chaos actions.

use std::path::PathBuf;

/// A boxed error from a dependency whose type varies by call site.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A scenario that cannot run. Every variant names the offending field, in
/// TOML path form (`requests[2].url`, `stages[0].rate`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    #[error("cannot read scenario file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid scenario TOML")]
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
    #[error("cannot read CA file {path}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error("no certificates in CA file {path}")]
    CaFileEmpty { path: PathBuf },
    #[error("TLS client configuration failed")]
    Tls {
        #[source]
        source: rustls::Error,
    },
    #[error("cannot resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error("cannot set up the HTTP/3 client")]
    H3Setup {
        #[source]
        source: crate::h3::H3Error,
    },
    #[error("cannot write {path}")]
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
    #[error("`{action}` failed")]
    Failed {
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
