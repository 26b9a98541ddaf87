//! HTTPS+JSON calls to the router, with the router verified against its CA
//! (or, on first contact, the CA fingerprint in a join token) and the fixed
//! name [`ROUTER_SERVER_NAME`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portico_proto::api::{ApiError, ROUTER_SERVER_NAME};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ClientError;
use crate::pki;
use crate::state::{Credentials, Secret};

/// How a client decides that it is talking to the right router.
#[derive(Debug, Clone)]
pub enum RouterTrust {
    /// The router CA certificate (PEM), as saved after enrollment.
    CaPem(String),
    /// The SHA-256 of the router CA, as carried by a join token.
    CaSha256(String),
}

/// The largest answer body read from the router.
const MAX_BODY: usize = 16 << 20;
/// How long an ordinary call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of the router's API. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct RouterClient {
    base: Arc<str>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    bearer: Option<Secret>,
}

impl std::fmt::Debug for RouterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterClient")
            .field("base", &self.base)
            .field("bearer", &self.bearer)
            .finish()
    }
}

impl RouterClient {
    /// A client for the router at `base_url` (`https://host:port`). With
    /// `client_cert`, it authenticates as that edge or connector.
    pub fn new(
        base_url: &str,
        trust: RouterTrust,
        client_cert: Option<&Credentials>,
    ) -> Result<RouterClient, ClientError> {
        let base = normalize_url(base_url)?;
        let verifier = match &trust {
            RouterTrust::CaPem(pem) => pki::fixed_name_verifier(pem, ROUTER_SERVER_NAME)?,
            RouterTrust::CaSha256(pin) => pki::pinned_verifier(pin, ROUTER_SERVER_NAME)?,
        };
        let builder = rustls::ClientConfig::builder_with_provider(pki::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(crate::error::PkiError::from)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let tls = match client_cert {
            Some(c) => builder
                .with_client_auth_cert(c.cert_chain()?, c.private_key()?)
                .map_err(crate::error::PkiError::from)?,
            None => builder.with_no_client_auth(),
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(RouterClient {
            base: base.into(),
            client,
            bearer: None,
        })
    }

    /// Sends `Authorization: Bearer <token>` with every call (admin calls).
    pub fn with_bearer(mut self, token: impl Into<String>) -> RouterClient {
        self.bearer = Some(Secret::new(token));
        self
    }

    /// The router's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (_, body) = self.call(Method::GET, path, None, CALL_TIMEOUT).await?;
        decode(path, &body)
    }

    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let (_, answer) = self
            .call(Method::POST, path, Some(encode(body)), CALL_TIMEOUT)
            .await?;
        decode(path, &answer)
    }

    pub async fn patch_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let (_, answer) = self
            .call(Method::PATCH, path, Some(encode(body)), CALL_TIMEOUT)
            .await?;
        decode(path, &answer)
    }

    /// A POST whose answer carries no body (204).
    pub async fn post_empty<B: Serialize>(&self, path: &str, body: &B) -> Result<(), ClientError> {
        self.call(Method::POST, path, Some(encode(body)), CALL_TIMEOUT)
            .await
            .map(drop)
    }

    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, path, None, CALL_TIMEOUT)
            .await
            .map(drop)
    }

    /// A long-poll: `GET path?after=V&wait=S`. `None` when nothing newer
    /// than `after` appeared within `wait` (the router answered 304).
    pub async fn watch<T: DeserializeOwned>(
        &self,
        path: &str,
        after: u64,
        wait: Duration,
    ) -> Result<Option<T>, ClientError> {
        let full = format!("{path}?after={after}&wait={}", wait.as_secs());
        let (status, body) = self
            .call(Method::GET, &full, None, wait + Duration::from_secs(15))
            .await?;
        if status == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        decode(path, &body).map(Some)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::ACCEPT, "application/json");
        if let Some(token) = &self.bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|source| ClientError::Request {
                url: url.clone(),
                source,
            })?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| ClientError::Connect {
                    url: self.base.to_string(),
                    source: e.into(),
                })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|source| ClientError::ReadAnswer {
                    url: self.base.to_string(),
                    source,
                })?
                .to_bytes();
            Ok::<_, ClientError>((status, body))
        };
        let (status, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                url: self.base.to_string(),
                secs: timeout.as_secs(),
            })??;
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            return Ok((status, body));
        }
        Err(match serde_json::from_slice::<ApiError>(&body) {
            Ok(error) => ClientError::Api {
                path: path.to_owned(),
                status: status.as_u16(),
                error,
            },
            Err(_) => ClientError::Http {
                path: path.to_owned(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
            },
        })
    }
}

fn encode<B: Serialize>(body: &B) -> Vec<u8> {
    // Serializing our own API types cannot fail: they hold no maps with
    // non-string keys and no failing Serialize impls.
    serde_json::to_vec(body).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(path: &str, body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|source| ClientError::Decode {
        path: path.to_owned(),
        source,
    })
}

/// Checks a router URL and returns it without a trailing slash.
fn normalize_url(raw: &str) -> Result<String, ClientError> {
    let bad = |reason: &'static str| ClientError::InvalidUrl {
        url: raw.to_owned(),
        reason,
    };
    let url = url::Url::parse(raw).map_err(|source| ClientError::UrlSyntax {
        url: raw.to_owned(),
        source,
    })?;
    if url.scheme() != "https" {
        return Err(bad("the router is only reached over https://"));
    }
    if url.host().is_none() {
        return Err(bad("no host"));
    }
    if url.path() != "/" || url.query().is_some() {
        return Err(bad(
            "give only scheme, host and port, like https://router.example.com:7443",
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_urls_are_checked() {
        assert_eq!(
            normalize_url("https://127.0.0.1:7443/").unwrap(),
            "https://127.0.0.1:7443"
        );
        assert_eq!(
            normalize_url("https://r.example.com").unwrap(),
            "https://r.example.com"
        );
        assert!(matches!(
            normalize_url("http://r:1"),
            Err(ClientError::InvalidUrl { .. })
        ));
        assert!(matches!(
            normalize_url("https://r:1/x"),
            Err(ClientError::InvalidUrl { .. })
        ));
        assert!(matches!(
            normalize_url("nonsense"),
            Err(ClientError::UrlSyntax { .. })
        ));
    }
}
