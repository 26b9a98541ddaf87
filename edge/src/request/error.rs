//! The one error type of the request path: every way a request can fail,
//! each saying who failed ([`Fault`]), whether another attempt is safe
//! ([`Retry`]) and which stable code the user sees. Retries and error
//! pages decide on these fields, never on messages or HTTP statuses.

use portico_proto::{ErrorCode, GroupId};

/// Who failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The user's client: a malformed request, a wrong host, a bad body.
    Client,
    /// This edge: a limit of its own, a feature it lacks.
    Edge,
    /// The connector, or the tunnel to it.
    Connector,
    /// The app's backend, as the connector reported it.
    Backend,
    /// Another edge of the mesh (when a request is forwarded).
    Peer,
}

impl Fault {
    /// The `fault` field of the access log.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Fault::Client => "client",
            Fault::Edge => "edge",
            Fault::Connector => "connector",
            Fault::Backend => "backend",
            Fault::Peer => "peer",
        }
    }
}

/// Whether a failed attempt may be made again on another upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// The request may have reached a backend, or the fault is the
    /// client's: never replay it.
    Never,
    /// Nothing of it reached a backend (the stream was refused, or the
    /// tunnel died before the connector acknowledged the head): retry on
    /// another connector, whatever the method.
    Safe,
    /// The tunnel died before the first response byte, after the head
    /// may have arrived: replay only an idempotent method, once.
    IfIdempotent,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("the request names no host")]
    NoHost,
    #[error("the request's host is malformed")]
    BadHost,
    #[error(
        "the request has more than one Host header, or a Host that differs from its authority"
    )]
    ConflictingHost,
    #[error("extended CONNECT (WebSocket over HTTP/3) is not carried")]
    ExtendedConnect,
    #[error("no app is published at {host}")]
    AppNotFound { host: String },
    #[error("the app is in maintenance mode")]
    Maintenance,
    #[error("the app requires feature {feature:?}, which this edge does not implement")]
    FeatureUnsupported { feature: String },
    #[error("the request head does not fit a stream head")]
    HeadTooLarge(#[source] portico_proto::EncodeError),
    #[error("no tunnel of group {group} is attached to this edge")]
    NoTunnel { group: GroupId },
    #[error("opening a stream on the tunnel failed")]
    Open(#[source] quinn::ConnectionError),
    #[error("writing the stream head failed")]
    HeadWrite(#[source] quinn::WriteError),
    #[error("the connector refused the stream before processing it")]
    Refused,
    #[error("the tunnel was lost before a response head (head acknowledged: {acked})")]
    Lost {
        /// Whether the connector may have received the head: anything
        /// arrived from it on this tunnel after the head was written.
        acked: bool,
        #[source]
        source: Option<std::io::Error>,
    },
    #[error("the connector reset the stream ({code}) before a response head")]
    Reset { code: portico_proto::CloseCode },
    #[error("no response head within the app's timeout")]
    ConnectorTimeout,
    #[error("the connector answered {code}: {message}")]
    Connector { code: ErrorCode, message: String },
    #[error("the request body from the client failed")]
    ClientBody(#[source] crate::request::BoxError),
    #[error("the connector broke the protocol: {reason}")]
    Protocol { reason: String },
    #[error("no mesh link to edge {peer}: {reason}")]
    Mesh {
        peer: portico_proto::EdgeId,
        reason: String,
    },
    #[error("the sign-in failed: {reason}")]
    SignInFailed { reason: String },
    #[error("the app signs its users in, and this edge has no sign-in settings from the router")]
    SignInUnavailable,
    #[error("user {user} is not assigned to app {app}")]
    NotAssigned {
        user: String,
        app: portico_proto::AppId,
    },
}

impl ProxyError {
    /// The stable code the user sees.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            ProxyError::NoHost
            | ProxyError::BadHost
            | ProxyError::ConflictingHost
            | ProxyError::ExtendedConnect
            | ProxyError::HeadTooLarge(_) => ErrorCode::BadRequest,
            ProxyError::AppNotFound { .. } => ErrorCode::AppNotFound,
            ProxyError::Maintenance => ErrorCode::Maintenance,
            ProxyError::FeatureUnsupported { .. } | ProxyError::SignInUnavailable => {
                ErrorCode::FeatureUnsupported
            }
            ProxyError::SignInFailed { .. } => ErrorCode::SignInFailed,
            ProxyError::NotAssigned { .. } => ErrorCode::NotAssigned,
            ProxyError::NoTunnel { .. }
            | ProxyError::Open(_)
            | ProxyError::HeadWrite(_)
            | ProxyError::Refused
            | ProxyError::Lost { .. }
            | ProxyError::Reset { .. } => ErrorCode::ConnectorNotFound,
            ProxyError::ConnectorTimeout => ErrorCode::ConnectorTimeout,
            ProxyError::Connector { code, .. } => *code,
            ProxyError::ClientBody(_) => ErrorCode::BadRequestBody,
            ProxyError::Protocol { .. } => ErrorCode::Internal,
            ProxyError::Mesh { .. } => ErrorCode::MeshUnreachable,
        }
    }

    /// Who failed.
    pub(crate) fn fault(&self) -> Fault {
        match self {
            ProxyError::NoHost
            | ProxyError::BadHost
            | ProxyError::ConflictingHost
            | ProxyError::ExtendedConnect
            | ProxyError::HeadTooLarge(_)
            | ProxyError::AppNotFound { .. }
            | ProxyError::ClientBody(_)
            | ProxyError::SignInFailed { .. }
            | ProxyError::NotAssigned { .. } => Fault::Client,
            ProxyError::FeatureUnsupported { .. } | ProxyError::SignInUnavailable => Fault::Edge,
            ProxyError::Mesh { .. } => Fault::Peer,
            // The app is down, by its admin's choice.
            ProxyError::Maintenance => Fault::Backend,
            ProxyError::NoTunnel { .. }
            | ProxyError::Open(_)
            | ProxyError::HeadWrite(_)
            | ProxyError::Refused
            | ProxyError::Lost { .. }
            | ProxyError::Reset { .. }
            | ProxyError::ConnectorTimeout
            | ProxyError::Protocol { .. } => Fault::Connector,
            ProxyError::Connector { code, .. } => match code {
                ErrorCode::BackendUnreachable
                | ErrorCode::BackendTimeout
                | ErrorCode::BackendCertInvalid
                | ErrorCode::BackendBusy => Fault::Backend,
                ErrorCode::BadRequest
                | ErrorCode::BadRequestBody
                | ErrorCode::PathOutsidePrefix => Fault::Client,
                ErrorCode::MeshUnreachable => Fault::Peer,
                _ => Fault::Connector,
            },
        }
    }

    /// Whether another attempt on another upstream is safe.
    pub(crate) fn retry(&self) -> Retry {
        match self {
            // Nothing was sent, or the connector said it processed nothing.
            ProxyError::Open(_)
            | ProxyError::HeadWrite(_)
            | ProxyError::Refused
            | ProxyError::Mesh { .. } => Retry::Safe,
            ProxyError::Lost { acked: false, .. } => Retry::Safe,
            ProxyError::Lost { acked: true, .. } => Retry::IfIdempotent,
            // The connector does not serve the app (yet: its config lags
            // the edge's) or has no backend connection free: it answered
            // before sending anything to a backend.
            // A mesh peer with no tunnel of the group answers before
            // sending anything on.
            ProxyError::Connector {
                code: ErrorCode::AppNotFound | ErrorCode::BackendBusy | ErrorCode::MeshUnreachable,
                ..
            } => Retry::Safe,
            _ => Retry::Never,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The classification table: who failed, whether a retry is safe and
    /// the stable code, for every way a request fails.
    #[test]
    fn every_error_says_who_failed_and_whether_a_retry_is_safe() {
        let connector = |code| ProxyError::Connector {
            code,
            message: String::new(),
        };
        let cases: Vec<(ProxyError, Fault, Retry, ErrorCode)> = vec![
            (
                ProxyError::NoHost,
                Fault::Client,
                Retry::Never,
                ErrorCode::BadRequest,
            ),
            (
                ProxyError::ConflictingHost,
                Fault::Client,
                Retry::Never,
                ErrorCode::BadRequest,
            ),
            (
                ProxyError::AppNotFound { host: "x".into() },
                Fault::Client,
                Retry::Never,
                ErrorCode::AppNotFound,
            ),
            (
                ProxyError::Maintenance,
                Fault::Backend,
                Retry::Never,
                ErrorCode::Maintenance,
            ),
            (
                ProxyError::FeatureUnsupported {
                    feature: "oidc".into(),
                },
                Fault::Edge,
                Retry::Never,
                ErrorCode::FeatureUnsupported,
            ),
            (
                ProxyError::NoTunnel {
                    group: GroupId::default_group(),
                },
                Fault::Connector,
                Retry::Never,
                ErrorCode::ConnectorNotFound,
            ),
            (
                ProxyError::Refused,
                Fault::Connector,
                Retry::Safe,
                ErrorCode::ConnectorNotFound,
            ),
            (
                ProxyError::Lost {
                    acked: false,
                    source: None,
                },
                Fault::Connector,
                Retry::Safe,
                ErrorCode::ConnectorNotFound,
            ),
            (
                ProxyError::Lost {
                    acked: true,
                    source: None,
                },
                Fault::Connector,
                Retry::IfIdempotent,
                ErrorCode::ConnectorNotFound,
            ),
            (
                ProxyError::Reset {
                    code: portico_proto::CloseCode::Internal,
                },
                Fault::Connector,
                Retry::Never,
                ErrorCode::ConnectorNotFound,
            ),
            (
                ProxyError::ConnectorTimeout,
                Fault::Connector,
                Retry::Never,
                ErrorCode::ConnectorTimeout,
            ),
            (
                connector(ErrorCode::BackendUnreachable),
                Fault::Backend,
                Retry::Never,
                ErrorCode::BackendUnreachable,
            ),
            (
                connector(ErrorCode::BackendBusy),
                Fault::Backend,
                Retry::Safe,
                ErrorCode::BackendBusy,
            ),
            (
                connector(ErrorCode::AppNotFound),
                Fault::Connector,
                Retry::Safe,
                ErrorCode::AppNotFound,
            ),
            (
                connector(ErrorCode::PathOutsidePrefix),
                Fault::Client,
                Retry::Never,
                ErrorCode::PathOutsidePrefix,
            ),
            (
                ProxyError::ClientBody("bad chunk".into()),
                Fault::Client,
                Retry::Never,
                ErrorCode::BadRequestBody,
            ),
            (
                ProxyError::Protocol { reason: "x".into() },
                Fault::Connector,
                Retry::Never,
                ErrorCode::Internal,
            ),
        ];
        for (e, fault, retry, code) in cases {
            assert_eq!(
                (e.fault(), e.retry(), e.code()),
                (fault, retry, code),
                "{e}"
            );
        }
        // Client faults are 4xx.
        assert_eq!(ProxyError::ClientBody("x".into()).code().http_status(), 400);
    }
}
