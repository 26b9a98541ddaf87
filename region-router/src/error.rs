//! Errors of the router crate: starting and stopping it ([`Error`]) and its
//! store ([`StoreError`]). Errors answered over the API are
//! [`portico_proto::api::ApiError`] bodies, built in `api.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The router could not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid router config: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{} exists but {} does not; restore it or remove both to create a new CA", present.display(), missing.display())]
    CaIncomplete { present: PathBuf, missing: PathBuf },
    #[error("certificate authority: {what}: {source}")]
    Ca {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("admin token in {} is malformed (expected 64 hex digits)", path.display())]
    BadAdminToken { path: PathBuf },
    #[error(
        "{} has mode {mode:04o}, open to group or others; the router keeps its CA key and admin token private and will not start: run `chmod {fix:o} {}` (if others could read ca.key, treat the CA as exposed)",
        path.display(),
        path.display()
    )]
    InsecurePermissions { path: PathBuf, mode: u32, fix: u32 },
    #[error("TLS setup failed: {reason}")]
    Tls { reason: String },
    #[error("metrics setup failed: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("random number generator failed")]
    Random,
    #[error("tasks did not finish within the {grace:?} shutdown grace period")]
    DrainTimeout { grace: Duration },
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{kind} {id:?} already exists")]
    AlreadyExists { kind: &'static str, id: String },
    #[error("external host {host:?} is already used by app {app:?}")]
    HostTaken { host: String, app: String },
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("group {group:?} is not empty: {connectors} connector(s) and {apps} app(s) use it")]
    GroupNotEmpty {
        group: String,
        connectors: u64,
        apps: u64,
    },
    #[error("group {group:?} cannot be deleted: it always exists")]
    DefaultGroup { group: String },
    #[error("join token already used")]
    TokenUsed,
    #[error("join token revoked")]
    TokenRevoked,
    #[error("stored {what} is invalid: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error("database schema version {found} is newer than this router understands ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("the store is closed")]
    Closed,
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}
