//! Errors: what a decoder can reject, the stable error codes users see, and
//! the application codes that close tunnels and reset streams.

use std::fmt;

/// Why a frame could not be decoded. Every variant says which field broke
/// which rule, so a tunnel can be closed with a precise reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes ended inside a frame or field.
    #[error("frame truncated")]
    UnexpectedEnd,
    /// A frame type byte this version does not know.
    #[error("unknown frame type 0x{ty:02x}")]
    UnknownFrameType { ty: u8 },
    /// A known frame type where the stream's state does not allow it.
    #[error("unexpected {ty:?} frame on a {context} stream")]
    UnexpectedFrame {
        ty: crate::FrameType,
        context: &'static str,
    },
    /// A frame longer than its type allows.
    #[error("{ty:?} frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        ty: crate::FrameType,
        len: u64,
        max: u64,
    },
    /// A length-prefixed field longer than its limit.
    #[error("field {field}: length {len} exceeds the limit of {max}")]
    TooLong {
        field: &'static str,
        len: u64,
        max: u64,
    },
    /// More items (headers) than allowed.
    #[error("field {field}: {count} items exceed the limit of {max}")]
    TooMany {
        field: &'static str,
        count: u64,
        max: u64,
    },
    /// A number outside the range its field allows.
    #[error("field {field}: value {value} out of range")]
    ValueOutOfRange { field: &'static str, value: u64 },
    /// Bytes that should be UTF-8 and are not.
    #[error("field {field}: not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    /// A header name or value, method, status or id that is not valid.
    #[error("field {field}: invalid value")]
    InvalidValue { field: &'static str },
    /// An address family byte other than 4 or 6.
    #[error("invalid address family {family}")]
    InvalidAddressFamily { family: u8 },
    /// The payload had bytes left over after its last field.
    #[error("{ty:?} frame has {extra} trailing bytes")]
    TrailingBytes { ty: crate::FrameType, extra: usize },
    /// A known `StreamHead` extension entry appeared more than once.
    #[error("extension {field} appears more than once")]
    DuplicateExtension { field: &'static str },
    /// A known extension entry's value had bytes left over after its fields.
    #[error("extension 0x{ty:x} has {extra} trailing bytes")]
    TrailingExtensionBytes { ty: u64, extra: usize },
}

/// Why an identity claim was refused when added to
/// [`IdentityClaims`](crate::extension::IdentityClaims): it would break a
/// limit the decoder enforces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimError {
    #[error("claim name of {len} bytes: a name is 1 to {max} bytes")]
    NameLength { len: usize, max: usize },
    #[error("claim name contains {found:?}: only visible ASCII is allowed")]
    NameChar { found: char },
    #[error("claim value of {len} bytes exceeds the limit of {max}")]
    ValueTooLong { len: usize, max: usize },
    #[error("claim value contains the control character {found:?}")]
    ValueChar { found: char },
    #[error("more than {max} claims")]
    TooMany { max: usize },
    #[error("claims of {len} bytes exceed the limit of {max}")]
    TooLarge { len: usize, max: usize },
}

/// A peer speaks a protocol version outside the range this side accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "protocol version mismatch: the peer speaks portico/{theirs}, this side speaks portico/{ours_min}..={ours_max}"
)]
pub struct VersionMismatch {
    pub ours_min: u32,
    pub ours_max: u32,
    pub theirs: u32,
}

/// The status logged for a request whose client went away first (nginx's
/// 499 "client closed request"); never sent, since nobody is left to read it.
pub const CLIENT_CLOSED: http::StatusCode = match http::StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => panic!("499 is a valid status"),
};

