//! Portico's wire protocol, sans-IO.
//!
//! This crate holds everything two Portico processes say to each other:
//! the frames of the tunnel protocol (control stream and data streams, see
//! `proto/FORMAT.md`), the stable error codes users see, the identity
//! newtypes, and the serde types of the router's HTTP API ([`api`]).
//!
//! It does **not** open sockets, read a clock, spawn tasks or draw random
//! numbers. Decoders take bytes and return typed errors; every length a peer
//! sends is bounded before anything is allocated. The optional `io` feature
//! adds a thin async adapter ([`io`]) that reads and writes whole frames over
//! any tokio `AsyncRead`/`AsyncWrite`, such as quinn's streams.

pub mod api;
pub mod codec;
pub mod control;
pub mod error;
pub mod extension;
pub mod features;
pub mod frame;
pub mod ids;
#[cfg(feature = "io")]
pub mod io;
pub mod limits;

pub use error::{ClaimError, CloseCode, DecodeError, EncodeError, ErrorCode, VersionMismatch};
pub use extension::{HeadExtensions, HeadExtensionsRef, IdentityClaims, UnknownExtension};
pub use frame::{
    Frame, FrameType, Goodbye, Hello, MeshHello, ResponseHead, StreamError, StreamHead,
    StreamHeadRef, StreamKind, Welcome,
};
pub use ids::{AppId, ConnectorId, EdgeId, GroupId, IdError, RegionId, RequestId, TunnelId};

/// The ALPN protocol id of a tunnel (connector → edge) QUIC connection.
pub const ALPN: &[u8] = b"portico/1";
/// The ALPN protocol id of a mesh link (edge → edge) QUIC connection.
pub const MESH_ALPN: &[u8] = b"portico-mesh/1";
/// The most mesh hops a request makes: an edge forwards a request it got
/// from a user, and an edge that got it from another edge never forwards
/// it again.
pub const MAX_MESH_HOPS: u8 = 1;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// How long a tunnel may go without a packet from its peer before it is
/// declared dead. Short, so that a connector that vanished (power cut,
/// SIGKILL) turns into `ConnectorNotFound` for users within seconds rather
/// than a hang. Both ends configure it; QUIC uses the smaller.
pub const TUNNEL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often an otherwise idle tunnel sends a keep-alive, well within
/// [`TUNNEL_IDLE_TIMEOUT`] so that a lost packet or two does not kill it.
pub const TUNNEL_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// Capability bits carried in `Hello`/`Welcome`. Unknown bits are ignored.
///
/// The connector announces what it supports in `Hello`; the edge answers in
/// `Welcome` with the bits both support, and that set holds for the tunnel.
pub mod capabilities {
    /// The peer can carry WebSocket upgrades on a data stream.
    pub const WEBSOCKET: u64 = 1 << 0;
    /// The peer decodes the `StreamHead` extension area
    /// ([`crate::extension`]). Without it, a head must carry no area.
    pub const HEAD_EXTENSIONS: u64 = 1 << 1;
    /// Everything this build supports.
    pub const ALL: u64 = WEBSOCKET | HEAD_EXTENSIONS;
}

/// Chooses the protocol version to speak with a peer that announced `theirs`.
///
/// This side speaks `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION`. A peer outside
/// that range gets an error that names both sides' versions.
pub fn negotiate_version(theirs: u32) -> Result<u32, VersionMismatch> {
    if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&theirs) {
        Ok(theirs)
    } else {
        Err(VersionMismatch {
            ours_min: MIN_PROTOCOL_VERSION,
            ours_max: PROTOCOL_VERSION,
            theirs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_mismatch_names_both_versions() {
        assert_eq!(negotiate_version(1), Ok(1));
        let err = negotiate_version(7).unwrap_err();
        let text = err.to_string();
        assert!(text.contains('7'), "{text}");
        assert!(text.contains("1..=1"), "{text}");
        assert!(negotiate_version(0).is_err());
    }
}
