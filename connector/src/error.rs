//! The connector's errors: what stops it from starting or running, and how a
//! failed request to a backend maps to a stable error code.

use std::net::SocketAddr;
use std::path::PathBuf;

use portico_proto::{ConnectorId, ErrorCode};

/// Why the connector could not start, or why it stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is unusable.
    #[error("invalid connector configuration: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },

    /// A shard's thread or its runtime could not be started.
    #[error("cannot start a connector shard")]
    Runtime {
        #[source]
        source: std::io::Error,
    },

    /// The state directory could not be opened, read or written.
    #[error("connector state directory")]
    State {
        #[source]
        source: portico_agent::StateError,
    },

    /// Enrollment failed: a used, expired or unknown token, an unreachable
    /// router, or no token and no saved credentials.
    #[error("enrollment failed")]
    Enroll {
        #[source]
        source: portico_agent::EnrollError,
    },

    /// The saved credentials are not a connector's.
    #[error("the credentials in the state directory belong to {identity}, not to a connector")]
    NotAConnector { identity: String },

    /// The connector was deleted on the router: its certificate is revoked.
    #[error(
        "connector {connector} was deleted on the router and its certificate is revoked ({detail}); \
         it stops now. Enroll it again with a new join token (portico token create) and an empty state directory"
    )]
    Revoked {
        connector: ConnectorId,
        detail: String,
    },

    /// A PEM file of extra backend roots could not be read or parsed.
    #[error("backend CA file {}: {reason}", path.display())]
    BackendCa { path: PathBuf, reason: String },

    /// TLS configuration could not be built from the credentials.
    #[error("TLS configuration: {reason}")]
    Tls { reason: String },

    /// A socket could not be bound.
    #[error("cannot bind {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// A metric could not be registered (a duplicate name: a bug).
    #[error("metrics registry")]
    Metrics {
        #[source]
        source: prometheus::Error,
    },
}

/// A CNAME chain as a resolution saw it, from the name asked:
/// `a.example -> b.example -> c.example`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain(pub Vec<String>);

impl std::fmt::Display for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(" -> "))
    }
}

/// Why a tunnel endpoint's name could not be resolved. Each message starts
/// with the chain it saw.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// A name of the chain came back: `a -> b -> a`.
    #[error("{chain}: CNAME loop")]
    Loop { chain: Chain },
    /// More than `max` CNAME hops.
    #[error("{chain}: CNAME chain longer than {max} hops")]
    TooDeep { chain: Chain, max: usize },
    /// A name of the chain does not exist.
    #[error("{chain}: {name} does not exist (NXDOMAIN)")]
    NxDomain { chain: Chain, name: String },
    /// The end of the chain has neither A nor AAAA records.
    #[error("{chain}: no A or AAAA records")]
    NoAddresses { chain: Chain },
    /// A query got no answer (timeout, refused, SERVFAIL...).
    #[error("{chain}: querying {name} {rtype}")]
    Query {
        chain: Chain,
        name: String,
        rtype: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The whole chain took too long.
    #[error("{chain}: no answer within {after:?}")]
    Timeout {
        chain: Chain,
        after: std::time::Duration,
    },
    /// Not a DNS name.
    #[error("{name:?} is not a valid DNS name")]
    InvalidName { name: String },
    /// No nameserver is configured or found.
    #[error("no nameserver to ask: {reason}")]
    NoNameserver { reason: String },
}

impl ResolveError {
    /// The `result` label of `portico_connector_dns_resolutions_total`.
    pub fn label(&self) -> &'static str {
        match self {
            ResolveError::Loop { .. } => "loop",
            ResolveError::TooDeep { .. } => "too_deep",
            ResolveError::NxDomain { .. } => "nxdomain",
            ResolveError::NoAddresses { .. } => "no_addresses",
            ResolveError::Query { .. } | ResolveError::Timeout { .. } => "failed",
            ResolveError::InvalidName { .. } => "invalid_name",
            ResolveError::NoNameserver { .. } => "no_nameserver",
        }
    }
}

impl From<portico_agent::StateError> for Error {
    fn from(source: portico_agent::StateError) -> Self {
        Error::State { source }
    }
}

impl From<portico_agent::EnrollError> for Error {
    fn from(source: portico_agent::EnrollError) -> Self {
        Error::Enroll { source }
    }
}

impl From<prometheus::Error> for Error {
    fn from(source: prometheus::Error) -> Self {
        Error::Metrics { source }
    }
}

/// Why one proxied request failed before a response head could be sent.
/// Each maps to exactly one stable [`ErrorCode`] the edge shows the user.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The app is unknown or belongs to another group.
    #[error("app {app} is not published through this connector's group")]
    AppNotFound { app: String },
    /// The request cannot be sent (bad target, unsupported stream kind).
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
    /// The request path, once its dot segments are removed, would climb
    /// above the app's published prefix. Never sent to the backend.
    #[error("request path {path:?} climbs above the app's published path prefix")]
    PathOutsidePrefix { path: String },
    /// The backend could not be reached (refused, DNS, reset).
    #[error("backend {target} unreachable: {reason}")]
    Unreachable { target: String, reason: String },
    /// No connection to the backend came free in time: the app's cap or the
    /// connector's budget of backend connections stayed full.
    #[error("no connection to backend {target} came free")]
    Busy {
        target: String,
        #[source]
        source: crate::origin::Exhausted,
    },
    /// The backend took longer than the app's timeout to answer.
    #[error("backend {target} did not answer within {timeout_ms} ms")]
    Timeout { target: String, timeout_ms: u64 },
    /// The backend's TLS certificate did not validate.
    #[error("backend {target} presented an invalid TLS certificate: {reason}")]
    CertInvalid { target: String, reason: String },
    /// A fault inside the connector.
    #[error("internal error: {reason}")]
    Internal { reason: String },
}

impl ProxyError {
    /// The stable code the edge shows for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProxyError::AppNotFound { .. } => ErrorCode::AppNotFound,
            ProxyError::BadRequest { .. } => ErrorCode::BadRequest,
            ProxyError::PathOutsidePrefix { .. } => ErrorCode::PathOutsidePrefix,
            ProxyError::Unreachable { .. } => ErrorCode::BackendUnreachable,
            ProxyError::Busy { .. } => ErrorCode::BackendBusy,
            ProxyError::Timeout { .. } => ErrorCode::BackendTimeout,
            ProxyError::CertInvalid { .. } => ErrorCode::BackendCertInvalid,
            ProxyError::Internal { .. } => ErrorCode::Internal,
        }
    }
}
