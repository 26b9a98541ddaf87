//! Errors of the router crate: starting and stopping it ([`Error`]) and its
//! store ([`StoreError`]). Errors answered over the API are
//! [`portico_proto::api::ApiError`] bodies, built in `api.rs`.
//!
//! No message repeats its source: print them with
//! `portico_agent::error_chain`, which adds each source once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The router could not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid router config: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve DNS over {transport} on {addr}")]
    DnsBind {
        addr: SocketAddr,
        transport: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the apps domain {domain:?} is not a DNS name")]
    DnsDomain {
        domain: String,
        #[source]
        source: hickory_proto::ProtoError,
    },
    #[error("{} exists but {} does not; restore it or remove both to create a new CA", present.display(), missing.display())]
    CaIncomplete { present: PathBuf, missing: PathBuf },
    #[error("certificate authority: {what}")]
    Ca {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("admin token in {} is malformed (expected 64 hex digits)", path.display())]
    BadAdminToken { path: PathBuf },
    #[error("{} cannot be used: {reason}", path.display())]
    BadSessionKeys { path: PathBuf, reason: String },
    #[error(
        "{} has mode {mode:04o}, open to group or others; the router keeps its CA key and admin token private and will not start: run `chmod {fix:o} {}` (if others could read ca.key, treat the CA as exposed)",
        path.display(),
        path.display()
    )]
    InsecurePermissions { path: PathBuf, mode: u32, fix: u32 },
    #[error("TLS setup failed: {what}")]
    Tls {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("metrics setup failed")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
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
    #[error("region {region:?} is in use: {}", in_use(*.edges, *.groups, *.tokens))]
    RegionInUse {
        region: String,
        edges: u64,
        groups: u64,
        tokens: u64,
    },
    #[error("region {region:?} cannot be deleted: it always exists (edge tokens name it when no region is given)")]
    DefaultRegion { region: String },
    #[error("the store already holds {max} {kind}s; delete one first")]
    Limit { kind: &'static str, max: usize },
    #[error("join token already used")]
    TokenUsed,
    #[error("join token revoked")]
    TokenRevoked,
    #[error("stored {what} is invalid")]
    Corrupt {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("database schema version {found} is newer than this router understands ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("the store is closed")]
    Closed,
    #[error("sqlite")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

/// What still uses a region, and how to let it go.
fn in_use(edges: u64, groups: u64, tokens: u64) -> String {
    let mut parts = Vec::new();
    if edges > 0 {
        parts.push(format!(
            "{edges} edge(s) enrolled in it (`portico edge delete`)"
        ));
    }
    if groups > 0 {
        parts.push(format!(
            "{groups} connector group(s) pinned to it (`portico group delete`)"
        ));
    }
    if tokens > 0 {
        parts.push(format!(
            "{tokens} unused edge token(s) for it (`portico token revoke`)"
        ));
    }
    format!("{}; remove them first", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant with a source: its message leaves the source out, and
    /// the chain prints the source exactly once.
    #[test]
    fn no_message_repeats_its_source() {
        let io = || std::io::Error::other("disk on fire");
        let sqlite = || rusqlite::Error::InvalidQuery;
        let errors: Vec<Box<dyn std::error::Error>> = vec![
            Box::new(Error::Io {
                action: "read",
                path: "/x".into(),
                source: io(),
            }),
            Box::new(Error::Bind {
                addr: "127.0.0.1:1".parse().unwrap(),
                source: io(),
            }),
            Box::new(Error::Ca {
                what: "reading ca.key",
                source: rcgen::Error::CouldNotParseCertificate,
            }),
            Box::new(Error::Tls {
                what: "loading the API server certificate",
                source: Box::new(io()),
            }),
            Box::new(Error::Metrics(prometheus::Error::Msg("bad metric".into()))),
            Box::new(Error::Store(StoreError::Sqlite(sqlite()))),
            Box::new(StoreError::Sqlite(sqlite())),
            Box::new(StoreError::Open {
                path: "/x/portico.db".into(),
                source: sqlite(),
            }),
            Box::new(StoreError::Corrupt {
                what: "app id",
                source: Box::new(io()),
            }),
            Box::new(crate::ca::CsrError::Invalid(
                rcgen::Error::CouldNotParseCertificationRequest,
            )),
            Box::new(crate::ca::CsrError::Sign(rcgen::Error::RingUnspecified)),
        ];
        for e in &errors {
            let source = e.source().expect("each has a source").to_string();
            assert!(
                !e.to_string().contains(&source),
                "{e} repeats its source {source:?}"
            );
            let chain = portico_agent::error_chain(e.as_ref()).to_string();
            assert_eq!(chain.matches(&source).count(), 1, "{chain}");
        }
    }
}