/// The stable error codes of DESIGN.md. Users see them on error pages,
/// metrics count them, and logs carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No app for this host.
    AppNotFound,
    /// The app is in maintenance mode.
    Maintenance,
    /// The user is signed in but not assigned.
    NotAssigned,
    /// No active connector in the app's group.
    ConnectorNotFound,
    /// The connector did not answer in time.
    ConnectorTimeout,
    /// The connector could not reach the internal URL.
    BackendUnreachable,
    /// The backend exceeded the app's timeout.
    BackendTimeout,
    /// Backend TLS validation failed.
    BackendCertInvalid,
    /// No path to an edge that holds the group.
    MeshUnreachable,
    /// The request itself was malformed (bad host, bad upgrade).
    BadRequest,
    /// A fault inside Portico. Never expected; always logged.
    Internal,
    /// The client sent a malformed request body (bad chunked encoding, a
    /// body longer or shorter than its `Content-Length`).
    BadRequestBody,
    /// The request path, once dot segments are removed, leaves the app's
    /// published path prefix.
    PathOutsidePrefix,
    /// The client went away (closed, reset or cancelled) before the
    /// response was complete. Logs and metrics only: nobody is left to
    /// read a page.
    ClientClosed,
    /// The client stopped reading the response, and the stream was reset
    /// after the stall time. Logs and metrics only.
    ClientStalled,
    /// The connector's cap on connections to this app's backend was
    /// reached and no connection came free in time.
    BackendBusy,
    /// The app requires a feature this edge does not implement, so the
    /// edge refuses it instead of serving it unprotected.
    FeatureUnsupported,
    /// The app signs its users in, and this request has no session (an API
    /// client: a browser is sent to sign in instead).
    SignInRequired,
    /// A sign-in could not complete: a missing or mismatched `state`, a
    /// used or expired code, a token the provider's keys do not verify, or
    /// no answer from the provider.
    SignInFailed,
}

impl ErrorCode {
    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::AppNotFound,
        ErrorCode::Maintenance,
        ErrorCode::NotAssigned,
        ErrorCode::ConnectorNotFound,
        ErrorCode::ConnectorTimeout,
        ErrorCode::BackendUnreachable,
        ErrorCode::BackendTimeout,
        ErrorCode::BackendCertInvalid,
        ErrorCode::MeshUnreachable,
        ErrorCode::BadRequest,
        ErrorCode::Internal,
        ErrorCode::BadRequestBody,
        ErrorCode::PathOutsidePrefix,
        ErrorCode::ClientClosed,
        ErrorCode::ClientStalled,
        ErrorCode::BackendBusy,
        ErrorCode::FeatureUnsupported,
        ErrorCode::SignInRequired,
        ErrorCode::SignInFailed,
    ];

    /// The stable name, as shown to users and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AppNotFound => "AppNotFound",
            ErrorCode::Maintenance => "Maintenance",
            ErrorCode::NotAssigned => "NotAssigned",
            ErrorCode::ConnectorNotFound => "ConnectorNotFound",
            ErrorCode::ConnectorTimeout => "ConnectorTimeout",
            ErrorCode::BackendUnreachable => "BackendUnreachable",
            ErrorCode::BackendTimeout => "BackendTimeout",
            ErrorCode::BackendCertInvalid => "BackendCertInvalid",
            ErrorCode::MeshUnreachable => "MeshUnreachable",
            ErrorCode::BadRequest => "BadRequest",
            ErrorCode::Internal => "Internal",
            ErrorCode::BadRequestBody => "BadRequestBody",
            ErrorCode::PathOutsidePrefix => "PathOutsidePrefix",
            ErrorCode::ClientClosed => "ClientClosed",
            ErrorCode::ClientStalled => "ClientStalled",
            ErrorCode::BackendBusy => "BackendBusy",
            ErrorCode::FeatureUnsupported => "FeatureUnsupported",
            ErrorCode::SignInRequired => "SignInRequired",
            ErrorCode::SignInFailed => "SignInFailed",
        }
    }

    /// The HTTP status a user gets for this code.
    pub fn http_status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ErrorCode::AppNotFound => S::NOT_FOUND,
            ErrorCode::Maintenance => S::SERVICE_UNAVAILABLE,
            ErrorCode::NotAssigned => S::FORBIDDEN,
            ErrorCode::ConnectorNotFound
            | ErrorCode::BackendUnreachable
            | ErrorCode::BackendCertInvalid
            | ErrorCode::MeshUnreachable => S::BAD_GATEWAY,
            ErrorCode::ConnectorTimeout | ErrorCode::BackendTimeout => S::GATEWAY_TIMEOUT,
            ErrorCode::BadRequest | ErrorCode::BadRequestBody | ErrorCode::PathOutsidePrefix => {
                S::BAD_REQUEST
            }
            ErrorCode::Internal => S::INTERNAL_SERVER_ERROR,
            ErrorCode::ClientClosed => CLIENT_CLOSED,
            ErrorCode::ClientStalled => S::REQUEST_TIMEOUT,
            ErrorCode::BackendBusy | ErrorCode::FeatureUnsupported => S::SERVICE_UNAVAILABLE,
            ErrorCode::SignInRequired => S::UNAUTHORIZED,
            ErrorCode::SignInFailed => S::BAD_REQUEST,
        }
    }

    /// The code on the wire (the `Error` frame).
    pub fn to_wire(self) -> u64 {
        match self {
            ErrorCode::AppNotFound => 1,
            ErrorCode::Maintenance => 2,
            ErrorCode::NotAssigned => 3,
            ErrorCode::ConnectorNotFound => 4,
            ErrorCode::ConnectorTimeout => 5,
            ErrorCode::BackendUnreachable => 6,
            ErrorCode::BackendTimeout => 7,
            ErrorCode::BackendCertInvalid => 8,
            ErrorCode::MeshUnreachable => 9,
            ErrorCode::BadRequest => 10,
            ErrorCode::Internal => 11,
            ErrorCode::BadRequestBody => 12,
            ErrorCode::PathOutsidePrefix => 13,
            ErrorCode::ClientClosed => 14,
            ErrorCode::ClientStalled => 15,
            ErrorCode::BackendBusy => 16,
            ErrorCode::FeatureUnsupported => 17,
            ErrorCode::SignInRequired => 18,
            ErrorCode::SignInFailed => 19,
        }
    }

    /// The code for a wire value. Unknown values (from a newer peer) map to
    /// `Internal` rather than failing the stream.
    pub fn from_wire(v: u64) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.to_wire() == v)
            .unwrap_or(ErrorCode::Internal)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ErrorCode {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or(())
    }
}

