//! The origin side: HTTP clients with keepalive pools that reach the apps'
//! internal URLs (http and https), and the mapping of their failures to
//! stable error codes.

use std::error::Error as StdError;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

use crate::error::{Error, ProxyError};

/// A boxed error, as request bodies report them.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;
/// The body of every backend request: streamed from the tunnel.
pub(crate) type ReqBody = UnsyncBoxBody<Bytes, BoxError>;
/// An HTTP/1.1 client for http and https backends.
pub(crate) type HttpClient = Client<HttpsConnector<HttpConnector>, ReqBody>;

/// The two backend clients: one validates TLS certificates against the
/// system roots plus the configured extra roots, one accepts any
/// certificate (for apps with `validate_backend_tls = false`).
#[derive(Clone)]
pub struct Origin {
    validating: HttpClient,
    insecure: HttpClient,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Origin")
    }
}

/// How long a TCP connect to a backend may take before it is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The read buffer of each backend connection. hyper's default grows it
/// (to 32 KiB and more under a trickling response), and it is held for the
/// life of the connection: at 10,000 concurrent streams that was most of
/// the connector's memory. Response chunks are passed on as they are read,
/// so a bigger buffer only saves read calls on bulk downloads.
const BACKEND_READ_BUFFER: usize = 16 << 10;
/// How long an idle keepalive connection to a backend is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

impl Origin {
    /// Builds both clients. `backend_ca` are PEM files of extra roots.
    pub fn new(backend_ca: &[PathBuf]) -> Result<Origin, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!(error = %e, "skipping an unreadable system root");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "system roots loaded for backend TLS");
        for path in backend_ca {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| Error::BackendCa {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::BackendCa {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(Error::BackendCa {
                    path: path.clone(),
                    reason: "no CERTIFICATE block found".into(),
                });
            }
            for cert in certs {
                roots.add(cert).map_err(|e| Error::BackendCa {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
        }

        let tls_err = |e: rustls::Error| Error::Tls {
            reason: e.to_string(),
        };
        let validating = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let insecure = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(portico_agent::pki::insecure_verifier())
            .with_no_client_auth();
        Ok(Origin {
            validating: build_client(validating),
            insecure: build_client(insecure),
        })
    }

    /// The client for an app.
    pub(crate) fn client(&self, validate_tls: bool) -> &HttpClient {
        if validate_tls {
            &self.validating
        } else {
            &self.insecure
        }
    }
}

fn build_client(tls: rustls::ClientConfig) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    // HTTP/1.1 to backends, as most reverse proxies do: upgrades
    // (WebSocket) need it, and every backend speaks it.
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(256)
        .http1_read_buf_exact_size(BACKEND_READ_BUFFER)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https)
}

/// Maps a failed backend request to its stable error: certificate errors
/// anywhere in the cause chain are `BackendCertInvalid`, everything else
/// that kept a response head from arriving is `BackendUnreachable`.
pub(crate) fn classify(err: &hyper_util::client::legacy::Error, target: &str) -> ProxyError {
    if let Some(reason) = cert_error(err) {
        return ProxyError::CertInvalid {
            target: target.to_owned(),
            reason,
        };
    }
    ProxyError::Unreachable {
        target: target.to_owned(),
        reason: error_chain(err),
    }
}

/// Walks the `source()` chain, looking inside `io::Error`s too (their
/// `source()` skips the wrapped error), for a rustls certificate error.
fn cert_error(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut next: Option<&(dyn StdError + 'static)> = Some(err);
    let mut depth = 0;
    while let Some(e) = next {
        depth += 1;
        if depth > 32 {
            break;
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            if is_cert_error(tls) {
                return Some(tls.to_string());
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(found) = cert_error(inner) {
                    return Some(found);
                }
            }
        }
        next = e.source();
    }
    None
}

fn is_cert_error(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::InvalidCertRevocationList(_)
    )
}

/// `a: b: c` from an error and its causes, for log lines and messages.
pub(crate) fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    let mut depth = 0;
    while let Some(e) = next {
        depth += 1;
        if depth > 16 {
            break;
        }
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        next = e.source();
    }
    out
}
