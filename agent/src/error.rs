//! Errors of the agent crate, and [`chain`]: the one way an error is
//! printed for a person.

use std::error::Error as StdError;
use std::fmt;
use std::path::PathBuf;

use portico_proto::api::ApiError;

/// A boxed error from a dependency whose type varies by call site.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// A key, certificate or CSR could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("key generation or signing failed")]
    Rcgen(#[from] rcgen::Error),
    #[error("no {what} found in PEM input")]
    NoPem { what: &'static str },
    #[error("invalid PEM {what}")]
    BadPem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("certificate cannot be used: {what}")]
    BadCertificate {
        what: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("invalid TLS server name {name:?}")]
    BadServerName {
        name: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("certificate names no Portico identity (urn:portico:… URI SANs)")]
    NoIdentity,
    #[error("TLS setup failed")]
    Tls(#[from] rustls::Error),
    #[error("client verifier setup failed")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("state directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state file {path} holds unusable credentials")]
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
    InvalidUrl { url: String, reason: &'static str },
    #[error("invalid router URL {url:?}")]
    UrlSyntax {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("cannot build a request to {url}")]
    Request {
        url: String,
        #[source]
        source: http::Error,
    },
    #[error("TLS setup for the router failed")]
    Pki(#[from] PkiError),
    #[error("cannot reach the router at {url}")]
    Connect {
        url: String,
        #[source]
        source: BoxError,
    },
    #[error("reading the router's answer from {url} failed")]
    ReadAnswer {
        url: String,
        #[source]
        source: BoxError,
    },
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
    #[error("answer to {path} is not the expected JSON")]
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
            ClientError::Connect { .. }
            | ClientError::ReadAnswer { .. }
            | ClientError::Timeout { .. } => true,
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
    /// A token for the other kind of component; the router did not use it.
    #[error("{message}")]
    WrongTokenKind {
        /// What this process enrolls as.
        wanted: portico_proto::api::EnrollKind,
        /// The router's explanation: what the token is for and which
        /// command takes it.
        message: String,
    },
    /// An edge token of another region than the edge's `--region`; the
    /// router did not use it.
    #[error("{message}")]
    WrongTokenRegion {
        /// The router's explanation: both regions, and how to go on.
        message: String,
    },
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

/// Shows an error and each of its sources once, joined by `": "`:
/// `edge failed to start: enrollment failed: the router refused the join
/// token: join token already used`.
///
/// The one way Portico formats an error chain for a person: `main`'s
/// `error:` line and every log field that carries an error
/// (`error = %chain(&e)`). Our own `#[error]` messages never repeat their
/// source, but some dependencies' messages do (hyper's "client error
/// (Connect)" is followed by its cause, rustls' by nothing): a source whose
/// text is already on the line is skipped, so nothing is printed twice
/// whoever wrote the message. Empty messages are skipped, and at most
/// [`MAX_CHAIN`] sources are followed (a cyclic `source()` cannot loop).
pub fn chain<'a>(err: &'a (dyn StdError + 'a)) -> Chain<'a> {
    Chain(err)
}

/// How many sources [`chain`] follows at most.
pub const MAX_CHAIN: usize = 32;

/// The [`fmt::Display`] of [`chain`].
#[derive(Clone, Copy)]
pub struct Chain<'a>(&'a (dyn StdError + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut next = self.0.source();
        for _ in 0..MAX_CHAIN {
            let Some(source) = next else { break };
            let text = source.to_string();
            if !text.is_empty() && !line.contains(&text) {
                if !line.is_empty() {
                    line.push_str(": ");
                }
                line.push_str(&text);
            }
            next = source.source();
        }
        f.write_str(&line)
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error with a message and an optional source, as thiserror makes.
    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);

    impl fmt::Display for E {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl StdError for E {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    fn e(msg: &'static str, source: Option<E>) -> E {
        E(msg, source.map(Box::new))
    }

    #[test]
    fn each_source_is_printed_once_in_order() {
        let err = e(
            "edge failed to start",
            Some(e(
                "enrollment failed",
                Some(e("join token already used", None)),
            )),
        );
        assert_eq!(
            chain(&err).to_string(),
            "edge failed to start: enrollment failed: join token already used"
        );
    }

    #[test]
    fn a_source_already_on_the_line_is_skipped() {
        // A dependency whose message embeds its source.
        let err = e(
            "the router refused the join token",
            Some(e(
                "client error: join token already used",
                Some(e("join token already used", None)),
            )),
        );
        let text = chain(&err).to_string();
        assert_eq!(
            text,
            "the router refused the join token: client error: join token already used"
        );
        assert_eq!(text.matches("join token already used").count(), 1);
    }

    #[test]
    fn empty_messages_add_no_separator() {
        let err = e("outer", Some(e("", Some(e("inner", None)))));
        assert_eq!(chain(&err).to_string(), "outer: inner");
        let err = e("", Some(e("inner", None)));
        assert_eq!(chain(&err).to_string(), "inner");
    }

    #[test]
    fn a_long_chain_is_cut_at_the_limit() {
        // A chain longer than MAX_CHAIN: the line ends, it does not loop.
        let mut err = e("last", None);
        let names: Vec<&'static str> = (0..MAX_CHAIN + 8)
            .map(|i| &*Box::leak(format!("level{i}").into_boxed_str()))
            .collect();
        for name in names.iter().rev() {
            err = e(name, Some(err));
        }
        let text = chain(&err).to_string();
        assert_eq!(text.matches(": ").count(), MAX_CHAIN);
        assert!(!text.contains("last"));
    }

    #[test]
    fn works_on_std_and_boxed_errors() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(chain(&io).to_string(), "no such file");
        let boxed: Box<dyn StdError + Send + Sync> = Box::new(e("a", Some(e("b", None))));
        assert_eq!(chain(&*boxed).to_string(), "a: b");
    }
}