/// QUIC application error codes used to close a tunnel connection
/// (`CONNECTION_CLOSE`) or reset a stream (`RESET_STREAM`/`STOP_SENDING`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseCode {
    /// Orderly close, nothing wrong.
    NoError,
    /// The peer broke the protocol: malformed frame, oversized head,
    /// unknown or unexpected frame type.
    ProtocolError,
    /// The peer speaks a protocol version this side does not.
    VersionMismatch,
    /// The connector's certificate was revoked (the connector was deleted).
    Revoked,
    /// The peer is shutting down.
    Shutdown,
    /// The stream was cancelled (the client went away).
    Cancelled,
    /// A fault inside Portico.
    Internal,
    /// The stream was refused before anything of it was processed (the
    /// connector is draining or at a limit): the edge may retry it on
    /// another connector, whatever its method, as HTTP/2's REFUSED_STREAM.
    Refused,
    /// The tunnel was refused: its connector already holds as many
    /// tunnels to this edge as allowed.
    TooManyTunnels,
    /// The stream was reset because its client stopped reading.
    Stalled,
    /// The tunnel was closed because its peer stopped answering pings.
    Unresponsive,
    /// A connector's RTT probe: a connection closed right after its
    /// handshake, never a tunnel.
    Probe,
    /// A code this build does not know.
    Unknown(u64),
}

