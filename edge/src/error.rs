//! Errors of the edge crate: what can stop `start`, or the edge itself.

use std::net::SocketAddr;
use std::path::PathBuf;

use portico_agent::error::{ClientError, EnrollError, PkiError, StateError};

/// Why the edge could not start, or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A config field is unusable.
    #[error("invalid edge config: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// A listening socket could not be bound.
    #[error("cannot bind the {what} listener on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A shard's thread or its runtime could not be started.
    #[error("cannot start an edge shard")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    /// Enrollment (first start) or loading saved credentials failed.
    #[error("edge enrollment failed")]
    Enroll(#[from] EnrollError),
    /// The saved identity is of another region than the one configured.
    #[error(
        "this edge was enrolled in region {enrolled} (its identity in {}), but it was started with --region {configured}: start it with --region {enrolled}, or enroll a new edge for {configured} in another state directory with a token from `portico token create --edge --region {configured}`",
        state_dir.display()
    )]
    RegionMismatch {
        configured: portico_proto::RegionId,
        enrolled: portico_proto::RegionId,
        state_dir: PathBuf,
    },
    /// The enrolled certificate names a connector, not an edge.
    #[error("the credentials in the state directory belong to {identity}, not to an edge")]
    NotAnEdge { identity: String },
    /// The state directory could not be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// A certificate or key could not be used.
    #[error("certificate setup failed")]
    Pki(#[from] PkiError),
    /// An operator certificate file could not be read.
    #[error("cannot read {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TLS could not be configured.
    #[error("TLS setup for the {what} listener failed")]
    Tls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    /// The QUIC crypto config was refused (no TLS 1.3 initial suite).
    #[error("QUIC TLS setup failed")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// A router client could not be built.
    #[error("router client setup failed")]
    Router(#[from] ClientError),
}
