//! Errors of the agent crate.

use std::path::PathBuf;

use portico_proto::api::ApiError;

/// A key, certificate or CSR could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("key generation or signing failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("no {what} found in PEM input")]
    NoPem { what: &'static str },
    #[error("invalid PEM {what}: {reason}")]
    BadPem { what: &'static str, reason: String },
    #[error("certificate cannot be parsed: {reason}")]
    BadCertificate { reason: String },
    #[error("certificate names no Portico identity (urn:portico:… URI SANs)")]
    NoIdentity,
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client verifier setup failed: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state file {path} holds unusable credentials: {source}")]
    BadCredentials {
        path: PathBuf,
        #[source]
        source: PkiError,
    },
}

/// A call to the router failed. Retry and error handling look at the
/// variant and status, never at the text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("invalid router URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("TLS setup for the router failed: {0}")]
    Pki(#[from] PkiError),
    #[error("cannot reach the router at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("the router at {url} did not answer within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("the router refused {path} ({status}): {error}")]
    Api {
        path: String,
        status: u16,
        error: ApiError,
    },
    #[error("unexpected answer to {path} ({status}): {body}")]
    Http {
        path: String,
        status: u16,
        body: String,
    },
    #[error("answer to {path} is not the expected JSON: {source}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The HTTP status of a refusal, if the router answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } | ClientError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The router's error body, if it sent one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            ClientError::Api { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The caller's certificate was revoked (its connector or edge deleted).
    pub fn is_revoked(&self) -> bool {
        self.status() == Some(403) && self.api_error().is_some_and(|e| e.error == "revoked")
    }

    /// The credentials were missing or wrong.
    pub fn is_unauthorized(&self) -> bool {
        self.status() == Some(401)
    }

    /// A transient failure worth retrying: no answer, or a 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Timeout { .. } => true,
            other => other.status().is_some_and(|s| s >= 500),
        }
    }
}

/// Enrollment could not produce credentials.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    #[error(transparent)]
    MalformedToken(#[from] portico_proto::api::MalformedToken),
    #[error(
        "no credentials in {state_dir} and no join token given: create one with `portico token create --group <group>` (or `--edge`) and pass it with --token"
    )]
    NoCredentials { state_dir: PathBuf },
    #[error("the router refused the join token: {message}")]
    TokenRefused { message: String },
    #[error("this {what} was deleted on the router (its certificate is revoked); enroll it again with a new join token")]
    Revoked { what: &'static str },
    #[error(
        "the certificate in {state_dir} expired at {expired}; enroll again with a new join token"
    )]
    Expired { state_dir: PathBuf, expired: String },
    #[error("the router's CA does not match the fingerprint in the join token (expected {expected}, got {got})")]
    CaMismatch { expected: String, got: String },
    #[error(transparent)]
    Router(#[from] ClientError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Pki(#[from] PkiError),
}