impl CloseCode {
    pub fn to_wire(self) -> u32 {
        match self {
            CloseCode::NoError => 0x0,
            CloseCode::ProtocolError => 0x1,
            CloseCode::VersionMismatch => 0x2,
            CloseCode::Revoked => 0x3,
            CloseCode::Shutdown => 0x4,
            CloseCode::Cancelled => 0x5,
            CloseCode::Internal => 0x6,
            CloseCode::Refused => 0x7,
            CloseCode::TooManyTunnels => 0x8,
            CloseCode::Stalled => 0x9,
            CloseCode::Unresponsive => 0xa,
            CloseCode::Probe => 0xb,
            CloseCode::Unknown(v) => u32::try_from(v).unwrap_or(u32::MAX),
        }
    }

    pub fn from_wire(v: u64) -> CloseCode {
        match v {
            0x0 => CloseCode::NoError,
            0x1 => CloseCode::ProtocolError,
            0x2 => CloseCode::VersionMismatch,
            0x3 => CloseCode::Revoked,
            0x4 => CloseCode::Shutdown,
            0x5 => CloseCode::Cancelled,
            0x6 => CloseCode::Internal,
            0x7 => CloseCode::Refused,
            0x8 => CloseCode::TooManyTunnels,
            0x9 => CloseCode::Stalled,
            0xa => CloseCode::Unresponsive,
            0xb => CloseCode::Probe,
            other => CloseCode::Unknown(other),
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseCode::NoError => f.write_str("no error"),
            CloseCode::ProtocolError => f.write_str("protocol error"),
            CloseCode::VersionMismatch => f.write_str("version mismatch"),
            CloseCode::Revoked => f.write_str("revoked"),
            CloseCode::Shutdown => f.write_str("shutdown"),
            CloseCode::Cancelled => f.write_str("cancelled"),
            CloseCode::Internal => f.write_str("internal error"),
            CloseCode::Refused => f.write_str("refused"),
            CloseCode::TooManyTunnels => f.write_str("too many tunnels"),
            CloseCode::Stalled => f.write_str("stalled"),
            CloseCode::Unresponsive => f.write_str("unresponsive"),
            CloseCode::Probe => f.write_str("rtt probe"),
            CloseCode::Unknown(v) => write!(f, "unknown code 0x{v:x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip_and_are_stable() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_wire(code.to_wire()), code);
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
        }
        assert_eq!(ErrorCode::from_wire(999), ErrorCode::Internal);
        assert_eq!(ErrorCode::ConnectorNotFound.http_status(), 502);
        assert_eq!(ErrorCode::BackendTimeout.http_status(), 504);
        assert_eq!(ErrorCode::AppNotFound.http_status(), 404);
        assert_eq!(ErrorCode::ClientClosed.http_status(), 499);
        assert_eq!(ErrorCode::PathOutsidePrefix.http_status(), 400);
        assert_eq!(ErrorCode::BadRequestBody.http_status(), 400);
        assert_eq!(ErrorCode::BackendBusy.http_status(), 503);
        // Wire values are distinct and never reused.
        let mut wire: Vec<u64> = ErrorCode::ALL.iter().map(|c| c.to_wire()).collect();
        wire.sort_unstable();
        wire.dedup();
        assert_eq!(wire.len(), ErrorCode::ALL.len());
    }

    #[test]
    fn close_codes_round_trip() {
        for v in 0..16u64 {
            assert_eq!(u64::from(CloseCode::from_wire(v).to_wire()), v);
        }
    }
}

/// Why a frame could not be encoded: it would break a limit the peer
/// enforces, so sending it would only get the tunnel closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("{ty:?} frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        ty: crate::FrameType,
        len: usize,
        max: usize,
    },
    #[error("field {field}: length {len} exceeds the limit of {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("field {field}: {count} items exceed the limit of {max}")]
    TooMany {
        field: &'static str,
        count: usize,
        max: usize,
    },
    #[error("field {field} is not UTF-8")]
    NotUtf8 { field: &'static str },
    /// A `StreamHead` extension entry is set, but the caller did not say
    /// the peer negotiated `capabilities::HEAD_EXTENSIONS`: a peer without
    /// it would refuse the head.
    #[error("stream head extensions for a peer that did not negotiate them")]
    ExtensionsNotNegotiated,
}
