//! Errors of the WAN emulator: binding its sockets, invalid impairments, and
//! CLI values that do not parse.

use std::net::SocketAddr;

/// What can go wrong when starting or driving the WAN emulator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WanError {
    /// A UDP socket could not be created or bound.
    #[error("cannot bind UDP socket on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A socket operation other than bind failed.
    #[error("UDP socket {op} failed")]
    Socket {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// An impairment field is out of range.
    #[error("invalid impairment: {field} {reason}")]
    InvalidImpairment {
        field: &'static str,
        reason: &'static str,
    },
    /// A CLI value did not parse.
    #[error("cannot parse {what} from {input:?}: expected {expected}")]
    Parse {
        what: &'static str,
        input: String,
        expected: &'static str,
    },
    /// The delivery thread could not be spawned.
    #[error("cannot spawn the delivery thread")]
    Thread {
        #[source]
        source: std::io::Error,
    },
    /// A measurement got no answer at all.
    #[error("RTT measurement through {path} got no echo ({sent} probes sent)")]
    NoEcho { path: SocketAddr, sent: usize },
}
